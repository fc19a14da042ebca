"""Weight-only quantization: int8 per output channel, int4 in groups along K.

Applied from outside the model by plain functions that swap `nn.Linear` modules: `quantize_model(model, "int8" |
"int4", group_size)` quantizes every linear layer in place (the output head included); `save_quantized` /
`load_quantized` write and read a folder that `--model` accepts (`herd quantize` is herd.convert.quantize_checkpoint).
On CPUs the int8/int4 modules decode with herd's kernels (herd.kernels); on GPUs under torch.compile as a fused
multiply + sum; everywhere else by dequantizing on the fly.

Formats: int8 W = q * scale (q in -127..127, scale = max|row| / 127, fp32). int4 W = q * scale + min per group of
G weights (q in 0..15, scale and min in bf16), two nibbles per byte in the layout the kernel reads (kernels.pack_int4).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs, read_json
from .kernels import Bf16Linear, cpu_kernels, kernel_ok, pack_int4, restore_linears, rows, swap_linears, unpack_int4
from .model import Transformer
from .tokenizer import TOKENIZER_COPY_FILES

QUANT_DTYPES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
QUANT_FILE = "herd_quant.json"
FORMAT_VERSION = 1

class QuantizeError(ValueError):
    """A model or checkpoint that cannot be quantized or loaded as asked."""


# ---- quantization math --------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) int8 in -127..127, scales (N,) fp32 with w ~= q * scales[:, None]."""
    wf = w.float()
    scales = (wf.abs().amax(dim=1) / 127).clamp(min=1e-10)
    q = torch.round(wf / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q.to(torch.float32) * scales[:, None]).to(dtype)


def _check_int4_shape(k: int, group_size: int) -> None:
    if group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if k % 64 or k % group_size:
        raise QuantizeError(f"int4 needs the input size ({k}) to be a multiple of 64 and of the group size {group_size}")


