"""Run settings: typed dataclasses read from YAML (configs/*.yaml) plus dotted `key=value` overrides, validated.

`RunSettings` holds every section (model, data, optim, train, eval, checkpoint, log, export, parallel and, for
`herd finetune`, finetune); `load_settings` reads a YAML file, applies overrides and runs `validate`, so a bad
value is a `SettingsError` naming its key before any data is read. `from_dict(d, cls)` builds a dataclass (nested
dataclasses, int/float/bool/str, lists, dicts, Optional), refusing unknown keys and wrong types; `apply_overrides`
sets dotted `key=value` pairs (values parsed as YAML) into a nested dict.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import ConfigError, ModelArgs, dtype_name, get_config
from ..loading import read_config, tokenizer_source
from ..lora import LoRAConfig, LoRAError
from ..quantize import GROUP_SIZES, QUANT_DTYPES
from .data import DEFAULT_PATTERNS
from .sft import FORMATS, POLICIES


# ---- plain data -> typed dataclasses -----------------------------------------------------------------------


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


MAX_YAML_DEPTH = 64  # herd's settings nest 3 levels


class _SettingsLoader(yaml.SafeLoader):
    """yaml.SafeLoader without aliases (`*name`) and with bounded nesting. An alias lets 1 KB of YAML stand for GBs
    of data (billion laughs: each level refers to the one below ten times), which a deep copy or a walk over the
    settings would build; settings never need one. PyYAML composes nodes recursively, so the depth is capped too."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"aliases (*{event.anchor}) are not allowed in herd "
                                              "settings: write the value out", event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def load_yaml(text: str, where: str = "settings"):
    """yaml.safe_load, refusing aliases and nesting deeper than MAX_YAML_DEPTH: SettingsError `where:line: why`."""
    loader = _SettingsLoader(text)
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise SettingsError(f"{where}{line}: invalid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise SettingsError(f"{where}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


def apply_overrides(d: dict, overrides: list[str]) -> dict:
    """Set dotted `key=value` pairs (values parsed as YAML) into a nested settings dict."""
    d = json.loads(json.dumps(d))  # deep copy of plain data
    for item in overrides:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise SettingsError(f"override {item!r} is not KEY=VALUE (e.g. optim.lr=1e-3)")
        try:
            value = load_yaml(raw, f"override {item!r}") if raw.strip() else None
        except yaml.YAMLError as e:
            raise SettingsError(f"override {item!r}: bad value ({e})") from None
        node, parts = d, key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise SettingsError(f"override {item!r}: {p} is not a section")
        node[parts[-1]] = value
    return d


# ---- the run settings ---------------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    # a herd config name (herd.config.CONFIGS), e.g. tiny, llama-3.2-1b; null: tiny, or the init_from checkpoint's
    name: str | None = None
    overrides: dict = field(default_factory=dict)  # ModelArgs fields to change in that config, e.g. {dim: 768}
    # HF/Meta/GGUF checkpoint to continue from instead of random weights: it defines the model (a model.name that
    # names another shape is an error; the resolved settings record name: null) and, by default, the tokenizer
    init_from: str | None = None
    init_std: float = 0.02  # std of the random initialisation (output projections scaled by depth)


@dataclass
class DataSettings:
    paths: list[str] = field(default_factory=list)  # text files and folders (folders: files matching `patterns`)
    # null: model.init_from's own tokenizer, else the Llama 3 vocabulary; "bytes": 512 byte-level ids; or a file/folder
    tokenizer: str | None = None
    seq_len: int = 512  # tokens per training sequence
    val_fraction: float = 0.01  # share of sequences held out for eval (spread evenly through the data)
    val_paths: list[str] = field(default_factory=list)  # held-out files/folders instead (then val_fraction is unused)
    patterns: list[str] = field(default_factory=lambda: list(DEFAULT_PATTERNS))
    bos: bool = True  # wrap every document as <|begin_of_text|> ... <|end_of_text|>
    eos: bool = True
    encoding_errors: str = "strict"  # strict: invalid UTF-8 is an error naming the file; replace: U+FFFD
    cache_dir: str | None = None  # token cache (default $HERD_CACHE or ~/.cache/herd, then data/)
    workers: int = 4  # tokenizer threads


@dataclass
class OptimSettings:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    decay_steps: int | None = None  # step where the cosine reaches its minimum (default: train.steps)
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient L2 norm (null: no clipping)


@dataclass
class TrainSettings:
    steps: int = 1000  # optimizer steps in the whole run (a resumed run continues up to it)
    batch_size: int = 32  # global sequences per optimizer step, whatever the number of ranks
    micro_batch: int = 4  # sequences per rank per forward; accumulation = batch_size / (micro_batch * dp ranks)
    mixed_precision: str = "bf16"  # bf16 (autocast, or FSDP2 param casts) | fp32
    activation_checkpointing: bool = False  # recompute each block in the backward pass (less memory)
    compile: bool = False  # torch.compile: forward + loss as one graph (one process), or each block (sharded)
    device: str = "auto"  # auto: cuda when present, else cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPUs too)


@dataclass
class EvalSettings:
    every: int = 100  # steps between held-out evaluations (0: only at the end)
    sequences: int = 64  # held-out sequences per evaluation (the first ones of the split, split over ranks)


@dataclass
class CheckpointSettings:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto: continue from the latest checkpoint if any | required | never


@dataclass
class LogSettings:
    tensorboard: bool = True  # event files in run_dir/tensorboard (metrics.jsonl is always written)
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class ExportSettings:
    hf: bool = True  # run_dir/hf: config.json + model.safetensors (+ tokenizer when herd may copy it)
    meta: bool = True  # run_dir/meta: params.json + consolidated.00.pth
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    merged: bool = False  # LoRA/QLoRA: also write the base + adapter merged (hf/meta above) from model.init_from


@dataclass
class FinetuneSettings:
    """`herd finetune`: chat/Alpaca JSONL in data.paths (see herd.train.sft), a method, and its adapter settings."""

    method: str = "lora"  # full | lora | qlora (LoRA on a frozen base quantized to qlora_dtype)
    format: str = "auto"  # auto | chat ({"messages": [...]}) | alpaca ({"instruction", "input", "output"})
    packing: str = "pack"  # pack: dialogs share rows, block-diagonal attention | pad: one dialog per row
    bad_data: str = "error"  # error: stop at the first bad record (file:line) | skip: drop it, count and log it
    max_samples: int | None = None  # use only the first N usable dialogs (before the held-out split)
    base_dtype: str = "fp32"  # lora/qlora: frozen float weights (embeddings, norms, lora's base) fp32 | bf16
    lora_rank: int = 16
    lora_alpha: float = 32.0  # the update is scaled by alpha / rank
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    qlora_dtype: str = "int4"  # int4: groups of qlora_group_size along K (herd.quantize) | int8: per channel
    qlora_group_size: int = 64  # 32 | 64 | 128 | 256


@dataclass
class ParallelSettings:
    tp: int = 1  # tensor-parallel size; data-parallel (FSDP2) size is world_size / tp


@dataclass
class RunSettings:
    run_dir: str = "runs/default"  # metrics, checkpoints/, tensorboard/, exports
    seed: int = 0  # weight init, data order
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    finetune: FinetuneSettings | None = None  # set by `herd finetune` configs; None: pretraining

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_from_dict(d: dict | None, cls=RunSettings, prefix: str = ""):
    """Build a settings dataclass (RunSettings by default) from a plain dict; unknown keys and wrong types are
    SettingsErrors."""
    return from_dict(d, cls, prefix)


def load_settings(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunSettings:
    """Settings from a YAML file (None: defaults) with `key=value` overrides; validated."""
    raw: dict = {}
    if path is not None:
        try:
            raw = load_yaml(Path(path).read_text(encoding="utf-8"), str(path)) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: expected a mapping of settings at the top level")
    s = settings_from_dict(apply_overrides(raw, list(overrides)))
    validate(s)
    return s


def load_finetune_settings(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunSettings:
    """Run settings for `herd finetune`: a config without a `finetune` section gets the defaults (LoRA);
    a `~` in model.init_from is expanded."""
    s = load_settings(path, overrides)
    if s.model.init_from:
        s.model.init_from = os.path.expanduser(s.model.init_from)
    if s.finetune is None:
        s.finetune = FinetuneSettings()
        validate(s)
    return s


def model_args(s: RunSettings) -> ModelArgs:
    """The ModelArgs of a run that starts from random weights: model.name's config with model.overrides."""
    args = get_config(s.model.name or "tiny")
    return args.replace(**s.model.overrides) if s.model.overrides else args


def lora_config(f: FinetuneSettings) -> LoRAConfig:
    return LoRAConfig(rank=f.lora_rank, alpha=f.lora_alpha, dropout=f.lora_dropout, targets=list(f.lora_targets))


def check_vocab(tokenizer, args: ModelArgs) -> None:
    """The tokenizer's ids must fit the model's embedding (data.tokenizer against the model's vocab_size)."""
    if tokenizer.n_words > args.vocab_size:
        raise SettingsError(f"the tokenizer has {tokenizer.n_words} ids but the model's vocab_size is "
                            f"{args.vocab_size} (data.tokenizer: bytes has 512, the Llama 3 vocabulary 128256)")


# ---- validation ---------------------------------------------------------------------------------------------


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise SettingsError(msg)


def _canonical_dtypes(s: RunSettings) -> None:
    """Long dtype names (bfloat16, float32, ...) are aliases of bf16 / fp16 / fp32, as on every command line."""
    fields = [(s.train, "mixed_precision"), (s.export, "dtype")] + ([(s.finetune, "base_dtype")] if s.finetune else [])
    for section, key in fields:
        try:
            setattr(section, key, dtype_name(getattr(section, key)))
        except ConfigError:
            pass  # the checks below name the key


SHAPE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size")


def resolve_init_from(s: RunSettings) -> None:
    """What model.init_from decides, written into the settings so that settings.yaml says what the run used: the
    model (a model.name of another shape is an error; the name is then recorded as null) and, when data.tokenizer
    is null, the tokenizer (the checkpoint's own; the Llama 3 vocabulary only for checkpoints without one).
    A checkpoint that does not exist yet is left to the run's own error."""
    m = s.model
    if not m.init_from:
        m.name = m.name or "tiny"  # random weights: the named shape (tiny when none is given)
        return
    m.init_from = os.path.expanduser(m.init_from)
    if not os.path.exists(m.init_from):
        return
    if m.name is not None:
        try:
            named, ckpt = get_config(m.name), read_config(m.init_from)
        except (ConfigError, OSError, ValueError) as e:
            raise SettingsError(f"model.name / model.init_from: {e}") from None
        diff = [f"{k} {getattr(named, k)} vs {getattr(ckpt, k)}" for k in SHAPE_FIELDS
                if getattr(named, k) != getattr(ckpt, k)]
        _need(not diff, f"model.name {m.name} does not match model.init_from {m.init_from} ({', '.join(diff)}): the "
              "checkpoint defines the model; drop model.name")
        m.name = None
    if s.data.tokenizer is None:
        src = tokenizer_source(m.init_from)
        s.data.tokenizer = None if src is None else str(src)


def validate(s: RunSettings) -> None:
    """Every section's checks (the finetune section's too, when there is one); SettingsError names the key.
    model.init_from's model and tokenizer are resolved first (`resolve_init_from`)."""
    _canonical_dtypes(s)
    resolve_init_from(s)
    t, o, data = s.train, s.optim, s.data
    _need(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    _need(t.batch_size > 0 and t.micro_batch > 0, "train.batch_size and train.micro_batch must be positive")
    _need(t.batch_size % t.micro_batch == 0,
          f"train.batch_size {t.batch_size} is not a multiple of micro_batch {t.micro_batch}")
    _need(t.mixed_precision in ("bf16", "fp32"),
          f"train.mixed_precision must be bf16 or fp32, got {t.mixed_precision!r}")
    _need(bool(data.paths), "data.paths is empty: name text files or folders to train on")
    _need(data.seq_len >= 2, f"data.seq_len must be >= 2, got {data.seq_len}")
    _need(0.0 <= data.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {data.val_fraction}")
    _need(data.encoding_errors in ("strict", "replace"), "data.encoding_errors must be strict or replace")
    _need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a positive number, got {o.lr}")
    _need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _need(o.warmup_steps >= 0 and (o.decay_steps is None or o.decay_steps > 0),
          "optim.warmup_steps must be >= 0 and optim.decay_steps positive or null")
    _need(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be positive or null, got {o.grad_clip}")
    _need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1 and o.eps > 0 and o.weight_decay >= 0,
          "optim: beta1/beta2 must be in [0, 1), eps positive, weight_decay >= 0")
    _need(s.eval.every >= 0 and s.eval.sequences >= 0, "eval.every and eval.sequences must be >= 0")
    _need(s.checkpoint.every >= 0 and s.checkpoint.keep >= 1,
          "checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    _need(s.checkpoint.resume in ("auto", "required", "never"), "checkpoint.resume must be auto, required or never")
    _need(s.export.dtype in ("bf16", "fp16", "fp32"), "export.dtype must be bf16, fp16 or fp32")
    _need(s.parallel.tp >= 1, "parallel.tp must be >= 1")
    _need(not (s.model.init_from and s.model.overrides), "model.overrides cannot change a model.init_from checkpoint")
    # torch 2.13: compiled TP blocks fail in DTensor's redistribute backward ('Tensor' has no '_local_tensor')
    _need(not (s.train.compile and s.parallel.tp > 1), "train.compile is not supported with parallel.tp > 1 yet: "
          "set train.compile=false (FSDP-only runs compile each block)")
    if not s.model.init_from:  # unknown names or override keys fail here, before any data is read
        ctx = model_args(s).max_seq_len
        _need(data.seq_len <= ctx, f"data.seq_len {data.seq_len} exceeds the model context {ctx} (max_seq_len)")
    if s.finetune is not None:
        validate_finetune(s)


FINETUNE_METHODS = ("full", "lora", "qlora")


def validate_finetune(s: RunSettings) -> None:
    """The `finetune` section's checks (called by `validate`)."""
    f = s.finetune
    _need(f.method in FINETUNE_METHODS,
          f"finetune.method must be one of {', '.join(FINETUNE_METHODS)}, got {f.method!r}")
    _need(f.format in FORMATS, f"finetune.format must be one of {', '.join(FORMATS)}, got {f.format!r}")
    _need(f.packing in ("pack", "pad"), f"finetune.packing must be pack or pad, got {f.packing!r}")
    _need(f.bad_data in POLICIES, f"finetune.bad_data must be one of {', '.join(POLICIES)}, got {f.bad_data!r}")
    _need(f.max_samples is None or f.max_samples > 0, "finetune.max_samples must be positive or null")
    _need(f.base_dtype in ("fp32", "bf16"), f"finetune.base_dtype must be fp32 or bf16, got {f.base_dtype!r}")
    if f.method == "full":
        return
    _need(f.base_dtype == "fp32" or s.train.mixed_precision == "bf16",
          "finetune.base_dtype bf16 needs train.mixed_precision bf16")
    try:
        lora_config(f)
    except LoRAError as e:
        raise SettingsError(f"finetune.lora_*: {e}") from None
    _need(s.parallel.tp == 1, "LoRA/QLoRA with parallel.tp > 1 is not supported yet: shard with FSDP (parallel.tp=1)")
    _need(not s.export.merged or bool(s.model.init_from),
          "export.merged needs model.init_from: the full-precision base the adapter is merged onto")
    if f.method == "qlora":
        _need(f.qlora_dtype in QUANT_DTYPES, f"finetune.qlora_dtype must be int4 or int8, got {f.qlora_dtype!r}")
        _need(f.qlora_dtype != "int4" or f.qlora_group_size in GROUP_SIZES,
              f"finetune.qlora_group_size must be one of {GROUP_SIZES}, got {f.qlora_group_size}")


# ---- resuming -----------------------------------------------------------------------------------------------

# Settings that make a checkpoint a different run: resuming with other values is refused.
RUN_DEFINING = ("seed", "model", "data.paths", "data.tokenizer", "data.seq_len", "data.val_fraction",
                "data.patterns", "data.bos", "data.eos", "train.batch_size", "finetune")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def settings_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(run-defining keys that differ, other keys that differ) between two settings dicts."""
    a, b = _flat(old), _flat(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    fixed = [k for k in changed if any(k == r or k.startswith(r + ".") for r in RUN_DEFINING)]
    return fixed, [k for k in changed if k not in fixed]
