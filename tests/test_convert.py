"""Whole-checkpoint commands (herd.convert): `herd convert` between layouts and `herd quantize` with its
perplexity report, through the CLI."""

import json

import pytest
from conftest import tiny_model

from herd import checkpoint as ck
from herd.cli import main
from herd.generate import Engine
from herd.quantize import load_quantized
from herd.sampling import SamplingParams


def test_quantize_command_and_generate_from_its_output(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "q4"
    assert main(["quantize", str(tiny_ckpt), str(out), "--dtype", "int4", "--group-size", "32",
                 "--eval-tokens", "64"]) == 0
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
def test_quantize_command_bad_flags(tiny_ckpt, tmp_path, argv, match, capsys):
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(tiny_ckpt), str(tmp_path / "o")] + argv)
    assert e.value.code == 2 and match in capsys.readouterr().err


def test_quantize_command_errors(tiny_ckpt, tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "missing"), str(tmp_path / "o"), "--dtype", "int8"]) == 2
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["quantize", str(tiny_ckpt), str(tmp_path / "full"), "--dtype", "int8"]) == 2
    assert main(["quantize", str(tiny_ckpt), str(tmp_path / "o"), "--dtype", "int8", "--eval-tokens", "-1"]) == 2
    errs = [line for line in capsys.readouterr().err.splitlines() if line]
    assert len(errs) == 3 and all(line.startswith("herd quantize: error:") for line in errs)


def test_convert_via_cli_with_progress_and_info(tmp_path, capsys):
    model = tiny_model(random_norms=True)
    ck.save_meta(model, None, tmp_path / "meta", mp=2)
    assert main(["convert", str(tmp_path / "meta"), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bf16"]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m4"), "--to", "meta", "--mp", "2"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m4"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "meta" and info["parameters"] == 164_160 and info["bytes"]["bf16"] == 2 * 164_160
    assert main(["info", "llama-3.1-8b", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 8_030_261_248 and info["kv_cache_bytes_per_token_bf16"] == 128 * 1024
