"""herd plan (herd.sizing) against numbers computed by hand from the published shapes."""

import json

import pytest

from herd.cli import main
from herd.config import get_config
from herd.sizing import activation_bytes_per_token_layer, flops_per_token, matmul_params, plan, weight_bytes


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
    assert p.flops_per_token_train == LLAMA_8B_TRAIN_FLOPS_PER_TOKEN_8K  # see test_8b_flops_per_token_by_hand
    assert p.flops_per_token_forward == 2 * 7_504_658_432 + 4 * 32 * 4096 * 8192


# Llama 3.1 8B: dim 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, FFN hidden 14336, vocab 128256, untied.
# The weights that multiply an activation, per layer:
#   wq 4096 x (32 x 128) = 16,777,216     wk, wv 4096 x (8 x 128) = 4,194,304 each     wo (32 x 128) x 4096 = 16,777,216
#   w1, w3 4096 x 14336 = 58,720,256 each, w2 14336 x 4096 = 58,720,256
#   -> 41,943,040 attention + 176,160,768 FFN = 218,103,808 per layer, x 32 layers = 6,979,321,856
# plus the output head 128256 x 4096 = 525,336,576 (the embedding is a lookup, not a matmul): N = 7,504,658,432.
# (All 8,030,261,248 parameters = N + the embedding 525,336,576 + 65 norms of 4096 = 266,240.)
# Attention per token per layer, forward: q.k over seq positions 2 x 4096 x seq, the weighted values 2 x 4096 x seq.
# Training = 3 x forward: 6 x 7,504,658,432 = 45,027,950,592 and 12 x 32 x 4096 x 8192 = 12,884,901,888 at seq 8192.
LLAMA_8B_MATMUL_PARAMS = 7_504_658_432
LLAMA_8B_TRAIN_FLOPS_PER_TOKEN_8K = 57_912_852_480


def test_8b_flops_per_token_by_hand():
    a = get_config("llama-3.1-8b")
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_hidden_dim, a.vocab_size) == (
        4096, 32, 32, 8, 128, 14336, 128256) and not a.tie_embeddings
    per_layer = 4096 * 4096 + 2 * 4096 * 1024 + 4096 * 4096 + 3 * 4096 * 14336
    assert per_layer == 218_103_808
    assert 32 * per_layer + 128256 * 4096 == LLAMA_8B_MATMUL_PARAMS == matmul_params(a)
    assert 45_027_950_592 + 12_884_901_888 == LLAMA_8B_TRAIN_FLOPS_PER_TOKEN_8K
    assert flops_per_token(a, 8192) == LLAMA_8B_TRAIN_FLOPS_PER_TOKEN_8K  # 5.79e10
    # forward only: 2N + 4 L d seq, a third of training
    assert flops_per_token(a, 8192, train=False) == 2 * LLAMA_8B_MATMUL_PARAMS + 4 * 32 * 4096 * 8192
    # LoRA / QLoRA: no weight gradients for the frozen base (4N), attention's backward in full
    assert flops_per_token(a, 8192, frozen_base=True) == 4 * LLAMA_8B_MATMUL_PARAMS + 12 * 32 * 4096 * 8192


def test_a_tied_head_is_counted_once_and_the_embedding_never():
    untied = get_config("llama-3.2-1b").replace(tie_embeddings=False)
    tied = untied.replace(tie_embeddings=True)
    # the same matmuls either way: the head multiplies, the embedding only gathers rows
    assert matmul_params(tied) == matmul_params(untied)
    assert flops_per_token(tied, 2048) == flops_per_token(untied, 2048)
    d, f, kv = tied.dim, tied.ffn_hidden_dim, tied.n_kv_heads * tied.head_dim
    assert matmul_params(tied) == tied.n_layers * (2 * d * d + 2 * d * kv + 3 * d * f) + tied.vocab_size * d


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


# ---- one answer per question (issue 21) -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["int8", "int4"])
@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_weight_bytes_are_what_herd_quantize_writes(name, dtype):
    import torch
    from conftest import tiny_model

    from herd.quantize import quantize_model

    model = quantize_model(tiny_model(name, torch.bfloat16, seed=0), dtype, 32)  # embedding and norms in bf16
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}.values()  # tied storage once
    assert weight_bytes(model.args, dtype, 32) == sum(t.numel() * t.element_size() for t in tensors)


def test_info_and_plan_print_the_same_int4_size(capsys):
    from herd.sizing import format_bytes

    assert main(["info", "llama-3.1-8b"]) == 0
    info = capsys.readouterr().out
    assert main(["plan", "--model", "llama-3.1-8b", "--dtype", "int4"]) == 0
    plan_out = capsys.readouterr().out
    size = format_bytes(weight_bytes(get_config("llama-3.1-8b"), "int4"))
    assert size == "5.0 GB"
    assert f"int4 {size}" in info and f"weights (int4)       {size}" in plan_out
    assert "1 GB = 10^9 bytes" in info
    assert main(["info", "llama-3.1-8b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bytes"]["int4"] == weight_bytes(get_config("llama-3.1-8b"), "int4")


def test_plan_names_its_gpu_and_how_many_a_model_needs(capsys):
    assert main(["plan", "--model", "llama-3.1-8b"]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA H100 SXM, 80.0 GB" in out and "fits one NVIDIA H100 SXM" in out
    assert main(["plan", "--model", "llama-3.1-405b", "--hardware", "h200"]) == 0
    out = capsys.readouterr().out
    # 811.7 GB of weights + 67.6 GB of KV cache at 131,072 tokens = 879.4 GB: 7 H200s of 141 GB
    assert "needs 7 x NVIDIA H200 SXM (141.0 GB each)" in out and "--tp 8" in out and "does not fit" in out
    assert main(["plan", "--model", "llama-3.1-405b", "--dtype", "int4", "--tp", "4", "--gpus", "4"]) == 0
    out = capsys.readouterr().out
    assert "needs 4 x NVIDIA H100 SXM" in out and "does not fit" not in out
