"""LoRA applied to a Transformer from outside, merged back, and saved/loaded in PEFT's format.

`apply_lora(model, LoRAConfig(...))` wraps the chosen linear layers (any module with in/out features: nn.Linear,
or herd's int8/int4 linears for QLoRA) in `LoRALinear`: y = base(x) + (alpha / r) * B(A(dropout(x))), with A
Kaiming-uniform and B zero, so training starts from the base model exactly. Everything but A and B is frozen.

PEFT interop: adapters are written as `adapter_config.json` + `adapter_model.safetensors` with transformers'
module names. Meta's wq/wk rows are ordered differently from HF's q_proj/k_proj (see checkpoint.permute_qk); since
delta W = B @ A, only B's rows need that permutation.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .checkpoint import META_TO_HF, AtomicDir, CheckpointError, permute_qk, save_hf, save_meta, translate_key
from .config import read_json
from .loading import load_model, make_readable, save_tokenizer, tokenizer_source
from .model import Transformer

# Meta module names and the HF names PEFT uses for them.
TARGETS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj", "w2": "down_proj",
           "w3": "up_proj", "output": "lm_head"}
HF_TARGETS = {v: k for k, v in TARGETS.items()}


class LoRAError(ValueError):
    """A LoRA configuration or adapter that does not fit the model."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo"])  # Meta or HF names

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise LoRAError(f"LoRA alpha must be a positive number, got {self.alpha!r}")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        names = [HF_TARGETS.get(t, t) for t in self.targets]
        unknown = [t for t in names if t not in TARGETS]
        if unknown or not names:
            raise LoRAError(f"unknown LoRA target modules {unknown or self.targets} (choose from {sorted(TARGETS)} "
                            f"or their HF names {sorted(HF_TARGETS)})")
        self.targets = sorted(set(names), key=list(TARGETS).index)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scaling = alpha / rank
        w = next(base.buffers(), None) if getattr(base, "weight", None) is None else base.weight
        device = w.device if w is not None else None
        dtype = w.dtype if w is not None and w.is_floating_point() else torch.float32
        self.lora_a = nn.Linear(self.in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_b = nn.Linear(rank, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_a.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b.weight)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under autocast the matmuls cast anyway: x as it is is what lora_a saves for backward, not a cast copy
        a_in = x if torch.is_autocast_enabled(x.device.type) else x.to(self.lora_a.weight.dtype)
        delta = self.lora_b(self.lora_a(self.dropout(a_in)))
        return self.base(x) + (delta * self.scaling).to(x.dtype)

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_b.weight.float() @ self.lora_a.weight.float()) * self.scaling  # (out, in)


def _targets(model: Transformer, cfg: LoRAConfig) -> list[str]:
    return [n for n, m in model.named_modules() if n.rpartition(".")[2] in cfg.targets and not isinstance(m, LoRALinear)
            and hasattr(m, "in_features")]


def apply_lora(model: Transformer, cfg: LoRAConfig) -> list[str]:
    """Wrap the target linears of `model` in place and freeze everything else; returns the wrapped names."""
    if "output" in cfg.targets and model.args.tie_embeddings:
        raise LoRAError("LoRA on 'output' is not supported for tied embeddings (it would change tok_embeddings too)")
    for p in model.parameters():
        p.requires_grad_(False)
    names = _targets(model, cfg)
    if not names:
        raise LoRAError(f"no modules named {cfg.targets} in the model")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), cfg.rank, cfg.alpha, cfg.dropout))
    model.lora_config = cfg
    return names


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_a." in n or ".lora_b." in n]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter weights only, with herd's names (e.g. layers.0.attention.wq.lora_a.weight)."""
    return {n: p.detach() for n, p in model.named_parameters() if ".lora_a." in n or ".lora_b." in n}


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its base weight and unwrap (the base must be a float nn.Linear)."""
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        if not isinstance(m.base, nn.Linear):
            raise LoRAError(f"{name}: cannot merge into a quantized base ({type(m.base).__name__}); merge onto the "
                            "full-precision base checkpoint with `herd merge-lora BASE ADAPTER OUT`")
        m.base.weight += m.delta_weight().to(m.base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


# ---- PEFT format ----------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(.*)\.(lora_a|lora_b)\.weight$")


def _to_peft_key(key: str) -> str:
    module, which = _LORA_KEY.match(key).groups()
    hf = translate_key(module + ".weight", META_TO_HF).removesuffix(".weight")
    return f"base_model.model.{hf}.{'lora_A' if which == 'lora_a' else 'lora_B'}.weight"


def save_peft(model: Transformer, out: str | os.PathLike, *, base_model: str | None = None,
              state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors that peft loads onto LlamaForCausalLM.
    `state_dict`: the adapter tensors (herd names) to write instead of the model's own, e.g. gathered from shards."""
    from safetensors.torch import save_file

    cfg: LoRAConfig | None = getattr(model, "lora_config", None)
    if cfg is None:
        raise LoRAError("the model has no LoRA adapters")
    tensors = {}
    for key, w in (lora_state_dict(model) if state_dict is None else state_dict).items():
        module, which = _LORA_KEY.match(key).groups()
        if which == "lora_b" and module.endswith(("attention.wq", "attention.wk")):
            heads = model.args.n_heads if module.endswith("wq") else model.args.n_kv_heads
            w = permute_qk(w, heads)  # delta rows follow the base weight's row order
        tensors[_to_peft_key(key)] = w.float().contiguous()
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.rank, "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout, "target_modules": [TARGETS[t] for t in cfg.targets], "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": base_model,
    }
    with AtomicDir(out, overwrite=True) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return make_readable(out)


