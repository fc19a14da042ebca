"""herd's CPU decode kernels (herd.kernels): the int4 byte layout, each kernel against a dequantized or SDPA
reference, the attention routing, and use_cpu_kernels on a whole model in the engine."""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model as _tiny_model

from herd.generate import Engine
from herd.kernels import Bf16Linear, cpu_kernels, decode_sdpa, pack_int4, restore_linears, unpack_int4, use_cpu_kernels
from herd.quantize import (
    Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, quantize_model,
)
from herd.sampling import SamplingParams

needs_kernels = pytest.mark.skipif(not cpu_kernels(), reason="herd CPU kernels unavailable (no AVX-512 BF16 or compiler)")

tiny_model = functools.partial(_tiny_model, seed=0, std=0.3)  # tiny_model(name, dtype)


def test_int4_packing_layout():
    q = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    # byte j of each 64-weight block holds weight j (low nibble) and weight j + 32 (high nibble)
    assert packed[1, 5] == q[1, 5] | (q[1, 37] << 4)
    assert packed[2, 32 + 7] == q[2, 64 + 7] | (q[2, 64 + 39] << 4)


def int8_groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """x rounded to int8 with one scale (max |x| / 127) per `group` along the last dim, back in fp32."""
    xg = x.float().reshape(*x.shape[:-1], -1, group)
    scale = xg.abs().amax(-1, keepdim=True) / 127
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (torch.round(xg * (1 / scale)) * scale).reshape(x.shape)  # x * (1 / scale): the kernel's fp32 steps


@needs_kernels
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernels_match_the_dequantized_reference(rows, dtype):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 256, generator=g).to(dtype)
    xr = x.to(torch.bfloat16).float()  # the bf16 / int4 kernels round x to bf16
    w = torch.randn(77, 256, generator=g) * 0.05
    wb = w.bfloat16()
    tol = dict(atol=2e-2, rtol=1e-2)
    assert torch.allclose(torch.ops.herd.linear_bf16(x, wb).float(), xr @ wb.float().T, **tol)
    q, s = quantize_int8(w)
    assert torch.allclose(torch.ops.herd.linear_int8(x, q, s).float(), x.float() @ dequantize_int8(q, s).T, **tol)
    for gs in (32, 64, 128, 256):
        p, sc, mn = quantize_int4(w, gs)
        deq = dequantize_int4(p, sc, mn, gs)
        got = torch.ops.herd.linear_int4(x, p, sc, mn, gs).float()
        # the kernel's own arithmetic: x (as given, fp32 or bf16) rounded to int8 per group of gs, as llama.cpp
        # rounds x for its 4-bit types; the output then rounded to x's dtype
        assert torch.allclose(got, int8_groups(x, gs) @ deq.T, atol=2e-3, rtol=1e-2), gs
        # against the exact product: the int8 rounding of x costs ~1% of the output, far below the 4-bit weights' error
        exact = x.float() @ deq.T
        assert ((got - exact).norm() / exact.norm()).item() < 1.5e-2, gs
        deq = torch.ops.herd.dequantize_int4(p, sc, mn, gs)  # the prefill path
        assert torch.equal(deq, dequantize_int4(p, sc, mn, gs).bfloat16()), gs


@needs_kernels
def test_kernel_path_equals_fallback_path():
    lin = torch.nn.Linear(128, 40, bias=False)
    x = torch.randn(2, 3, 128)
    for mod in (Int8Linear.from_linear(lin), Int4Linear.from_linear(lin, 64)):
        with torch.no_grad():
            fast = mod(x)  # 6 rows: kernel
        slow = mod(x.requires_grad_())  # grad enabled on x: the PyTorch path
        x.requires_grad_(False)
        assert fast.shape == (2, 3, 40)
        assert torch.allclose(fast, slow.detach(), atol=1e-2, rtol=1e-2)


@needs_kernels
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("heads, kv_heads, head_dim",
                         [(8, 2, 64), (4, 4, 32), (6, 1, 16), (32, 8, 128), (24, 8, 128), (16, 1, 64), (3, 3, 64)])