@torch.no_grad()
def quantize_int4(w: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> packed (N, K/2) uint8, scales and mins (N, K/G) bf16 with w ~= q * scale + min, q in 0..15.

    Asymmetric min/max per group (as gpt-fast and torchao's int4 weight-only); scale and min are rounded to bf16
    *before* q is chosen, so the stored numbers are exactly what dequantization uses.
    """
    n, k = w.shape
    _check_int4_shape(k, group_size)
    wg = w.float().reshape(n, k // group_size, group_size)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8).to(torch.bfloat16)
    mins = lo.to(torch.bfloat16)
    q = torch.round((wg - mins.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales, mins


def dequantize_int4(packed, scales, mins, group_size: int, dtype=torch.float32) -> torch.Tensor:
    n = packed.shape[0]
    q = unpack_int4(packed).reshape(n, -1, group_size).to(dtype)
    return (q * scales.to(dtype)[..., None] + mins.to(dtype)[..., None]).reshape(n, -1)


# ---- decode under torch.compile on GPUs ------------------------------------------------------------------------
# F.linear on a quantized weight first writes a full float copy of it, so int8/int4 decode read more bytes than bf16.
# Written as a broadcast multiply + sum instead, inductor fuses the unpacking and scaling into one reduction kernel
# that reads the packed weights once. Only for a few rows under torch.compile (eagerly it would build (M, N, K)).
FUSED_DECODE_DEVICES = {"cuda"}
FUSED_DECODE_MAX_ROWS = 4


def _fused_decode_ok(x: torch.Tensor) -> bool:
    return (x.device.type in FUSED_DECODE_DEVICES and torch.compiler.is_compiling()
            and x.numel() // x.shape[-1] <= FUSED_DECODE_MAX_ROWS)


def int8_decode_matmul(x: torch.Tensor, w: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (w * scales)^T for int8 w (N, K), as multiply + sum over K (fp32 sums)."""
    y = (x.unsqueeze(-2) * w.to(x.dtype)).sum(-1, dtype=torch.float32)
    return (y * scales).to(x.dtype)


def int4_decode_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor,
                       group_size: int) -> torch.Tensor:
    """x (..., K) @ W^T for herd's packed int4 (low nibbles: the first 32 weights of each 64, high: the last 32).
    The halves stay apart: written as dequantize_int4 + sum, inductor materializes its torch.cat of the nibbles
    (two (N, K/2) buffers per call, seen in the generated code) instead of reading the packed bytes once."""
    n, blocks, dt = packed.shape[0], packed.shape[1] // 32, x.dtype
    w = packed.view(n, blocks, 32)
    sc, mn = scales.to(dt), mins.to(dt)
    if group_size == 32:  # the two halves of a 64-weight block are groups 2b and 2b + 1
        s_lo, s_hi, m_lo, m_hi = sc[:, 0::2], sc[:, 1::2], mn[:, 0::2], mn[:, 1::2]
    else:  # both halves in group 64b // G
        s_lo = s_hi = sc.repeat_interleave(group_size // 64, dim=1)
        m_lo = m_hi = mn.repeat_interleave(group_size // 64, dim=1)
    w_lo = (w & 0x0F).to(dt) * s_lo[..., None] + m_lo[..., None]  # (N, K/64, 32)
    w_hi = (w >> 4).to(dt) * s_hi[..., None] + m_hi[..., None]
    xb = x.reshape(*x.shape[:-1], 1, blocks, 2, 32)
    y = (xb[..., 0, :] * w_lo).sum((-2, -1), dtype=torch.float32) + \
        (xb[..., 1, :] * w_hi).sum((-2, -1), dtype=torch.float32)
    return y.to(dt)


# ---- modules ------------------------------------------------------------------------------------------------


class Int8Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear) -> "Int8Linear":
        m = cls(lin.in_features, lin.out_features, device="meta")
        m.weight, m.scales = quantize_int8(lin.weight)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_ok(x, 64):
            y = torch.ops.herd.linear_int8(rows(x), self.weight, self.scales)
            return y.view(*x.shape[:-1], self.out_features)
        if _fused_decode_ok(x):
            return int8_decode_matmul(x, self.weight, self.scales)
        # gpt-fast's form: exact integer weights in the activation dtype, per-channel scale after the matmul
        return F.linear(x, self.weight.to(x.dtype)) * self.scales.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class Int4Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, group_size: int = 128, device=None):
        super().__init__()
        _check_int4_shape(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        ng = in_features // group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(out_features, ng, dtype=torch.bfloat16, device=device))
        self.register_buffer("mins", torch.zeros(out_features, ng, dtype=torch.bfloat16, device=device))

    @classmethod
    def from_linear(cls, lin: nn.Linear, group_size: int) -> "Int4Linear":
        m = cls(lin.in_features, lin.out_features, group_size, device="meta")
        m.weight, m.scales, m.mins = quantize_int4(lin.weight, group_size)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if kernel_ok(x, 128):  # the kernel takes 128 weights per step (every Llama width is a multiple)
            y = torch.ops.herd.linear_int4(rows(x), self.weight, self.scales, self.mins, self.group_size)
            return y.view(*x.shape[:-1], self.out_features)
        if _fused_decode_ok(x):
            return int4_decode_matmul(x, self.weight, self.scales, self.mins, self.group_size)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.shape[-1] % 64 == 0 and cpu_kernels():
            # a bf16 prefill: dequantize to bf16 in one pass (fp32 inputs keep the exact fp32 path below)
            w = torch.ops.herd.dequantize_int4(self.weight, self.scales, self.mins, self.group_size)
            return F.linear(x, w.to(x.dtype))
        return F.linear(x, dequantize_int4(self.weight, self.scales, self.mins, self.group_size, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}"


# ---- model transforms ---------------------------------------------------------------------------------------


@torch.no_grad()
def quantize_model(model: Transformer, dtype: str, group_size: int = 128) -> Transformer:
    """Quantize every linear layer of `model` in place (weights are replaced one layer at a time)."""
    if dtype not in QUANT_DTYPES:
        raise QuantizeError(f"quantization dtype must be one of {QUANT_DTYPES}, got {dtype!r}")
    restore_linears(model)
    if dtype == "int4":
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear):
                try:
                    _check_int4_shape(m.in_features, group_size)
                except QuantizeError as e:
                    raise QuantizeError(f"{name}: {e}") from None
    if dtype == "int8":
        swap_linears(model, lambda _, lin: Int8Linear.from_linear(lin))
    else:
        swap_linears(model, lambda _, lin: Int4Linear.from_linear(lin, group_size))
    model.quantization = {"dtype": dtype, "group_size": group_size if dtype == "int4" else None}
    return model


def weight_bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every linear layer (scales included) plus one embedding row."""
    total = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, Bf16Linear, Int8Linear, Int4Linear)):
            total += sum(t.numel() * t.element_size() for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)))
    emb = model.tok_embeddings.weight
    return total + emb.shape[1] * emb.element_size()


# ---- checkpoint ---------------------------------------------------------------------------------------------


def is_quantized_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / QUANT_FILE).is_file()


def _build(args: ModelArgs, meta: dict) -> Transformer:
    with torch.device("meta"):
        model = Transformer(args)
    dtype, gs = meta["dtype"], meta.get("group_size")
    if dtype == "int8":
        swap_linears(model, lambda _, lin: Int8Linear(lin.in_features, lin.out_features, device="meta"))
    else:
        swap_linears(model, lambda _, lin: Int4Linear(lin.in_features, lin.out_features, gs, device="meta"))
    model.quantization = {"dtype": dtype, "group_size": gs}
    return model



def save_quantized(model: Transformer, out: str | os.PathLike, *, source: str | None = None,
                   tokenizer_from: str | os.PathLike | None = None, report: dict | None = None) -> Path:
    """Write `herd_quant.json` + `model.safetensors` (+ the source's tokenizer files) into a new folder `out`."""
    from safetensors.torch import save_file

    q = getattr(model, "quantization", None)
    if not q:
        raise QuantizeError("the model is not quantized; call quantize_model first")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise QuantizeError(f"{out} exists and is not empty")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "herd-quant"})
    meta = {"format": "herd-quant", "version": FORMAT_VERSION, **q, "config": model.args.to_params(),
            "source": source, "report": report or {}}
    (tmp / QUANT_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if tokenizer_from is not None and Path(tokenizer_from).is_dir():
        for name in TOKENIZER_COPY_FILES:
            f = Path(tokenizer_from) / name
            if f.is_file():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, tmp / name)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out


def load_quantized(path: str | os.PathLike, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                   ) -> Transformer:
    """A quantized Transformer from a folder written by `save_quantized` (strict keys, shapes and dtypes).

    `dtype` casts the unquantized tensors (embeddings, norms), which set the activation dtype; default: as stored.
    """
    from safetensors.torch import load_file

    path = Path(path)
    try:
        meta = read_json(path / QUANT_FILE)
    except (OSError, ValueError) as e:
        raise QuantizeError(f"cannot read {path / QUANT_FILE}: {e}") from None
    if meta.get("format") != "herd-quant" or meta.get("version") != FORMAT_VERSION:
        raise QuantizeError(f"{path}: not a herd-quant v{FORMAT_VERSION} checkpoint")
    if meta.get("dtype") not in QUANT_DTYPES:
        raise QuantizeError(f"{path}: unknown quantization dtype {meta.get('dtype')!r}")
    model = _build(ModelArgs.from_params(meta["config"]), meta)
    sd = load_file(str(path / "model.safetensors"))
    expected = model.state_dict()
    missing, extra = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or extra:
        raise QuantizeError(f"{path}: missing tensors {missing[:3]}, unexpected tensors {extra[:3]}")
    for k, v in expected.items():
        same_kind = v.dtype == sd[k].dtype or (v.is_floating_point() and sd[k].is_floating_point())
        if v.shape != sd[k].shape or not same_kind:
            raise QuantizeError(f"{path}: {k} is {tuple(sd[k].shape)} {sd[k].dtype}, expected {tuple(v.shape)} {v.dtype}")
        if dtype is not None and v.dtype == torch.float32 and sd[k].is_floating_point():  # not a quantized buffer
            sd[k] = sd[k].to(dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.to(device)
