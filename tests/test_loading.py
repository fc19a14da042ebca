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
    assert checkpoint_tokenizer(tmp_path / "hf").n_words == 128256
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
