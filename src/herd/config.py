"""Model configuration: Meta's `params.json` fields as a frozen dataclass, plus the published Llama 3.1/3.2 shapes.

Field names follow Meta's params.json (llama-models `ModelArgs`). The RoPE scaling constants, which Meta's
reference hard-codes (factor 8, low 1, high 4, original context 8192), are fields here because Llama 3.2 1B/3B
use factor 32 (see llama-models issues #166 and #241).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A model configuration that herd cannot represent faithfully."""


# Upper bounds on every size a config may ask for, checked in ModelArgs.__post_init__ before anything is built (a
# config.json, params.json or GGUF header is untrusted input: 1e9 layers must be an error, not a billion modules on
# the meta device). Each is generous next to the largest published Llama, 3.1 405B (llama-models sku_list): 126
# layers, dim 16384, 128 heads of 128, ffn 53248, vocabulary 128256, context 131072, rope factor 8 (3.2: 32).
LIMITS = {
    "n_layers": 1024,  # 8x 405B's 126
    "dim": 65536,  # 4x 405B's 16384
    "n_heads": 1024,  # 8x 405B's 128 (n_kv_heads divides n_heads, so it is bounded too)
    "head_dim": 1024,  # 8x Llama's 128 (Gemma's 256 fits)
    "ffn_hidden_dim": 1 << 20,  # ~20x 405B's 53248
    "multiple_of": 1 << 20,  # <= ffn_hidden_dim (ffn_fields sets it to the hidden size itself)
    "vocab_size": 1 << 20,  # 8x Llama 3's 128256 (Gemma's 256000 fits)
    "max_seq_len": 1 << 24,  # 128x 3.1's 131072
    "rope_original_max_seq_len": 1 << 24,  # as max_seq_len (3.1: 8192)
}
# (low, high] for the float fields: positive and finite, and no larger than any real model's by a wide margin.
FLOAT_LIMITS = {
    "norm_eps": (0.0, 1.0),  # Llama 1e-5 (HF configs 1e-5 / 1e-6); an eps near 1 would swamp the RMS
    "rope_theta": (0.0, 1e12),  # Llama 3 500000; long-context models use up to ~1e8
    "rope_scale_factor": (0.0, 1024.0),  # 3.1: 8, 3.2: 32
    "rope_low_freq_factor": (0.0, 1024.0),  # 1
    "rope_high_freq_factor": (0.0, 1024.0),  # 4
}


