"""herd's CPU decode kernels (herd.kernels): the int4 byte layout, each kernel against a dequantized or SDPA
reference, the attention routing, and use_cpu_kernels on a whole model in the engine."""

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import greedy_ids
from conftest import tiny_model as _tiny_model

from herd.kernels import (
    Bf16Linear, cpu_kernels, decode_sdpa, pack_int4, paged_decode_attention, paged_decode_reference, restore_linears,
    unpack_int4, use_cpu_kernels,
)
from herd.quantize import (
    Int4Linear, Int8Linear, dequantize_int4, dequantize_int8, quantize_int4, quantize_int8, quantize_model,
)

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

    ref = greedy_ids(model, prompts, 20)
    use_cpu_kernels(model)
    assert all(vars(layer.attention)["sdpa"] is decode_sdpa for layer in model.layers)
    assert greedy_ids(model, prompts, 20) == ref
    assert greedy_ids(model, prompts, 20, compile=True) == ref
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


# ---- decode attention over a paged KV cache -------------------------------------------------------------------


def paged_case(lens, heads, kv_heads, head_dim, bs, dtype, seed):
    """A pool whose blocks are dealt to the rows in shuffled order, 3 blocks listed by no row, 2 spare table columns
    per row holding -1: (q, k_pool, v_pool, block_table, seq_lens, unlisted block ids)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    nb = sum(need) + 3
    ids = torch.randperm(nb, generator=g).int()
    table = torch.full((len(lens), max(need) + 2), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        table[b, :n] = ids[used:used + n]
        used += n
    q = torch.randn(len(lens), heads, 1, head_dim, generator=g).to(dtype)
    k_pool, v_pool = (torch.randn(nb, kv_heads, bs, head_dim, generator=g).to(dtype) for _ in range(2))
    return q, k_pool, v_pool, table, torch.tensor(lens, dtype=torch.int32), ids[used:].long()


def paged_oracle(q, k_pool, v_pool, table, lens):
    """Each row's positions read one by one into a contiguous cache, SDPA over it in fp32 (no slots: zeros)."""
    bs = k_pool.shape[2]
    out = torch.zeros(q.shape)
    for b, n in enumerate(lens.tolist()):
        if n:
            pos = torch.arange(n)
            blocks = table[b].long()[pos // bs]
            k, v = (pool[blocks, :, pos % bs].transpose(0, 1)[None].float() for pool in (k_pool, v_pool))
            out[b] = F.scaled_dot_product_attention(q[b:b + 1].float(), k, v, enable_gqa=True)[0]
    return out


def poison_unused(k_pool, v_pool, table, lens, unlisted):
    """NaN / inf in every slot no row may read: past each row's length in its last block, blocks listed by no row;
    garbage in the table entries past each row's last block."""
    bs = k_pool.shape[2]
    for b, n in enumerate(lens.tolist()):
        if n % bs:
            k_pool[table[b, n // bs], :, n % bs:] = float("nan")
            v_pool[table[b, n // bs], :, n % bs:] = float("inf")
        table[b, -(-n // bs):] = 10**9 if b % 2 else -5
    k_pool[unlisted] = float("nan")
    v_pool[unlisted] = float("-inf")


def paged_lens(bs):
    return [0, 1, 2 * bs + bs // 2 + 1, 3 * bs, 37]  # empty, one token, a partial last block, full blocks, other


PAGED_FORMS = [(torch.bfloat16, 64, 2e-2), (torch.bfloat16, 128, 2e-2), (torch.bfloat16, 32, 2e-2),
               (torch.float32, 32, 1e-5), (torch.float32, 64, 1e-5), (torch.float32, 128, 1e-5)]


@needs_kernels
@pytest.mark.parametrize("bs", [1, 16, 64])
@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2), (8, 2), (16, 1)])
@pytest.mark.parametrize("dtype, head_dim, tol", PAGED_FORMS)
def test_paged_decode_attention_matches_sdpa(dtype, head_dim, tol, heads, kv_heads, bs):
    case = paged_case(paged_lens(bs), heads, kv_heads, head_dim, bs, dtype, seed=heads * head_dim + bs)
    q, k_pool, v_pool, table, lens, unlisted = case
    got = torch.ops.herd.paged_decode_attention(q, k_pool, v_pool, table, lens)
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.float() - paged_oracle(q, k_pool, v_pool, table, lens)).abs().max() <= tol
    assert torch.equal(got[0], torch.zeros_like(got[0]))  # seq_len 0: zeros
    poison_unused(k_pool, v_pool, table, lens, unlisted)
    assert torch.equal(torch.ops.herd.paged_decode_attention(q, k_pool, v_pool, table, lens), got)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_paged_decode_attention_equals_decode_attention(dtype):
    """The paged op and the contiguous one share their kernel bodies: the same cache in either layout, same bits."""
    lens = [40, 64, 17]
    q, k_pool, v_pool, table, lens_t, _ = paged_case(lens, 32, 8, 64, 16, dtype, seed=1)
    k, v = (torch.zeros(3, 8, 64, 64, dtype=dtype) for _ in range(2))
    for b, n in enumerate(lens):
        pos = torch.arange(n)
        k[b, :, :n] = k_pool[table[b].long()[pos // 16], :, pos % 16].transpose(0, 1)
        v[b, :, :n] = v_pool[table[b].long()[pos // 16], :, pos % 16].transpose(0, 1)
    mask = torch.arange(64)[None, None, None, :] < lens_t[:, None, None, None]
    assert torch.equal(torch.ops.herd.paged_decode_attention(q, k_pool, v_pool, table, lens_t),
                       torch.ops.herd.decode_attention(q, k, v, mask))


@needs_kernels
def test_paged_decode_attention_rejects_bad_inputs():
    q, k_pool, v_pool, table, lens, _ = paged_case([5, 20], 8, 2, 64, 16, torch.bfloat16, seed=2)
    op = torch.ops.herd.paged_decode_attention
    bad = table.clone()
    bad[1, 1] = k_pool.shape[0]  # a needed entry past the pool
    with pytest.raises(RuntimeError, match=r"block_table\[1, 1\]"):
        op(q, k_pool, v_pool, bad, lens)
    bad[1, 1] = -1
    with pytest.raises(RuntimeError, match="block id"):
        op(q, k_pool, v_pool, bad, lens)
    for n in (table.shape[1] * 16 + 1, -1):
        with pytest.raises(RuntimeError, match="seq_lens"):
            op(q, k_pool, v_pool, table, torch.tensor([5, n], dtype=torch.int32))
    with pytest.raises(RuntimeError, match="int32"):
        op(q, k_pool, v_pool, table.long(), lens)
    with pytest.raises(RuntimeError, match="int32"):
        op(q, k_pool, v_pool, table, lens.long())
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.float(), k_pool, v_pool, table, lens)
    with pytest.raises(RuntimeError, match="dtype"):
        op(q.half(), k_pool.half(), v_pool.half(), table, lens)
    with pytest.raises(RuntimeError, match="power of two"):
        op(q, k_pool[:, :, :12], v_pool[:, :, :12], table, lens)
    with pytest.raises(RuntimeError, match="bad shapes"):  # 8 query heads over 3 KV heads
        op(q, torch.cat([k_pool, k_pool[:, :1]], 1), torch.cat([v_pool, v_pool[:, :1]], 1), table, lens)
    with pytest.raises(RuntimeError, match="block_table"):  # one table row for two query rows
        op(q, k_pool, v_pool, table[:1], lens)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("bs", [1, 16])
def test_paged_decode_reference_matches_sdpa(dtype, tol, bs):
    """The PyTorch form (CUDA, autograd): unused slots and table entries may hold anything, empty rows give zeros."""
    q, k_pool, v_pool, table, lens, unlisted = paged_case(paged_lens(bs), 12, 4, 64, bs, dtype, seed=bs)
    ref = paged_oracle(q, k_pool, v_pool, table, lens)
    poison_unused(k_pool, v_pool, table, lens, unlisted)
    got = paged_decode_reference(q, k_pool, v_pool, table, lens)
    assert got.dtype == dtype and got.shape == q.shape
    assert (got.float() - ref).abs().max() <= tol
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    qg = q.float().requires_grad_()  # grad enabled: the wrapper takes the PyTorch form
    out = paged_decode_attention(qg, k_pool.float(), v_pool.float(), table, lens)
    out.sum().backward()
    assert torch.isfinite(qg.grad).all() and (out.detach() - ref).abs().max() <= 3e-2


@needs_kernels
@pytest.mark.parametrize("dtype, head_dim, tol", PAGED_FORMS)
def test_paged_decode_reference_equals_kernel(dtype, head_dim, tol):
    q, k_pool, v_pool, table, lens, unlisted = paged_case(paged_lens(16), 8, 2, head_dim, 16, dtype, seed=head_dim)
    poison_unused(k_pool, v_pool, table, lens, unlisted)
    with torch.no_grad():
        fast = paged_decode_attention(q, k_pool, v_pool, table, lens)
    assert torch.equal(fast, torch.ops.herd.paged_decode_attention(q, k_pool, v_pool, table, lens))
    assert (fast.float() - paged_decode_reference(q, k_pool, v_pool, table, lens).float()).abs().max() <= tol


@needs_kernels
def test_paged_decode_attention_compiles():
    q, k_pool, v_pool, table, lens, _ = paged_case([33, 0, 16], 8, 2, 64, 16, torch.bfloat16, seed=3)
    step = torch.compile(paged_decode_attention, fullgraph=True)
    with torch.no_grad():
        assert torch.equal(step(q, k_pool, v_pool, table, lens), paged_decode_attention(q, k_pool, v_pool, table, lens))


def test_paged_decode_reference_compiles():
    """Under torch.compile the PyTorch form gathers the whole table (no data-dependent shape, no device sync): the
    same output, with garbage in the unused table entries and NaN/inf in the unused slots."""
    q, k_pool, v_pool, table, lens, unlisted = paged_case([33, 0, 16], 8, 2, 64, 16, torch.float32, seed=3)
    poison_unused(k_pool, v_pool, table, lens, unlisted)
    step = torch.compile(paged_decode_reference, fullgraph=True)
    assert torch.allclose(step(q, k_pool, v_pool, table, lens), paged_oracle(q, k_pool, v_pool, table, lens), atol=1e-5)
