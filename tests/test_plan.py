"""herd plan against numbers computed by hand from the published shapes."""

import json

import pytest

from herd.cli import main
from herd.plan import activation_bytes_per_token_layer, plan, weight_bytes
from herd.config import get_config


def test_405b_weights():
    p = plan("llama-3.1-405b", dtype="bf16")
    assert p.weight_bytes == 2 * 405_853_388_800  # 811.7 GB
    assert 200e9 <= plan("llama-3.1-405b", dtype="int4").weight_bytes <= 250e9
    assert 405e9 < weight_bytes(get_config("llama-3.1-405b"), "int8") < 410e9  # 1 byte/param + row scales


def test_kv_cache():
    p = plan("llama-3.1-8b", seq_len=131072)
    assert p.kv_bytes_per_token == 128 * 1024  # 2 * 32 layers * 8 kv heads * 128 * 2 bytes
    assert p.kv_bytes_at_seq_len == 16 * 2**30
    assert plan("llama-3.1-70b").kv_bytes_per_token == 320 * 1024
    assert plan("llama-3.1-405b").kv_bytes_per_token == 504 * 1024
    assert plan("llama-3.1-8b", dtype="fp8").kv_bytes_per_token == 64 * 1024


def test_405b_pretraining_time():
    # Llama 3 paper: 3.8e25 FLOPs on up to 16K H100s at 38-43% MFU; 3.8e25 / (16384 * 989e12 * 0.4) s = 67.8 days
    p = plan("llama-3.1-405b", seq_len=8192, train=True, gpus=16384, tp=8, pp=16, mfu=0.4, total_flops=3.8e25)
    assert p.train["days"] == pytest.approx(3.8e25 / (16384 * 989e12 * 0.4) / 86400)
    assert 50 < p.train["days"] < 80  # "on the order of two months"
    assert p.train["dp"] == 128


def test_training_memory_terms():
    args = get_config("llama-3.1-8b")
    p = plan("llama-3.1-8b", seq_len=8192, train=True, gpus=8)
    b = p.train["bytes_per_gpu"]
    assert b["weights_fp32"] + b["grads_fp32"] + b["adam_states"] == pytest.approx(16 * 8_030_261_248 / 8)
    # saved activations per token per layer: 2 bytes * (6 * 4096 + 2 * 1024 + 4 * 14336) = 167,936
    assert activation_bytes_per_token_layer(args) == 167_936
    assert b["activations"] == 8192 * 32 * 167_936
    assert b["activations_checkpointed"] < b["activations"] / 10
    assert p.flops_per_token_train == 6 * 8_030_261_248 + 12 * 32 * 4096 * 8192


def test_decode_roofline():
    p = plan("llama-3.2-1b", seq_len=1, hardware="h100")
    assert p.decode_tok_s_upper_bound == pytest.approx(3.35e12 / (2 * 1_235_814_400 + 32 * 1024))


@pytest.mark.parametrize("kw", [dict(seq_len=200_000), dict(gpus=10, tp=4, train=True), dict(mfu=1.5),
                                dict(dtype="int3"), dict(hardware="tpu")])
def test_bad_requests(kw):
    with pytest.raises(ValueError):
        plan("llama-3.1-8b", **kw)


def test_cli(capsys):
    assert main(["plan", "--model", "llama-3.1-405b", "--train", "--gpus", "16384", "--tp", "8", "--pp", "16",
                 "--seq-len", "8192", "--flops", "3.8e25", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"] == 405_853_388_800 and 50 < out["train"]["days"] < 80
    assert main(["plan", "--model", "llama-3.2-3b", "--dtype", "int4"]) == 0
    assert "GB" in capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--gpus", "3", "--tp", "2", "--train"]) == 2
    assert "multiple" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--model", "llama-3.1-8b", "--seq-len", "-5"])