@dataclass(frozen=True)
class ModelArgs:
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None  # None means n_heads (plain multi-head attention)
    vocab_size: int = 128256
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256  # SwiGLU hidden size is rounded up to a multiple of this
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    use_scaled_rope: bool = False
    # llama3 RoPE frequency scaling (used when use_scaled_rope); Meta's reference hard-codes 8 / 1 / 4 / 8192.
    rope_scale_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_seq_len: int = 8192
    tie_embeddings: bool = False  # 3.2 1B/3B share tok_embeddings with output
    max_seq_len: int = 131072  # the model's context length (not a params.json key in Meta's files)

    def __post_init__(self):
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of", "max_seq_len",
                     "rope_original_max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {v!r}")
            if name in LIMITS and v > LIMITS[name]:
                raise ConfigError(f"{name} {v} is over herd's limit of {LIMITS[name]} (see herd.config.LIMITS)")
        for name in ("use_scaled_rope", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.dim % self.n_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads {self.n_heads} is not divisible by n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")
        if self.head_dim > LIMITS["head_dim"]:
            raise ConfigError(f"head_dim {self.head_dim} is over herd's limit of {LIMITS['head_dim']}")
        for name, (lo, hi) in FLOAT_LIMITS.items():
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {v!r}")
            if not lo < v <= hi:
                raise ConfigError(f"{name} {v!r} is outside herd's range ({lo:g}, {hi:g}]")
        if self.ffn_dim_multiplier is not None and not (
            isinstance(self.ffn_dim_multiplier, (int, float)) and not isinstance(self.ffn_dim_multiplier, bool)
            and 0 < self.ffn_dim_multiplier < 1e3
        ):
            raise ConfigError(f"ffn_dim_multiplier must be a positive number, got {self.ffn_dim_multiplier!r}")
        if self.ffn_hidden_dim > LIMITS["ffn_hidden_dim"]:
            raise ConfigError(f"the feed-forward size {self.ffn_hidden_dim} is over herd's limit of "
                              f"{LIMITS['ffn_hidden_dim']}")
        if self.use_scaled_rope and not self.rope_high_freq_factor > self.rope_low_freq_factor:
            raise ConfigError("llama3 rope scaling needs high_freq_factor > low_freq_factor")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        # Meta's FeedForward: int(2 * 4 * dim / 3), times the multiplier, rounded up to multiple_of.
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    def replace(self, **changes) -> "ModelArgs":
        _check_keys(changes)
        return dataclasses.replace(self, **changes)

    def to_params(self) -> dict[str, Any]:
        """The params.json dict: Meta's keys plus herd's rope/tie fields (Meta's loader ignores extra keys)."""
        return dataclasses.asdict(self)

    # ---- construction from files ------------------------------------------------------------------------

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> "ModelArgs":
        """From a Meta params.json dict. Unknown keys are errors, never silently dropped."""
        if not isinstance(params, dict):
            raise ConfigError("params.json must hold a JSON object")
        _check_keys(params)
        params = dict(params)
        # Meta's 3.2 params.json has no rope factor; the published 1B/3B use 32, not the reference's 8.
        if params.get("use_scaled_rope") and "rope_scale_factor" not in params:
            match = _match_published(params)
            if match is not None:
                params["rope_scale_factor"] = match.rope_scale_factor
                params.setdefault("tie_embeddings", match.tie_embeddings)
        return cls(**params)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelArgs":
        """From a Hugging Face LlamaForCausalLM config.json dict."""
        if not isinstance(hf, dict):
            raise ConfigError("config.json must hold a JSON object")
        unknown = set(hf) - HF_KNOWN_KEYS
        if unknown:
            raise ConfigError(f"unsupported keys in config.json: {sorted(unknown)}")
        if hf.get("model_type", "llama") != "llama":
            raise ConfigError(f"model_type {hf['model_type']!r} is not a Llama model")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if key in hf and hf[key] != ok:
                raise ConfigError(f"config.json {key}={hf[key]!r} is not Llama 3 (expected {ok!r})")
        try:
            dim, n_heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])
            hidden = int(hf["intermediate_size"])
            args = dict(
                dim=dim,
                n_layers=int(hf["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
                vocab_size=int(hf["vocab_size"]),
                norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                max_seq_len=int(hf.get("max_position_embeddings", 131072)),
            )
        except KeyError as e:
            raise ConfigError(f"config.json is missing {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config.json has a bad value: {e}") from None
        if hf.get("head_dim") not in (None, dim // n_heads):
            raise ConfigError(f"head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
        # transformers v5 keeps rope settings in rope_parameters; v4 in rope_theta + rope_scaling.
        rope = dict(hf.get("rope_parameters") or {})
        rope.update({k: v for k, v in (hf.get("rope_scaling") or {}).items()})
        theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
        args["rope_theta"] = float(theta)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type == "llama3":
            args.update(
                use_scaled_rope=True,
                rope_scale_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_seq_len=int(rope["original_max_position_embeddings"]),
            )
        elif rope_type != "default":
            raise ConfigError(f"rope type {rope_type!r} is not supported (only llama3 and default)")
        args.update(ffn_fields(dim, hidden))
        cfg = cls(**args)
        if cfg.ffn_hidden_dim != hidden:
            raise ConfigError(f"cannot represent intermediate_size {hidden} for hidden_size {dim}")
        return cfg

    def to_hf(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """A config.json that transformers' LlamaForCausalLM loads as this model."""
        rope_scaling = None
        if self.use_scaled_rope:
            rope_scaling = {
                "rope_type": "llama3",
                "factor": self.rope_scale_factor,
                "low_freq_factor": self.rope_low_freq_factor,
                "high_freq_factor": self.rope_high_freq_factor,
                "original_max_position_embeddings": self.rope_original_max_seq_len,
            }
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.dim,
            "intermediate_size": self.ffn_hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "torch_dtype": dtype,
            # Llama 3 special ids, only meaningful with the 128,256-token vocabulary
            **({"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009]} if self.vocab_size == 128256 else {}),
        }


FIELDS = {f.name for f in dataclasses.fields(ModelArgs)}

# Keys transformers writes into a Llama config.json that do not change the computation (or are checked above).
HF_KNOWN_KEYS = {
    "architectures", "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
    "max_position_embeddings", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "attention_dropout",
    "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "transformers_version",
    "pretraining_tp", "use_cache", "_name_or_path", "output_attentions", "output_hidden_states", "return_dict",
}


def _check_keys(params: dict) -> None:
    unknown = set(params) - FIELDS
    if unknown:
        raise ConfigError(f"unknown model config keys: {sorted(unknown)} (known: {sorted(FIELDS)})")


def ffn_fields(dim: int, hidden: int) -> dict[str, Any]:
    """(ffn_dim_multiplier, multiple_of) that reproduce an explicit SwiGLU hidden size."""
    for cfg in CONFIGS.values():
        if cfg.dim == dim and cfg.ffn_hidden_dim == hidden:
            return {"ffn_dim_multiplier": cfg.ffn_dim_multiplier, "multiple_of": cfg.multiple_of}
    if hidden <= 0:
        raise ConfigError(f"intermediate_size must be positive, got {hidden}")
    # int(m * base) lands on hidden - 1 (or hidden), then rounding up to multiple_of=hidden gives hidden exactly.
    base = int(2 * (4 * dim) / 3)
    return {"ffn_dim_multiplier": (hidden - 0.5) / base, "multiple_of": hidden}


def _match_published(params: dict) -> ModelArgs | None:
    keys = ("dim", "n_layers", "n_heads", "ffn_dim_multiplier", "multiple_of")
    for cfg in CONFIGS.values():
        if all(params.get(k) == getattr(cfg, k) for k in keys):
            return cfg
    return None


def _llama3(**kw) -> ModelArgs:
    base = dict(vocab_size=128256, norm_eps=1e-5, rope_theta=500000.0, use_scaled_rope=True, n_kv_heads=8)
    base.update(kw)
    return ModelArgs(**base)


# Published shapes: llama-models sku_list arch_args; 3.2 factor 32 and tied embeddings from the HF config.json.
CONFIGS: dict[str, ModelArgs] = {
    "llama-3.1-8b": _llama3(dim=4096, n_layers=32, n_heads=32, ffn_dim_multiplier=1.3, multiple_of=1024),
    "llama-3.1-70b": _llama3(dim=8192, n_layers=80, n_heads=64, ffn_dim_multiplier=1.3, multiple_of=4096),
    "llama-3.1-405b": _llama3(dim=16384, n_layers=126, n_heads=128, ffn_dim_multiplier=1.2, multiple_of=4096),
    "llama-3.2-1b": _llama3(
        dim=2048, n_layers=16, n_heads=32, ffn_dim_multiplier=1.5, multiple_of=256,
        rope_scale_factor=32.0, tie_embeddings=True,
    ),
    "llama-3.2-3b": _llama3(
        dim=3072, n_layers=28, n_heads=24, ffn_dim_multiplier=1.0, multiple_of=256,
        rope_scale_factor=32.0, tie_embeddings=True,
    ),
    # Debug shapes: the 3.1 architecture (GQA, llama3 rope scaling) at a size that runs in milliseconds.
    "tiny": _llama3(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32),
    "tiny-tied": _llama3(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512, multiple_of=32,
        rope_scale_factor=32.0, tie_embeddings=True,
    ),
    "tiny-llama3-vocab": _llama3(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=32),
}


def get_config(name: str) -> ModelArgs:
    """A named config by exact name (no fuzzy matching)."""
    try:
        return CONFIGS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model name {name!r}; known: {', '.join(CONFIGS)}") from None


def load_params(path: str | Path) -> ModelArgs:
    """Read a Meta params.json or HF config.json file."""
    path = Path(path)
    try:
        data = read_json(path, max_bytes=MAX_CONFIG_BYTES)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    except JSONError as e:
        raise ConfigError(f"cannot read {e}") from None
    if path.name == "config.json":
        return ModelArgs.from_hf(data)
    return ModelArgs.from_params(data)


def num_params(cfg: ModelArgs) -> int:
    """Exact parameter count from the shapes (tied embeddings counted once)."""
    hd, kv = cfg.head_dim, cfg.n_kv_heads
    attn = cfg.dim * cfg.n_heads * hd * 2 + cfg.dim * kv * hd * 2
    ffn = 3 * cfg.dim * cfg.ffn_hidden_dim
    per_layer = attn + ffn + 2 * cfg.dim
    emb = cfg.vocab_size * cfg.dim
    return cfg.n_layers * per_layer + cfg.dim + emb * (1 if cfg.tie_embeddings else 2)


def kv_cache_bytes_per_token(cfg: ModelArgs, bytes_per_elem: int = 2) -> int:
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * bytes_per_elem


# ---- JSON from files and strings that herd did not write ------------------------------------------------------

MAX_JSON_DEPTH = 64  # herd's own files nest 4 levels; tool arguments and request bodies rarely more than 10
MAX_JSON_NUMBER_DIGITS = 100  # a number literal of more digits is not data herd uses (int() of 5,000 digits is slow)
MAX_CONFIG_BYTES = 16 << 20  # config.json / params.json / index files are kilobytes


class JSONError(ValueError):
    """Untrusted JSON that is invalid or over a limit. `reason` says what; `line` (1-based) where, when known."""

    def __init__(self, reason: str, line: int | None = None):
        super().__init__(reason)
        self.reason, self.line = reason, line


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_JSON_TOKEN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_LONG_NUMBER = re.compile(f"[0-9]{{{MAX_JSON_NUMBER_DIGITS + 1},}}")


def _too_deep_at(text: str, max_depth: int) -> int | None:
    """Offset where the nesting of JSON `text` first exceeds `max_depth` (None: it does not), in linear time and
    without recursion: brackets inside strings do not count."""
    if text.count("[") + text.count("{") <= max_depth:
        return None
    import numpy as np

    delta = np.zeros(256, dtype=np.int64)
    delta[[ord("["), ord("{")]], delta[[ord("]"), ord("}")]] = 1, -1
    brackets = np.frombuffer(_NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii"), dtype=np.uint8)
    if not brackets.size or int(delta[brackets].cumsum().max()) <= max_depth:
        return None
    depth = 0  # rare: find the place, for the message
    for m in _JSON_TOKEN.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > max_depth:
                return m.start()
        elif c in "]}":
            depth -= 1
    return 0


def _reject_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(s: str) -> float:
    v = float(s)
    if not math.isfinite(v):
        raise ValueError(f"number {s[:20]} is out of range")
    return v


def parse_json(text: str, *, max_depth: int = MAX_JSON_DEPTH, object_pairs_hook=None):
    """json.loads for text herd did not write: strict (no NaN / Infinity, no number literal over
    MAX_JSON_NUMBER_DIGITS digits or out of float range) and nested at most `max_depth` levels, checked before
    parsing (linear time), so a 100k-deep document is a JSONError, never a RecursionError."""
    at = _too_deep_at(text, max_depth)
    if at is not None:
        raise JSONError(f"too deeply nested (more than {max_depth} levels)", text.count("\n", 0, at) + 1)
    if _LONG_NUMBER.search(text):
        m = _LONG_NUMBER.search(_JSON_STRING.sub(lambda s: " " * len(s.group()), text))
        if m:
            raise JSONError(f"a number with more than {MAX_JSON_NUMBER_DIGITS} digits",
                            text.count("\n", 0, m.start()) + 1)
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float,
                          object_pairs_hook=object_pairs_hook)
    except json.JSONDecodeError as e:
        raise JSONError(f"invalid JSON: {e.msg} (column {e.colno})", e.lineno) from None
    except RecursionError:  # not reached after the depth check; kept as a guard
        raise JSONError(f"too deeply nested (more than {max_depth} levels)") from None
    except JSONError:
        raise
    except ValueError as e:  # a hook's refusal (NaN, a huge float), or an error from object_pairs_hook
        raise JSONError(str(e)[:200]) from None


def read_json(path: str | Path, *, max_bytes: int | None = None, max_depth: int = MAX_JSON_DEPTH,
              object_pairs_hook=None):
    """A JSON file herd did not write (config.json, params.json, index files, tokenizer.json, herd_quant.json):
    parse_json's limits, and every error a JSONError whose message starts with `path:line:` (OSError passes)."""
    path = Path(path)
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise JSONError(f"{path}: {path.stat().st_size} bytes, over the limit of {max_bytes} for this file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise JSONError(f"{path}: invalid UTF-8 at byte {e.start}") from None
    try:
        return parse_json(text, max_depth=max_depth, object_pairs_hook=object_pairs_hook)
    except JSONError as e:
        where = f"{path}:{e.line}" if e.line else str(path)
        raise JSONError(f"{where}: {e.reason}", e.line) from None


# ---- dtype names --------------------------------------------------------------------------------------------

DTYPE_NAMES = ("bf16", "fp16", "fp32")  # the one spelling every command and setting takes
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


def dtype_name(name: str) -> str:
    """'bf16' | 'fp16' | 'fp32' for a short or long dtype name (torch's spelling, with or without 'torch.')."""
    key = str(name).lower().removeprefix("torch.")
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPE_NAMES:
        raise ConfigError(f"unknown dtype {name!r} (expected {', '.join(DTYPE_NAMES)}, or "
                          f"{', '.join(DTYPE_ALIASES)})")
    return key


def torch_dtype(name, default: str = "bf16"):
    """A torch.dtype from a dtype name (None: `default`); a torch.dtype passes through."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name(name or default)]
