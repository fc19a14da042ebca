import json

import pytest
import torch

from herd.config import CONFIGS, ConfigError, ModelArgs, get_config, load_params, num_params
from herd.model import Transformer

# Exact counts from llama31-facts.md §1 (computed there from the published shapes).
PUBLISHED_COUNTS = {
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
}
# SwiGLU hidden sizes as in the published HF config.json files (intermediate_size).
HIDDEN = {"llama-3.1-8b": 14336, "llama-3.1-70b": 28672, "llama-3.1-405b": 53248, "llama-3.2-1b": 8192, "llama-3.2-3b": 8192}


@pytest.mark.parametrize("name", list(PUBLISHED_COUNTS))
def test_parameter_count_on_meta_device(name):
    args = get_config(name)
    with torch.device("meta"):
        model = Transformer(args)
    counted = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter, counted once
    assert counted == PUBLISHED_COUNTS[name] == num_params(args)
    assert args.ffn_hidden_dim == HIDDEN[name]


def test_published_rope_and_tying():
    assert get_config("llama-3.1-8b").rope_scale_factor == 8.0
    assert get_config("llama-3.2-1b").rope_scale_factor == 32.0
    assert get_config("llama-3.2-1b").tie_embeddings and not get_config("llama-3.1-70b").tie_embeddings
    assert get_config("llama-3.2-1b").head_dim == 64


def test_unknown_keys_are_errors():
    with pytest.raises(ConfigError, match="bogus"):
        ModelArgs.from_params({"dim": 64, "n_layers": 1, "n_heads": 4, "bogus": 1})
    with pytest.raises(ConfigError, match="bogus"):
        get_config("tiny").replace(bogus=3)
    with pytest.raises(ConfigError, match="unknown model name"):
        get_config("llama-3.1-8")  # no fuzzy matching


@pytest.mark.parametrize(
    "bad",
    [{"dim": 65, "n_heads": 4}, {"n_heads": 4, "n_kv_heads": 3}, {"dim": 0}, {"norm_eps": float("nan")},
     {"vocab_size": -1}, {"n_layers": 1.5}, {"rope_theta": "big"}],
)
def test_invalid_values(bad):
    with pytest.raises(ConfigError):
        ModelArgs(**{"dim": 64, "n_layers": 1, "n_heads": 4, **bad})


def test_meta_params_json_of_the_published_models(tmp_path):
    # What Meta's params.json holds for 3.2-1B (llama31-facts.md §1): no rope factor, no tying flag.
    params = {"dim": 2048, "n_layers": 16, "n_heads": 32, "n_kv_heads": 8, "vocab_size": 128256,
              "ffn_dim_multiplier": 1.5, "multiple_of": 256, "norm_eps": 1e-05, "rope_theta": 500000.0,
              "use_scaled_rope": True}
    (tmp_path / "params.json").write_text(json.dumps(params))
    args = load_params(tmp_path / "params.json")
    assert args == get_config("llama-3.2-1b")
    # to_params round trip
    assert ModelArgs.from_params(args.to_params()) == args


def test_hf_config_round_trip_and_oracle():
    from transformers import LlamaConfig

    for name, args in CONFIGS.items():
        assert ModelArgs.from_hf(args.to_hf()) == args, name
        hf = LlamaConfig(**args.to_hf())  # transformers accepts what herd writes
        assert hf.intermediate_size == args.ffn_hidden_dim
        assert hf.num_key_value_heads == args.n_kv_heads
    # an 8B config.json as published (llama31-facts.md §6), read back as the named config
    hf8 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
           "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "max_position_embeddings": 131072,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
           "tie_word_embeddings": False, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
           "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "torch_dtype": "bfloat16",
           "transformers_version": "4.43.0.dev0", "pretraining_tp": 1, "use_cache": True, "initializer_range": 0.02,
           "attention_dropout": 0.0}
    assert ModelArgs.from_hf(hf8) == get_config("llama-3.1-8b")


