"""Weight-only int8/int4: the math, the CPU kernels against a dequantized reference, checkpoints, the CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from herd.checkpoint import save_hf
from herd.cli import main
from herd.config import get_config
from herd.generate import Engine, SamplingParams
from herd.model import Transformer
from herd.quantize import (
    Bf16Linear, Int4Linear, Int8Linear, QuantizeError, cpu_kernels, decode_sdpa, dequantize_int4, dequantize_int8,
    load_quantized, pack_int4, quantize_int4, quantize_int8, quantize_model, restore_linears, save_quantized,
    unpack_int4, use_cpu_kernels, weight_bytes_per_token,
)

needs_kernels = pytest.mark.skipif(not cpu_kernels(), reason="herd CPU kernels unavailable (no AVX-512 BF16 or compiler)")


def tiny_model(name="tiny", dtype=torch.float32) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(get_config(name))
    model.init_weights(std=0.3)
    return model.to(dtype).eval()


def test_int8_round_trip_error_is_half_a_step():
    w = torch.randn(64, 256) * 0.05
    w[3] = 0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and s.shape == (64,) and int(q.abs().max()) <= 127
    err = (dequantize_int8(q, s) - w).abs()
    assert (err <= s[:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_int8(q, s)[3], torch.zeros(256))


@pytest.mark.parametrize("gs", [32, 64, 128, 256])
def test_int4_round_trip_error_is_half_a_step(gs):
    w = torch.randn(48, 512) * 0.05
    w[0, :gs] = 0.125  # a constant group
    packed, scales, mins = quantize_int4(w, gs)
    assert packed.shape == (48, 256) and packed.dtype == torch.uint8 and scales.shape == (48, 512 // gs)
    deq = dequantize_int4(packed, scales, mins, gs)
    step = scales.float().repeat_interleave(gs, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-3 * w.abs().max()).all()
    assert torch.allclose(deq[0, :gs], torch.full((gs,), 0.125), atol=1e-3)


def test_int4_packing_layout():
    q = torch.randint(0, 16, (3, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert torch.equal(unpack_int4(packed), q)
    # byte j of each 64-weight block holds weight j (low nibble) and weight j + 32 (high nibble)
    assert packed[1, 5] == q[1, 5] | (q[1, 37] << 4)
    assert packed[2, 32 + 7] == q[2, 64 + 7] | (q[2, 64 + 39] << 4)


def test_int4_rejects_bad_shapes():
    with pytest.raises(QuantizeError, match="group size"):
        quantize_int4(torch.randn(4, 128), 48)
    with pytest.raises(QuantizeError, match="multiple of 64"):
        quantize_int4(torch.randn(4, 96), 32)
    with pytest.raises(QuantizeError, match="dtype"):
        quantize_model(tiny_model(), "int3")


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


@pytest.mark.parametrize("gs", [None, 32, 64, 128])
def test_fused_decode_matmuls_equal_the_dequantized_reference(gs):
    """The multiply + sum forms that GPUs decode with under torch.compile, eagerly, against dequantize + F.linear."""
    from herd.quantize import int4_decode_matmul, int8_decode_matmul

    torch.manual_seed(0)
    w, x = torch.randn(48, 256), torch.randn(2, 3, 256)
    if gs is None:
        q, s = quantize_int8(w)
        ours, ref = int8_decode_matmul(x, q, s), F.linear(x, dequantize_int8(q, s))
    else:
        q, s, m = quantize_int4(w, gs)
        ours, ref = int4_decode_matmul(x, q, s, m, gs), F.linear(x, dequantize_int4(q, s, m, gs))
    assert ours.shape == (2, 3, 48)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_compiled_decode_takes_the_fused_form(kind, device, monkeypatch):
    """Under torch.compile a decode-sized input takes the fused form (allowed on the CPU here, so that CI runs it;
    it is CUDA's path), with the same outputs as the eager path."""
    import herd.quantize as hq

    monkeypatch.setattr(hq, "FUSED_DECODE_DEVICES", {"cpu", "cuda"})
    monkeypatch.setattr(hq, "_kernel_ok", lambda *a: False)  # the CPU kernels would take CPU inputs first
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 96, bias=False)
    mod = (Int8Linear.from_linear(lin) if kind == "int8" else Int4Linear.from_linear(lin, 64)).to(device)
    calls = []
    fused = hq.int8_decode_matmul if kind == "int8" else hq.int4_decode_matmul
    monkeypatch.setattr(hq, fused.__name__, lambda *a: calls.append(1) or fused(*a))
    x = torch.randn(1, 1, 256, device=device)
    with torch.no_grad():
        eager = mod(x)
        torch._dynamo.reset()
        compiled = torch.compile(mod, fullgraph=True)(x)
    assert calls, "the compiled forward did not take the fused form"
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("dtype, gs, tol", [("int8", 128, 0.01), ("int4", 32, 0.09), ("int4", 128, 0.12)])
def test_quantized_linear_error(dtype, gs, tol):
    # Gaussian weights: int8 rms error ~ max|w| / 127 / sqrt(12); int4 ~ group range / 15 / sqrt(12) (~8-11%)
    lin = torch.nn.Linear(512, 256, bias=False)
    torch.nn.init.normal_(lin.weight, std=0.02)
    q = Int8Linear.from_linear(lin) if dtype == "int8" else Int4Linear.from_linear(lin, gs)
    x = torch.randn(32, 512)
    with torch.no_grad():
        ref, got = lin(x), q(x)
    assert ((got - ref).norm() / ref.norm()).item() < tol


