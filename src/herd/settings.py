"""Typed settings from plain data: YAML mappings and `key=value` overrides -> nested dataclasses.

`from_dict(d, cls)` builds a dataclass (nested dataclasses, int/float/bool/str, lists, dicts, Optional), refusing
unknown keys and wrong types with a `SettingsError` that names the dotted key; `apply_overrides` sets dotted
`key=value` pairs (values parsed as YAML) into a nested dict. herd.train's run settings are built with these.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing

import yaml


class SettingsError(ValueError):
    """Run settings that are malformed, unknown or inconsistent; the message names the key."""


def coerce(tp, value, key: str):
    """`value` as type `tp` (int, float, bool, str, list[str], dict, Optional, nested dataclass) or SettingsError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(value, tp, key + ".")
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return coerce(inner, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif origin is list:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, list):
            return [coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif tp is dict or origin is dict:
        if isinstance(value, dict):
            return dict(value)
    name = getattr(tp, "__name__", str(tp))
    raise SettingsError(f"{key}: expected {name}, got {value!r}")


def from_dict(d: dict | None, cls, prefix: str = ""):
    """Build a settings dataclass from a plain dict; unknown keys and wrong types are SettingsErrors."""
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise SettingsError(f"{prefix.rstrip('.') or 'settings'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in d:
        if k not in names:
            raise SettingsError(f"unknown setting {prefix}{k} (known in {prefix.rstrip('.') or 'the top level'}: "
                                f"{', '.join(names)})")
    return cls(**{k: coerce(hints[k], v, prefix + k) for k, v in d.items()})


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` pairs (values parsed as YAML) into a nested settings dict."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise SettingsError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-3)")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise SettingsError(f"override {item!r}: bad value ({e})") from None
        node, parts = d, key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SettingsError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return d
