"""Weight-only quantization (int8 per output channel, int4 in groups along K) and herd's CPU decode kernels.

Everything here is applied from outside the model by plain functions that swap `nn.Linear` modules:
`quantize_model(model, "int8" | "int4", group_size)` quantizes every linear layer in place (the output head
included), `use_cpu_kernels(model)` routes bf16 linears through the CPU decode kernel, and
`save_quantized` / `load_quantized` write and read a folder that `--model` accepts.

Why our own kernels (measured on a 2-core AVX-512 Xeon, docs/generation.md has the table): batch-1 decode streams
every weight once per token, so it is bound by memory bandwidth. PyTorch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (what torchao's CPU int8/int4 weight-only layouts call) stream weights at about half
the machine's read bandwidth, and eager bf16 `F.linear` at about 65%. `csrc/cpu_gemv.cpp` (built on first use
with the system compiler) reaches 85-95%. Every other case (prefill, CUDA, training, CPUs without AVX-512 BF16)
takes a plain PyTorch path that dequantizes on the fly.

Formats: int8 W = q * scale (q in -127..127, scale = max|row| / 127, fp32). int4 W = q * scale + min per group of
G weights (q in 0..15, scale and min in bf16), two nibbles per byte in the layout the kernel reads.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelArgs
from .model import Attention, Transformer

log = logging.getLogger(__name__)

QUANT_DTYPES = ("int8", "int4")
GROUP_SIZES = (32, 64, 128, 256)
QUANT_FILE = "herd_quant.json"
FORMAT_VERSION = 1
KERNEL_MAX_ROWS = 16  # rows of x (batch x tokens) up to which the CPU kernels beat a dequantize + matmul


class QuantizeError(ValueError):
    """A model or checkpoint that cannot be quantized or loaded as asked."""


# ---- CPU kernels --------------------------------------------------------------------------------------------

_KERNELS: bool | None = None


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_kernels(build: bool = True) -> bool:
    """Whether herd's AVX-512 decode kernels are loaded (building them on first use; ~30 s once, then cached).

    Off when HERD_CPU_KERNELS=0, on CPUs without AVX-512 BF16, without a C++ compiler, or if the self-test fails.
    """
    global _KERNELS
    if _KERNELS is not None or not build:
        return bool(_KERNELS)
    _KERNELS = False
    if os.environ.get("HERD_CPU_KERNELS", "1") == "0":
        return False
    if not {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"} <= _cpu_flags():
        return False
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("csrc") / "cpu_gemv.cpp"
        load(name="herd_cpu_gemv", sources=[str(src)], extra_cflags=["-O3", "-march=native", "-fopenmp"],
             is_python_module=False, verbose=False)
        _register_fakes()
        _KERNELS = _self_test()
    except Exception as e:  # no compiler, no ninja, build error: the PyTorch path still works
        log.warning("herd CPU kernels unavailable (%s); using the PyTorch path", str(e).splitlines()[0][:200])
    return _KERNELS


def _register_fakes() -> None:
    """Shape-only versions of the kernels, so torch.compile can trace through them."""

    def fake(x, w, *rest):
        return x.new_empty(x.shape[0], w.shape[0])

    def fake_dequantize(w, scales, mins, group_size):
        return w.new_empty(w.shape[0], w.shape[1] * 2, dtype=torch.bfloat16)

    def fake_attention(q, k, v, mask):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    for name, fn in (("linear_bf16", fake), ("linear_int8", fake), ("linear_int4", fake),
                     ("dequantize_int4", fake_dequantize), ("decode_attention", fake_attention)):
        try:
            torch.library.register_fake(f"herd::{name}")(fn)
        except RuntimeError:  # already registered in this process
            pass


def _self_test() -> bool:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g).bfloat16()
    w = torch.randn(37, 128, generator=g) * 0.1
    wb = w.bfloat16()
    ok = torch.allclose(torch.ops.herd.linear_bf16(x, wb).float(), x.float() @ wb.float().T, atol=1e-2, rtol=1e-2)
    q, s = quantize_int8(w)
    ok &= torch.allclose(torch.ops.herd.linear_int8(x, q, s).float(), x.float() @ dequantize_int8(q, s).T,
                         atol=1e-2, rtol=1e-2)
    for gs in (32, 64):
        p, sc, mn = quantize_int4(w, gs)
        deq = dequantize_int4(p, sc, mn, gs)
        ok &= torch.allclose(torch.ops.herd.linear_int4(x, p, sc, mn, gs).float(), x.float() @ deq.T, atol=2e-2, rtol=2e-2)
        ok &= torch.allclose(torch.ops.herd.dequantize_int4(p, sc, mn, gs).float(), deq, atol=1e-2, rtol=1e-2)
    if not ok:
        log.warning("herd CPU kernels failed their self-test; using the PyTorch path")
    return bool(ok)


def _kernel_ok(x: torch.Tensor, k_multiple: int) -> bool:
    """Use a CPU kernel for this input? (CPU, few rows, inference only, kernels loaded)."""
    return (
        x.device.type == "cpu"
        and x.shape[-1] % k_multiple == 0
        and x.numel() // x.shape[-1] <= KERNEL_MAX_ROWS
        and not (torch.is_grad_enabled() and x.requires_grad)
        and cpu_kernels()
    )


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


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 in 0..15 -> (N, K/2): per 64 weights, byte j = q[j] | q[j + 32] << 4 (the kernel's layout)."""
    n, k = q.shape
    blocks = q.reshape(n, k // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.reshape(n, half // 32, 1, 32)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(n, half * 2)


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


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


class Bf16Linear(nn.Module):
    """A bf16 linear layer (the same Parameter as the nn.Linear it replaces) that decodes with the CPU kernel."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and _kernel_ok(x, 32):
            y = torch.ops.herd.linear_bf16(_rows(x), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


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
        if _kernel_ok(x, 64):
            y = torch.ops.herd.linear_int8(_rows(x), self.weight, self.scales)
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
        if _kernel_ok(x, 128):  # the kernel takes 128 weights per step (every Llama width is a multiple)
            y = torch.ops.herd.linear_int4(_rows(x), self.weight, self.scales, self.mins, self.group_size)
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


def _swap_linears(model: nn.Module, make) -> list[str]:
    """Replace every nn.Linear child by make(name, linear); returns the replaced names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
    return names


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
        _swap_linears(model, lambda _, lin: Int8Linear.from_linear(lin))
    else:
        _swap_linears(model, lambda _, lin: Int4Linear.from_linear(lin, group_size))
    model.quantization = {"dtype": dtype, "group_size": group_size if dtype == "int4" else None}
    return model


def decode_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
    """F.scaled_dot_product_attention, with herd's CPU kernel for one-token decode steps (q of length 1 over the
    cache, a bool mask or none). At the 1B shape (16 layers) SDPA's CPU kernel took ~3 ms of a compiled int8 step
    and this one ~0.7 ms; the step got 3.7% faster (docs/generation.md)."""
    if (q.shape[2] == 1 and not is_causal and not kw and q.device.type == "cpu" and q.shape[-1] % 16 == 0
            and q.dtype in (torch.bfloat16, torch.float32) and k.dtype == q.dtype and v.dtype == q.dtype
            and (attn_mask is None or attn_mask.dtype == torch.bool)
            and not (torch.is_grad_enabled() and q.requires_grad) and cpu_kernels()):
        return torch.ops.herd.decode_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa,
                                          **kw)