def test_quantized_model_stays_close():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    model.init_weights()  # pretraining-scale weights
    tokens = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        ref = model(tokens)
        quantize_model(model, "int8")
        got = model(tokens)
    assert isinstance(model.output, Int8Linear) and isinstance(model.layers[1].feed_forward.w2, Int8Linear)
    assert ((got - ref).norm() / ref.norm()).item() < 0.01


def test_bytes_per_token_shrink():
    model = tiny_model("tiny", torch.bfloat16)
    full = weight_bytes_per_token(model)
    quantize_model(model, "int8")
    int8 = weight_bytes_per_token(model)
    model = tiny_model("tiny", torch.bfloat16)
    quantize_model(model, "int4", 64)
    int4 = weight_bytes_per_token(model)
    assert 0.45 < int8 / full < 0.55 and 0.25 < int4 / full < 0.35


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


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_save_load_round_trip(tmp_path, dtype):
    model = tiny_model("tiny-tied", torch.bfloat16)
    quantize_model(model, dtype, 32)
    out = save_quantized(model, tmp_path / "q", source="test")
    loaded = load_quantized(out)
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    meta = json.loads((out / "herd_quant.json").read_text())
    assert meta["dtype"] == dtype and meta["config"]["tie_embeddings"] is True
    with pytest.raises(QuantizeError, match="not empty"):
        save_quantized(model, out)


def test_load_rejects_broken_checkpoints(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny_model()
    quantize_model(model, "int8")
    out = save_quantized(model, tmp_path / "q")
    sd = load_file(str(out / "model.safetensors"))
    sd["output.scales"] = sd["output.scales"].to(torch.int32)
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(QuantizeError, match="output.scales"):
        load_quantized(out)
    del sd["output.scales"]
    save_file(sd, str(out / "model.safetensors"))
    with pytest.raises(QuantizeError, match="missing tensors"):
        load_quantized(out)
    (out / "herd_quant.json").write_text("{not json")
    with pytest.raises(QuantizeError, match="cannot read"):
        load_quantized(out)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from herd.tokenizer import write_tiktoken_bpe

    d = tmp_path_factory.mktemp("ck") / "hf"
    save_hf(tiny_model(), None, d)
    write_tiktoken_bpe({bytes([i]): i for i in range(256)}, d / "tokenizer.model")  # 256 bytes + 256 specials
    return d


def test_quantize_command_and_generate_from_its_output(hf_dir, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(hf_dir), str(out), "--dtype", "int4", "--group-size", "32", "--eval-tokens", "64"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["eval_tokens"] == 64 and report["ppl_quantized"] > 0 and report["ppl_change_pct"] is not None
    assert (out / "tokenizer.model").is_file()
    assert main(["generate", "--model", str(out), "--prompt", "hi", "--max-new-tokens", "5", "--ids",
                 "--temperature", "0"]) == 0
    ids = json.loads(capsys.readouterr().out.strip())
    # the same ids as the engine on load_quantized's model
    model = load_quantized(out)
    want = [s.tokens[0] for s in Engine(model).generate([[256, 104, 105]], SamplingParams(temperature=0),
                                                         max_new_tokens=5)]
    assert ids == want[: len(ids)] and len(ids) >= 1


@pytest.mark.parametrize("argv, match", [
    (["--dtype", "int4", "--group-size", "48"], "invalid choice"),
    (["--dtype", "int2"], "invalid choice"),
])
def test_quantize_command_bad_flags(hf_dir, tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(hf_dir), str(tmp_path / "o")] + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_quantize_command_errors(hf_dir, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o"), "--dtype", "int8"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["quantize", str(hf_dir), str(tmp_path / "full"), "--dtype", "int8"]) == 2
    assert main(["quantize", str(hf_dir), str(tmp_path / "o"), "--dtype", "int8", "--eval-tokens", "-1"]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errs) == 3 and all(line.startswith("herd quantize: error:") for line in errs)
