"""herd.loading: one door for every checkpoint format and the tokenizer that belongs to it."""

import shutil

import pytest
import torch
from conftest import tiny_model

from herd import checkpoint as ck
from herd.config import get_config
from herd.gguf import write_gguf
from herd.loading import (checkpoint_tokenizer, load_model, load_tokenizer, model_info, open_model, read_config,
                          tokenizer_source)
from herd.quantize import Int8Linear, quantize_model, save_quantized
from herd.tokenizer import TokenizerError, load_tokenizer as load_tokenizer_file
from herd.tokenizer import write_tiktoken_bpe


@pytest.fixture(scope="module")
def byte_vocab(tmp_path_factory):
    """A 256-byte vocabulary + the 256 special tokens: 512 ids, the `tiny` config's vocabulary size."""
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    write_tiktoken_bpe({bytes([b]): b for b in range(256)}, path)
    return path


def test_every_format_opens_to_the_same_model(tmp_path, byte_vocab):
    model = tiny_model(random_norms=True)
    ck.save_hf(model, None, tmp_path / "hf")
    ck.save_meta(model, None, tmp_path / "meta", mp=2)
    write_gguf(model.state_dict(), model.args, load_tokenizer(byte_vocab), tmp_path / "m.gguf", dtype="f32")
    tokens = torch.randint(0, model.args.vocab_size, (1, 9))
    with torch.no_grad():
        want = model(tokens)
        for src in ("hf", "meta", "m.gguf"):
            assert read_config(tmp_path / src) == model.args
            assert torch.equal(load_model(tmp_path / src)(tokens), want), src


def test_open_model_takes_quantized_folders_and_casts_float_ones(tmp_path, byte_vocab):
    model = tiny_model()
    ck.save_hf(model, None, tmp_path / "hf")
    opened = open_model(tmp_path / "hf", dtype="float32")  # long dtype names are aliases
    assert opened.tok_embeddings.weight.dtype == torch.float32
    assert open_model(tmp_path / "hf").tok_embeddings.weight.dtype == torch.bfloat16  # the default
    save_quantized(quantize_model(tiny_model(), "int8"), tmp_path / "q8")
    q = open_model(tmp_path / "q8", dtype="fp32")
    assert isinstance(q.layers[0].attention.wq, Int8Linear)
    assert q.tok_embeddings.weight.dtype == torch.float32


def test_the_tokenizer_that_belongs_to_a_checkpoint(tmp_path, byte_vocab):
    model = tiny_model()
    ck.save_hf(model, None, tmp_path / "hf")
    assert tokenizer_source(tmp_path / "hf") is None  # no tokenizer file: callers use the Llama 3 vocabulary
    # ... which does not fit this 512-id model: the error says where the vocabulary came from and what to pass
    with pytest.raises(TokenizerError, match=r"vocab_size is 512 but the Llama 3 vocabulary .* --tokenizer"):
        checkpoint_tokenizer(tmp_path / "hf")
    shutil.copy(byte_vocab, tmp_path / "hf" / "tokenizer.model")
    assert tokenizer_source(tmp_path / "hf") == tmp_path / "hf"
    assert checkpoint_tokenizer(tmp_path / "hf").n_words == 512
    assert checkpoint_tokenizer(tmp_path / "hf", tokenizer=byte_vocab).n_words == 512  # an explicit one wins
    assert checkpoint_tokenizer(tmp_path / "hf", tokenizer=byte_vocab.parent).n_words == 512
    # a GGUF file carries its vocabulary: only the loading module reads it
    gguf = write_gguf(model.state_dict(), model.args, load_tokenizer(byte_vocab), tmp_path / "m.gguf", dtype="f32")
    assert tokenizer_source(gguf) == gguf
    text = "Good morrow, 🦙"
    assert load_tokenizer(gguf).encode(text) == load_tokenizer(byte_vocab).encode(text)
    with pytest.raises(TokenizerError, match="herd.loading.load_tokenizer"):
        load_tokenizer_file(gguf)
    with pytest.raises(TokenizerError, match="expects 7"):
        load_tokenizer(gguf, n_words=7)


def test_model_info_for_names_and_paths(tmp_path):
    info = model_info("llama-3.2-1b")
    assert info["format"] == "name" and info["parameters"] == 1_235_814_400
    model = tiny_model()
    ck.save_hf(model, None, tmp_path / "hf")
    info = model_info(str(tmp_path / "hf"))
    assert info["format"] == "hf" and info["config"] == get_config("tiny").to_params()
    assert "model.safetensors" in info["files"]


def test_save_tokenizer_training_window_and_readable_files(tmp_path, byte_vocab):
    import json
    import os

    from herd.loading import make_readable, save_tokenizer, training_seq_len

    model = tiny_model()
    gguf = write_gguf(model.state_dict(), model.args, load_tokenizer(byte_vocab), tmp_path / "m.gguf", dtype="f32")
    out = tmp_path / "out"
    out.mkdir()
    assert save_tokenizer(gguf, out) == [out / "tokenizer.model"]  # a GGUF's vocabulary as tiktoken ranks
    assert load_tokenizer(out).encode("Good morrow, 🦙") == load_tokenizer(byte_vocab).encode("Good morrow, 🦙")
    assert save_tokenizer(None, out) == []  # the Llama 3 vocabulary is never copied
    (out / "secret").write_text("x")
    os.chmod(out / "secret", 0o600)
    mask = os.umask(0o022)
    try:
        make_readable(out)
    finally:
        os.umask(mask)
    assert (out / "secret").stat().st_mode & 0o777 == 0o644 and out.stat().st_mode & 0o777 == 0o755
    assert training_seq_len(out) is None
    (out / "card.json").write_text(json.dumps({"train_seq_len": 512}))
    assert training_seq_len(out) == 512
