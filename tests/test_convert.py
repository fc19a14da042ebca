"""Whole-checkpoint commands (herd.convert): `herd convert` between layouts and `herd quantize` with its
perplexity report, through the CLI."""

import json

import pytest
from conftest import greedy_ids, tiny_model

from herd import checkpoint as ck
from herd.cli import main
from herd.quantize import load_quantized


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
    want = greedy_ids(model, [[256, 104, 105]], 5)[0]
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


# ---- every model herd writes carries its tokenizer and is readable (issue 21) ----------------------------------


def _modes(folder):
    return {f.relative_to(folder).as_posix(): f.stat().st_mode & 0o777 for f in folder.rglob("*") if f.is_file()}


def test_written_models_carry_their_tokenizer_and_are_0644(tiny_ckpt, tmp_path, capsys):
    import os

    from herd.api import load

    mask = os.umask(0o022)
    try:
        gguf = tmp_path / "m.gguf"
        assert main(["convert", str(tiny_ckpt), str(gguf), "--to", "gguf", "--dtype", "f32"]) == 0
        assert main(["convert", str(gguf), str(tmp_path / "back"), "--to", "hf"]) == 0  # GGUF -> HF
        assert main(["convert", str(tiny_ckpt), str(tmp_path / "meta"), "--to", "meta"]) == 0
        assert main(["quantize", str(gguf), str(tmp_path / "q4"), "--dtype", "int4", "--group-size", "32",
                     "--eval-tokens", "16"]) == 0
    finally:
        os.umask(mask)
    capsys.readouterr()
    text = "Good morrow, 🦙"
    want = load(tiny_ckpt).tokenizer.encode(text)
    for out in ("back", "meta", "q4"):
        folder = tmp_path / out
        assert (folder / "tokenizer.model").is_file(), out
        assert set(_modes(folder).values()) == {0o644}, (out, _modes(folder))
        llm = load(folder, dtype="float32")  # chats at once: no --tokenizer needed
        assert llm.tokenizer.encode(text) == want
    assert gguf.stat().st_mode & 0o777 == 0o644


def test_a_vocabulary_mismatch_suggests_the_tokenizer_flag(tmp_path, capsys):
    ck.save_hf(tiny_model(), None, tmp_path / "hf")  # 512 ids, no tokenizer file: the Llama 3 one does not fit
    assert main(["generate", "--model", str(tmp_path / "hf"), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert "vocab_size is 512 but the Llama 3 vocabulary" in err and "--tokenizer" in err


def test_quantize_says_which_text_it_measured(tiny_ckpt, tmp_path, capsys):
    assert main(["quantize", str(tiny_ckpt), str(tmp_path / "a"), "--dtype", "int8", "--eval-tokens", "32"]) == 0
    out = capsys.readouterr()
    assert "textwrap.py" in json.loads(out.out.strip().splitlines()[-1])["eval_text"] and "--eval-file" in out.err
    f = tmp_path / "mine.txt"
    f.write_text("Some text the model is about. " * 20)
    assert main(["quantize", str(tiny_ckpt), str(tmp_path / "b"), "--dtype", "int8", "--eval-tokens", "32",
                 "--eval-file", str(f)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["eval_text"] == str(f)