def test_decode_attention_matches_sdpa(dtype, tol, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(heads * head_dim)
    B, S = 3, 33
    q = torch.randn(B, heads, 1, head_dim, generator=g).to(dtype)
    cache_k = torch.randn(4, kv_heads, 40, head_dim, generator=g).to(dtype)  # a cache: more rows and slots
    cache_v = torch.randn(4, kv_heads, 40, head_dim, generator=g).to(dtype)
    k, v = cache_k[:B, :, :S], cache_v[:B, :, :S]  # the strided views the model's cache hands out
    last = torch.tensor([32, 0, 17])  # ragged rows: row b may read slots 0..last[b]
    masks = [torch.arange(S)[None, None, None, :] <= last[:, None, None, None],
             torch.arange(S)[None, None, None, :] <= 20,  # one mask row for the whole batch
             torch.rand(B, 1, 1, S, generator=g) < 0.5, None]
    masks[2][:, :, :, 0] = True  # at least one slot per row
    for mask in masks:
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        got = torch.ops.herd.decode_attention(q, k, v, mask)
        assert got.dtype == dtype and got.shape == q.shape
        assert (got.float() - ref).abs().max() <= tol


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_decode_attention_never_reads_masked_slots(dtype, head_dim):
    """Unused cache slots may hold anything (torch.empty): NaN or inf there must not reach the output."""
    g = torch.Generator().manual_seed(head_dim)
    q = torch.randn(2, 8, 1, head_dim, generator=g).to(dtype)
    k, v = (torch.randn(2, 2, 37, head_dim, generator=g).to(dtype) for _ in range(2))
    mask = torch.arange(37)[None, None, None, :] <= torch.tensor([20, 35])[:, None, None, None]
    clean = torch.ops.herd.decode_attention(q, k, v, mask)
    k[~mask.expand(2, 2, 1, 37).squeeze(2)[..., None].expand_as(k)] = float("nan")
    v[..., 36:, :] = float("inf")
    assert torch.equal(torch.ops.herd.decode_attention(q, k, v, mask), clean)


@needs_kernels
def test_decode_sdpa_routes_only_decode_steps():
    q1, q4 = torch.randn(1, 4, 1, 32), torch.randn(1, 4, 4, 32)
    k, v = torch.randn(1, 2, 9, 32), torch.randn(1, 2, 9, 32)
    mask = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    sdpa = F.scaled_dot_product_attention
    got = decode_sdpa(q1, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(got, torch.ops.herd.decode_attention(q1, k, v, mask))
    assert torch.equal(decode_sdpa(q4, k, v, is_causal=False, enable_gqa=True), sdpa(q4, k, v, enable_gqa=True))
    qg = q1.clone().requires_grad_()
    assert torch.equal(decode_sdpa(qg, k, v, attn_mask=mask, enable_gqa=True),
                       sdpa(qg, k, v, attn_mask=mask, enable_gqa=True))
    with pytest.raises(RuntimeError, match="bool"):
        torch.ops.herd.decode_attention(q1, k, v, mask.float())
    with pytest.raises(RuntimeError, match="dtype"):
        torch.ops.herd.decode_attention(q1.bfloat16(), k, v, mask)
    with pytest.raises(RuntimeError, match="bad shapes"):  # no KV heads: an error, not a division by zero
        torch.ops.herd.decode_attention(q1, k[:, :0], v[:, :0], mask)
    with pytest.raises(RuntimeError, match="mask"):
        torch.ops.herd.decode_attention(q1, k, v, mask[..., :5])


@needs_kernels
@pytest.mark.parametrize("quant", [None, "int8"])
def test_cpu_kernels_in_the_engine(quant):
    """use_cpu_kernels swaps in the attention kernel: greedy decode is unchanged, compiled too (fp32 weights, and
    int8 weights whose linear layers already use the kernels)."""
    model = tiny_model("tiny")
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(15)  # peaked logits: the ids do not hinge on rounding
    if quant:
        quantize_model(model, quant)
    prompts = [[5, 17, 300, 42, 9], [7, 8]]

    def greedy(engine):
        rows = [[] for _ in prompts]
        for step in engine.generate(prompts, SamplingParams(temperature=0), max_new_tokens=20):
            for i, t in enumerate(step.tokens):
                if t is not None:
                    rows[i].append(t)
        return rows

    ref = greedy(Engine(model))
    use_cpu_kernels(model)
    assert all(vars(layer.attention)["sdpa"] is decode_sdpa for layer in model.layers)
    assert greedy(Engine(model)) == ref
    model.clear_caches()
    assert greedy(Engine(model, compile=True, min_kv_bucket=32)) == ref
    restore_linears(model)
    assert "sdpa" not in vars(model.layers[0].attention)


def test_use_cpu_kernels_keeps_weights_and_ties():
    model = tiny_model("tiny-tied", torch.bfloat16)
    tokens = torch.randint(0, 512, (1, 5))
    with torch.no_grad():
        ref = model(tokens)
    n = use_cpu_kernels(model)
    if cpu_kernels():
        assert n == 2 * 7 + 1 and isinstance(model.output, Bf16Linear)
        assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        assert torch.allclose(model(tokens), ref, atol=0.05, rtol=0.02)
    restore_linears(model)
    assert isinstance(model.output, torch.nn.Linear) and model.output.weight is model.tok_embeddings.weight
