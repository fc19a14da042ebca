"""Weight-only int8/int4: the math, the modules on every path (kernels: test_kernels.py), the folder format."""

import json

import functools

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_model as _tiny_model

from herd.quantize import (
    Int4Linear, Int8Linear, QuantizeError, dequantize_int4, dequantize_int8, load_quantized, quantize_int4,
    quantize_int8, quantize_model, save_quantized, weight_bytes_per_token,
)



tiny_model = functools.partial(_tiny_model, seed=0, std=0.3)  # tiny_model(name, dtype)


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


def test_int4_rejects_bad_shapes():
    with pytest.raises(QuantizeError, match="group size"):
        quantize_int4(torch.randn(4, 128), 48)
    with pytest.raises(QuantizeError, match="multiple of 64"):
        quantize_int4(torch.randn(4, 96), 32)
    with pytest.raises(QuantizeError, match="dtype"):
        quantize_model(tiny_model(), "int3")


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
    monkeypatch.setattr(hq, "kernel_ok", lambda *a: False)  # the CPU kernels would take CPU inputs first
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
    model = _tiny_model(seed=0)  # pretraining-scale weights (std 0.02)
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