def use_cpu_kernels(model: nn.Module) -> int:
    """Route a CPU model's decode through herd's kernels: bf16 nn.Linear layers (returns how many were swapped)
    and the attention of one-token steps (`decode_sdpa`)."""
    if not cpu_kernels():
        return 0
    def swap(_, lin: nn.Linear) -> nn.Module:
        w = lin.weight
        return Bf16Linear(w) if lin.bias is None and w.dtype == torch.bfloat16 and w.device.type == "cpu" else lin

    _swap_linears(model, swap)
    for m in model.modules():
        if isinstance(m, Attention):
            m.sdpa = decode_sdpa
    return sum(isinstance(m, Bf16Linear) for m in model.modules())


def restore_linears(model: nn.Module) -> None:
    """Undo use_cpu_kernels: Bf16Linear -> nn.Linear holding the same weight Parameter, SDPA for attention."""
    for m in model.modules():
        if isinstance(m, Attention) and "sdpa" in vars(m):
            del m.sdpa
    for name, mod in list(model.named_modules()):
        if isinstance(mod, Bf16Linear):
            lin = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
            lin.weight = mod.weight
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, lin)


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
        _swap_linears(model, lambda _, lin: Int8Linear(lin.in_features, lin.out_features, device="meta"))
    else:
        _swap_linears(model, lambda _, lin: Int4Linear(lin.in_features, lin.out_features, gs, device="meta"))
    model.quantization = {"dtype": dtype, "group_size": gs}
    return model


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "original/tokenizer.model")


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
        for name in TOKENIZER_FILES:
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
        meta = json.loads((path / QUANT_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
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


# ---- perplexity and the quantize command --------------------------------------------------------------------


def perplexity(model: Transformer, ids: list[int], window: int = 512) -> float:
    """Perplexity of `ids` in windows of `window` tokens that score fresh tokens only (evaluate.perplexity)."""
    from .evaluate import perplexity as strided

    model.clear_caches()
    window = max(2, min(window, len(ids), model.args.max_seq_len))
    return strided(model, ids, window=window, stride=window - 1).perplexity


def default_eval_text() -> str:
    """Text that exists on every machine: the source of Python's textwrap and string modules (PSF licence)."""
    import string
    import textwrap

    return "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string))


def eval_ids(src: str | os.PathLike, vocab_size: int, text: str, n_tokens: int) -> list[int]:
    """Tokenize with the checkpoint's tokenizer (or the default Llama 3 one); byte ids when the vocab doesn't fit."""
    from .tokenizer import load_tokenizer

    from .api import _tokenizer_source

    try:
        tok = load_tokenizer(_tokenizer_source(Path(src)))
        if tok.n_words == vocab_size:
            return tok.encode(text, bos=True)[: n_tokens + 1]
    except (OSError, ValueError):
        pass
    return [b % vocab_size for b in text.encode()][: n_tokens + 1]


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, dtype: str, group_size: int = 128, *,
                        eval_text: str | None = None, eval_tokens: int = 512) -> dict:
    """Load `src`, measure perplexity, quantize, measure again, write `out`. Returns the report."""
    from .checkpoint import load_model

    if dtype not in QUANT_DTYPES:
        raise QuantizeError(f"quantization dtype must be one of {QUANT_DTYPES}, got {dtype!r}")
    if dtype == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise QuantizeError(f"{out} exists and is not empty")
    model = load_model(src, dtype=torch.bfloat16).eval()
    ids = eval_ids(src, model.args.vocab_size, eval_text or default_eval_text(), eval_tokens)
    before = perplexity(model, ids) if eval_tokens > 0 else None
    quantize_model(model, dtype, group_size)
    after = perplexity(model, ids) if eval_tokens > 0 else None
    report = {"dtype": dtype, "group_size": group_size if dtype == "int4" else None, "eval_tokens": len(ids) - 1,
              "ppl_bf16": before, "ppl_quantized": after,
              "ppl_change_pct": None if before is None else 100 * (after - before) / before,
              "weight_bytes_per_token": weight_bytes_per_token(model)}
    save_quantized(model, out, source=str(src), tokenizer_from=src, report=report)
    return report