def load_peft(model: Transformer, adapter: str | os.PathLike) -> Transformer:
    """Apply a PEFT LoRA adapter (written by herd or by peft) to `model` in place."""
    from safetensors import safe_open

    folder = Path(adapter)
    try:
        cfg_json = read_json(folder / "adapter_config.json")
    except (OSError, ValueError) as e:
        raise LoRAError(f"{folder}: cannot read adapter_config.json ({e})") from None
    if cfg_json.get("peft_type") != "LORA":
        raise LoRAError(f"{folder}: peft_type {cfg_json.get('peft_type')!r} is not LORA")
    for flag in ("use_dora", "use_rslora", "fan_in_fan_out"):
        if cfg_json.get(flag):
            raise LoRAError(f"{folder}: {flag} adapters are not supported")
    targets = cfg_json.get("target_modules") or []
    if isinstance(targets, str):
        raise LoRAError(f"{folder}: target_modules as a regex is not supported; list the module names")
    cfg = LoRAConfig(rank=int(cfg_json.get("r", 8)), alpha=float(cfg_json.get("lora_alpha", 8)), dropout=0.0,
                     targets=list(targets))
    apply_lora(model, cfg)
    want = {_to_peft_key(k): k for k in lora_state_dict(model)}
    path = folder / "adapter_model.safetensors"
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:
        raise LoRAError(f"{path}: not a valid safetensors file ({e})") from None
    keys = set(f.keys())
    extra, missing = keys - set(want), set(want) - keys
    if extra or missing:
        raise LoRAError(f"{path}: adapter keys do not match the model "
                        f"(unexpected {sorted(extra)[:1]}, missing {sorted(missing)[:1]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pk, hk in want.items():
            w = f.get_tensor(pk)
            module = hk.rsplit(".", 2)[0]
            if hk.endswith("lora_b.weight") and module.endswith(("attention.wq", "attention.wk")):
                heads = model.args.n_heads if module.endswith("wq") else model.args.n_kv_heads
                w = permute_qk(w, heads, inverse=True)
            if w.shape != params[hk].shape:
                raise LoRAError(f"{path}: {pk} has shape {tuple(w.shape)}, the model needs {tuple(params[hk].shape)}")
            params[hk].copy_(w)
    return model


def merge_adapter(base: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *,
                  to: str = "hf", dtype: torch.dtype | None = None, overwrite: bool = False) -> Path:
    """`herd merge-lora BASE ADAPTER OUT`: base checkpoint + PEFT adapter -> merged checkpoint (HF or Meta), with the
    base's tokenizer beside it (a GGUF base's vocabulary as tokenizer.model), so the result chats at once."""
    if to not in ("hf", "meta"):
        raise CheckpointError(f"unknown target layout {to!r} (hf or meta)")
    model = load_model(base)
    # merge in float32, then write in the base's dtype unless asked otherwise
    base_dtype = model.tok_embeddings.weight.dtype
    model = model.float()
    load_peft(model, adapter)
    merge_lora(model)
    target = dtype or base_dtype
    save = save_hf if to == "hf" else save_meta
    folder = save(model, None, out, dtype=target, overwrite=overwrite)
    save_tokenizer(tokenizer_source(base), folder)
    return make_readable(folder)


__all__ = ["LoRAConfig", "LoRALinear", "LoRAError", "apply_lora", "lora_parameters", "lora_state_dict", "merge_lora",
           "save_peft", "load_peft", "merge_adapter"]
