"""herd.bpe: the trained vocabulary is valid tiktoken BPE, encodes like the trainer's own model, and carries the
Llama 3.1 special tokens right after the base vocabulary. Corpus: CPython's standard library source."""

import sysconfig
from pathlib import Path

import pytest

from herd.bpe import bpe_merge, iter_corpus, main, reference_encode, train_bpe, train_hf_bpe, train_tokenizer
from herd.chat_format import ChatFormat
from herd.tokenizer import IncrementalDecoder, Tokenizer, default_tokenizer_path, load_tokenizer, read_tiktoken_bpe

VOCAB = 256 + 1000
STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
TRAIN, HELD_OUT = STDLIB[:30], STDLIB[60:63]


@pytest.fixture(scope="module")
def ranks():
    return train_bpe(iter_corpus(TRAIN), VOCAB)


@pytest.fixture(scope="module")
def small(ranks):
    return Tokenizer(ranks, name="small")


@pytest.fixture(scope="module")
def held_out():
    return "".join(p.read_text(encoding="utf-8") for p in HELD_OUT) + "\nnaïve 😀 ✓ ١٢٣ \r\n<|eot_id|>"


def test_trained_vocabulary_shape(ranks):
    assert len(ranks) == VOCAB
    assert sorted(ranks.values()) == list(range(VOCAB))
    assert all(bytes([b]) in ranks for b in range(256))
    assert any(tok == b"self" or tok == b" self" for tok in ranks)


def test_special_tokens_follow_the_base_vocabulary(small):
    assert (small.n_base, small.n_words) == (VOCAB, VOCAB + 256)
    assert (small.bos_id, small.eos_id, small.eot_id, small.eom_id) == (VOCAB, VOCAB + 1, VOCAB + 9, VOCAB + 8)
    assert small.special_tokens["<|start_header_id|>"] == VOCAB + 6
    dialog = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    ids = ChatFormat(small).encode_dialog_prompt(dialog)
    assert ids[:2] == [small.bos_id, small.start_header_id] and ids[-1] == small.encode("\n\n")[-1]
    assert small.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_encodes_like_the_trainer_and_the_reference(small, ranks, held_out):
    ids = small.encode(held_out)
    assert ids == train_hf_bpe(iter_corpus(TRAIN), VOCAB).encode(held_out).ids
    assert ids == reference_encode(held_out, ranks)
    assert small.decode(ids) == held_out
    assert len(ids) < len(held_out.encode()) / 2.5  # it learned something
    dec = IncrementalDecoder(small)
    assert "".join(dec.add(i) for i in ids) + dec.flush() == held_out


def test_reference_encoder_matches_real_vocab():
    tok = load_tokenizer()
    real = read_tiktoken_bpe(default_tokenizer_path())
    for s in ["This is a test sentence.", "naïve 😀 café 1234567", "def f(x):\n    return x  # ok\r\n"]:
        assert reference_encode(s, real) == tok.encode(s)
    assert bpe_merge(b" the", real) == [279]


def test_training_is_deterministic(ranks):
    assert train_bpe(iter_corpus(TRAIN), VOCAB) == ranks


def test_small_corpus_gives_fewer_tokens():
    r = train_bpe(["abab abab abab"], 256 + 500)
    assert 256 < len(r) < 256 + 500 and b"ab" in r


def test_train_tokenizer_writes_loadable_file(tmp_path, ranks, held_out):
    out = tmp_path / "tokenizer.model"
    tok = train_tokenizer(TRAIN, VOCAB, out)
    assert read_tiktoken_bpe(out) == ranks
    assert load_tokenizer(tmp_path).encode(held_out) == tok.encode(held_out)


def test_command_line(tmp_path, capsys):
    out = tmp_path / "t.model"
    assert main([str(p) for p in TRAIN[:5]] + ["--vocab-size", "400", "--out", str(out)]) == 0
    assert "400 base tokens + 256 special = 656 ids" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.txt"), "--vocab-size", "400", "--out", str(out)]) == 2
    assert "no such corpus file" in capsys.readouterr().err
    assert main([str(TRAIN[0]), "--vocab-size", "100", "--out", str(out)]) == 2
    assert "vocab_size" in capsys.readouterr().err