def test_hf_config_odd_intermediate_size_and_rejections():
    base = get_config("tiny").to_hf()
    args = ModelArgs.from_hf({**base, "intermediate_size": 100})
    assert args.ffn_hidden_dim == 100
    for bad in ({"hidden_act": "gelu"}, {"attention_bias": True}, {"model_type": "mistral"}, {"sliding_window": 4096},
                {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, {"head_dim": 32}):
        with pytest.raises(ConfigError):
            ModelArgs.from_hf({**base, **bad})
    no_hidden = dict(base)
    del no_hidden["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        ModelArgs.from_hf(no_hidden)


def test_load_params_bad_files(tmp_path):
    f = tmp_path / "params.json"
    f.write_text("{not json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_params(f)
    f.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="object"):
        load_params(f)


def test_dtype_names_one_spelling_with_long_aliases():
    import torch

    from herd.config import DTYPE_NAMES, dtype_name, torch_dtype

    assert DTYPE_NAMES == ("bf16", "fp16", "fp32")
    for short, long, t in (("bf16", "bfloat16", torch.bfloat16), ("fp16", "float16", torch.float16),
                           ("fp32", "float32", torch.float32)):
        assert dtype_name(short) == dtype_name(long) == dtype_name(f"torch.{long}") == dtype_name(long.upper()) == short
        assert torch_dtype(short) is torch_dtype(long) is torch_dtype(t) is t
    assert torch_dtype(None) is torch.bfloat16
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        dtype_name("int3")


@pytest.mark.parametrize("argv", [
    ["generate", "--prompt", "x", "--dtype", "bfloat16", "--help"],
    ["serve", "--dtype", "float32", "--help"],
    ["merge-lora", "a", "b", "c", "--dtype", "float16", "--help"],
    ["eval", "perplexity", "--model", "m", "--file", "f", "--dtype", "bf16", "--help"],
    ["convert", "a", "b", "--to", "hf", "--dtype", "float32", "--help"],
])
def test_every_command_takes_both_dtype_spellings(argv):
    from herd.cli import build_parser

    ns, _ = build_parser().parse_known_args([a for a in argv if a != "--help"])
    assert ns.dtype in ("bf16", "fp16", "fp32")


def test_commands_refuse_an_unknown_dtype(capsys):
    from herd.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--dtype", "fp8"])
    assert "unknown dtype 'fp8'" in capsys.readouterr().err


# ---- sizes from untrusted configs: bounded before anything is built --------------------------------------------


@pytest.mark.parametrize("bad, message", [
    ({"n_layers": 10**9}, "n_layers 1000000000 is over"),
    ({"n_layers": 1025}, "n_layers 1025 is over"),
    ({"dim": 1 << 17, "n_heads": 1 << 10}, "dim 131072 is over"),
    ({"n_heads": 2048, "dim": 4096}, "n_heads 2048 is over"),
    ({"dim": 4096, "n_heads": 2}, "head_dim 2048 is over"),
    ({"vocab_size": (1 << 20) + 1}, "vocab_size"),
    ({"max_seq_len": 1 << 30}, "max_seq_len"),
    ({"rope_original_max_seq_len": 1 << 30}, "rope_original_max_seq_len"),
    ({"rope_original_max_seq_len": 0}, "rope_original_max_seq_len"),
    ({"multiple_of": 1 << 21}, "multiple_of"),
    ({"ffn_dim_multiplier": 999.0, "dim": 65536, "n_heads": 512}, "feed-forward size"),
    ({"norm_eps": 2.0}, "norm_eps"),
    ({"rope_theta": 1e300}, "rope_theta"),
    ({"rope_scale_factor": 1e6}, "rope_scale_factor"),
    ({"rope_low_freq_factor": float("inf")}, "rope_low_freq_factor"),
    ({"rope_high_freq_factor": 5000.0}, "rope_high_freq_factor"),
    ({"use_scaled_rope": "yes"}, "use_scaled_rope"),
    ({"tie_embeddings": 1}, "tie_embeddings"),
])
def test_sizes_are_bounded(bad, message):
    with pytest.raises(ConfigError, match=message):
        ModelArgs(**{"dim": 64, "n_layers": 1, "n_heads": 4, **bad})


def test_the_largest_published_model_is_well_inside_the_limits():
    from herd.config import LIMITS

    big = get_config("llama-3.1-405b")
    assert big.n_layers * 8 <= LIMITS["n_layers"] and big.dim * 4 <= LIMITS["dim"]
    assert big.vocab_size * 8 <= LIMITS["vocab_size"] and big.max_seq_len * 128 <= LIMITS["max_seq_len"]
    assert big.ffn_hidden_dim * 16 <= LIMITS["ffn_hidden_dim"] and big.head_dim * 8 <= LIMITS["head_dim"]


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 1_000_000_000), ("hidden_size", 10**12),
                                          ("vocab_size", 2**40), ("max_position_embeddings", 2**62),
                                          ("num_hidden_layers", "9" * 5000)])
def test_hf_config_with_huge_sizes_is_refused_at_once(tmp_path, field, value):
    f = tmp_path / "config.json"
    f.write_text(json.dumps({**get_config("tiny").to_hf(), field: value}))
    with pytest.raises(ConfigError):
        load_params(f)


# ---- JSON that herd did not write -------------------------------------------------------------------------------


def test_parse_json_limits():
    from herd.config import JSONError, parse_json

    assert parse_json('{"a": [1, "[[[[[[", {"b": 2.5}]}') == {"a": [1, "[[[[[[", {"b": 2.5}]}
    assert parse_json("[" * 64 + "]" * 64) is not None  # exactly the limit
    assert parse_json('["' + "[" * 1000 + '"]') == ["[" * 1000]  # brackets in strings do not nest
    assert parse_json('"' + "9" * 500 + '"') == "9" * 500  # digits in strings are text
    for text, reason in [("[" * 100_000 + "]" * 100_000, "too deeply nested"), ("[" * 65 + "]" * 65, "too deeply"),
                         ('{"a":\n' * 70 + "1" + "}" * 70, "too deeply nested"),
                         ("[" + "1" * 5000 + "]", "more than 100 digits"), ("[1e999]", "out of range"),
                         ("[NaN]", "NaN"), ("[-Infinity]", "Infinity"), ("{bad", "invalid JSON")]:
        with pytest.raises(JSONError, match=reason):
            parse_json(text)
    with pytest.raises(JSONError) as e:
        parse_json('{\n"a":\n' + "[" * 80 + "]" * 80 + "}")
    assert e.value.line == 3


def test_json_files_give_path_line_errors(tmp_path):
    from herd.config import JSONError, read_json

    f = tmp_path / "params.json"
    f.write_text('{\n  "dim": 64,\n  "x": ' + "[" * 200_000 + "]" * 200_000 + "\n}")
    with pytest.raises(JSONError, match=rf"^{f}:3: too deeply nested"):
        read_json(f)
    with pytest.raises(ConfigError, match=rf"{f}:3: too deeply nested"):
        load_params(f)
    f.write_text("{}")
    with pytest.raises(JSONError, match="over the limit"):
        read_json(f, max_bytes=1)
    f.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(JSONError, match="invalid UTF-8"):
        read_json(f)
