"""herd's CPU decode kernels (csrc/cpu_gemv.cpp): the loader and its self-test, the linears and the one-token
attention they provide, and `use_cpu_kernels(model)`, which routes a CPU model's decode through them.

They serve bf16 models as much as quantized ones: `linear_bf16`, `linear_int8`, `linear_int4` (herd.quantize's
int8/int4 modules call the last two), `decode_attention` and `paged_decode_attention` (the same kernel reading a
paged KV cache's block pool in place).

Why our own kernels (measured on a 2-core AVX-512 Xeon, docs/generation.md has the table): batch-1 decode streams
every weight once per token, so it is bound by memory bandwidth. PyTorch's `_weight_int8pack_mm` and
`_weight_int4pack_mm_for_cpu` (what torchao's CPU int8/int4 weight-only layouts call) stream weights at about half
the machine's read bandwidth, and eager bf16 `F.linear` at about 65%. `csrc/cpu_gemv.cpp` (built on first use
with the system compiler) reaches 85-95%. Every other case (prefill, CUDA, training, CPUs without AVX-512 BF16)
takes a plain PyTorch path.

The int4 byte layout is the kernel's, so it is defined here (`pack_int4` / `unpack_int4`): per 64 weights, byte j
holds weight j in its low nibble and weight j + 32 in its high nibble.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .model import Attention

log = logging.getLogger(__name__)

KERNEL_MAX_ROWS = 16  # rows of x (batch x tokens) up to which the int8/int4 kernels beat a dequantize + matmul
# bf16 has no dequantize to save: F.linear's GEMM wins from 5 rows on (1B shape, 2 threads: at 4 rows the kernel
# takes 0.61 ms vs 0.91 for a 2048x8192 layer and 18.0 vs 18.6 for the 128256-row head; at 6 rows 1.12 vs 0.92 and
# 31.7 vs 18.9)
BF16_KERNEL_MAX_ROWS = 4

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
    """Whether herd's AVX-512 decode kernels are loaded (building them on first use; ~30 s once, then cached in
    torch's extensions folder, `$TORCH_EXTENSIONS_DIR` or ~/.cache/torch_extensions, as herd_cpu_gemv-<hash>).

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
        import fcntl
        import hashlib
        import sys

        from torch.utils.cpp_extension import get_default_build_root, load

        # Built into a folder of its own, keyed by what the binary depends on (the source, the flags, torch, Python
        # and the CPU for -march=native), so two herd installs on one machine never rebuild each other's kernels.
        sources = [Path(__file__).with_name("csrc") / "cpu_gemv.cpp"]
        flags = ["-O3", "-march=native", "-fopenmp"]
        key = hashlib.sha256()
        for part in [*(p.read_bytes() for p in sources), " ".join(flags), torch.__version__, sys.version,
                     " ".join(sorted(_cpu_flags()))]:
            key.update(part if isinstance(part, bytes) else part.encode())
            key.update(b"\0")
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
        build_dir = root / f"herd_cpu_gemv-{key.hexdigest()[:16]}"
        build_dir.mkdir(parents=True, exist_ok=True)
        # torch's FileBaton is a bare O_EXCL file named `lock` without an owner, which a killed build leaves behind
        # and every later start then waits on forever. herd builds under an flock of its own, which the kernel drops
        # when its holder dies: whoever holds it knows that no live herd process is building here, so a `lock`
        # file it finds is stale and is removed.
        with open(build_dir / "herd.lock", "a+") as guard:
            try:
                fcntl.flock(guard, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print("waiting for another herd process that is building the CPU kernels ...", file=sys.stderr,
                      flush=True)
                fcntl.flock(guard, fcntl.LOCK_EX)
            stale = build_dir / "lock"
            if stale.exists():
                log.warning("removing %s, a kernel build lock left by a process that was killed", stale)
                stale.unlink(missing_ok=True)
            if not (build_dir / "herd_cpu_gemv.so").exists():
                print("building herd's CPU kernels (about 30 s, once)", file=sys.stderr, flush=True)
            load(name="herd_cpu_gemv", sources=[str(p) for p in sources], extra_cflags=flags,
                 build_directory=str(build_dir), is_python_module=False, verbose=False)
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

    def fake_attention(q, *rest):
        return torch.empty_like(q, memory_format=torch.contiguous_format)

    for name, fn in (("linear_bf16", fake), ("linear_int8", fake), ("linear_int4", fake),
                     ("dequantize_int4", fake_dequantize), ("decode_attention", fake_attention),
                     ("paged_decode_attention", fake_attention)):
        try:
            torch.library.register_fake(f"herd::{name}")(fn)
        except RuntimeError:  # already registered in this process
            pass


def _self_test() -> bool:
    """Each kernel against a float reference on random inputs (int8/int4 weights made directly in their layouts)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 128, generator=g).bfloat16()
    wb = (torch.randn(37, 128, generator=g) * 0.1).bfloat16()
    close = lambda a, b, tol: torch.allclose(a.float(), b, atol=tol, rtol=tol)  # noqa: E731
    ok = close(torch.ops.herd.linear_bf16(x, wb), x.float() @ wb.float().T, 1e-2)
    q8 = torch.randint(-127, 128, (37, 128), generator=g, dtype=torch.int8)
    s8 = torch.rand(37, generator=g) * 1e-3 + 1e-4
    ok &= close(torch.ops.herd.linear_int8(x, q8, s8), x.float() @ (q8.float() * s8[:, None]).T, 1e-2)
    q4 = torch.randint(0, 16, (37, 128), generator=g, dtype=torch.uint8)
    for gs in (32, 64):
        sc = (torch.rand(37, 128 // gs, generator=g) * 1e-2).bfloat16()
        mn = (-torch.rand(37, 128 // gs, generator=g) * 1e-1).bfloat16()
        deq = (q4.float().view(37, -1, gs) * sc.float()[..., None] + mn.float()[..., None]).view(37, 128)
        packed = pack_int4(q4)
        ok &= close(torch.ops.herd.linear_int4(x, packed, sc, mn, gs), x.float() @ deq.T, 2e-2)
        ok &= close(torch.ops.herd.dequantize_int4(packed, sc, mn, gs), deq, 1e-2)
    if not ok:
        log.warning("herd CPU kernels failed their self-test; using the PyTorch path")
    return bool(ok)


def kernel_ok(x: torch.Tensor, k_multiple: int, max_rows: int = KERNEL_MAX_ROWS) -> bool:
    """Use a CPU kernel for this input? (CPU, at most `max_rows` rows, inference only, kernels loaded)."""
    return (
        x.device.type == "cpu"
        and x.shape[-1] % k_multiple == 0
        and x.numel() // x.shape[-1] <= max_rows
        and not (torch.is_grad_enabled() and x.requires_grad)
        and cpu_kernels()
    )


def rows(x: torch.Tensor) -> torch.Tensor:
    """(..., K) -> (M, K): the 2-D view the kernels take."""
    return x.reshape(-1, x.shape[-1])


# ---- the int4 layout the kernel reads -------------------------------------------------------------------------


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q (N, K) uint8 in 0..15 -> (N, K/2): per 64 weights, byte j = q[j] | q[j + 32] << 4 (the kernel's layout)."""
    n, k = q.shape
    blocks = q.reshape(n, k // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.reshape(n, half // 32, 1, 32)
    return torch.cat((blocks & 0x0F, blocks >> 4), dim=2).reshape(n, half * 2)



# ---- modules and model transforms ---------------------------------------------------------------------------


class Bf16Linear(nn.Module):
    """A bf16 linear layer (the same Parameter as the nn.Linear it replaces) that decodes with the CPU kernel."""

    def __init__(self, weight: nn.Parameter):
        super().__init__()
        self.weight = weight
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.bfloat16 and kernel_ok(x, 32, BF16_KERNEL_MAX_ROWS):
            y = torch.ops.herd.linear_bf16(rows(x), self.weight)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


def swap_linears(model: nn.Module, make) -> list[str]:
    """Replace every nn.Linear child by make(name, linear); returns the replaced names."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(name, getattr(parent, child)))
    return names


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


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor) -> torch.Tensor:
    """One-token attention over a paged KV cache: q (B, H, 1, D); k_pool, v_pool (num_blocks, KVH, block_size, D);
    block_table (B, max_blocks) int32: position p of row b is at offset p % block_size of block
    block_table[b, p // block_size]; seq_lens (B,) int32: row b attends to positions 0 .. seq_lens[b] - 1 (none:
    zeros). -> (B, H, 1, D) in q's dtype, GQA by Meta's grouping. Table entries past a row's last block and pool
    slots past its length are never used. herd's CPU kernel where it applies, else `paged_decode_reference`."""
    if (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float32) and k_pool.dtype == q.dtype
            and v_pool.dtype == q.dtype and q.shape[-1] % 16 == 0 and not (torch.is_grad_enabled() and q.requires_grad)
            and cpu_kernels()):
        return torch.ops.herd.paged_decode_attention(q, k_pool, v_pool, block_table.int(), seq_lens.int())
    return paged_decode_reference(q, k_pool, v_pool, block_table, seq_lens)


def paged_decode_reference(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_table: torch.Tensor,
                           seq_lens: torch.Tensor) -> torch.Tensor:
    """paged_decode_attention in plain PyTorch (CUDA, autograd, the tests' oracle): each row's blocks gathered into a
    contiguous cache, positions >= its length masked (and zeroed, so NaN/inf in unused slots cannot leak), SDPA.
    The gather spans the blocks the longest row needs when seq_lens is on the CPU (eager), else the whole table
    (no device sync, static shapes under torch.compile / CUDA graphs: pass a table trimmed to the bucket)."""
    B, KVH, bs, D = q.shape[0], k_pool.shape[1], k_pool.shape[2], k_pool.shape[3]
    n = block_table.shape[1]
    if seq_lens.device.type == "cpu" and B and not torch.compiler.is_compiling():
        n = min(n, max(1, -(-int(seq_lens.max()) // bs)))
    if n == 0:
        return torch.zeros_like(q, memory_format=torch.contiguous_format)
    table = block_table[:, :n].long().clamp(0, k_pool.shape[0] - 1)
    pos = torch.arange(n * bs, device=q.device)
    live = pos < seq_lens.to(q.device, torch.long)[:, None]  # (B, n * bs)
    k, v = (torch.where(live[:, None, :, None], pool[table].transpose(1, 2).reshape(B, KVH, n * bs, D), 0).to(q.dtype)
            for pool in (k_pool, v_pool))
    mask = (live | (pos == 0))[:, None, None, :]  # slot 0 (zeroed) for empty rows, whose output is zeroed below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return torch.where((seq_lens.to(q.device) > 0)[:, None, None, None], out, 0)


def use_cpu_kernels(model: nn.Module) -> int:
    """Route a CPU model's decode through herd's kernels: bf16 nn.Linear layers (returns how many were swapped)
    and the attention of one-token steps (`decode_sdpa`)."""
    if not cpu_kernels():
        return 0
    def swap(_, lin: nn.Linear) -> nn.Module:
        w = lin.weight
        return Bf16Linear(w) if lin.bias is None and w.dtype == torch.bfloat16 and w.device.type == "cpu" else lin

    swap_linears(model, swap)
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

