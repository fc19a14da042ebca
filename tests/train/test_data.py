"""Pretraining data: tokenize once into a memmap, re-use while unchanged, pack, split, and resume the loader."""

import json
import os

import numpy as np
import pytest

from herd.train import data
from herd.train.data import DataError, Loader, PackedDataset, byte_tokenizer, tokenize_corpus

from .pretrain_utils import make_corpus


@pytest.fixture
def tok():
    return byte_tokenizer()


def test_documents_are_wrapped_in_bos_eos_and_concatenated(tmp_path, tok):
    (tmp_path / "a.txt").write_text("héllo", encoding="utf-8")
    (tmp_path / "b.md").write_text("\ufeffworld", encoding="utf-8")  # a BOM is not text
    tc = tokenize_corpus([tmp_path], tok, tmp_path / "cache", progress=False)
    want = tok.encode("héllo", bos=True, eos=True) + tok.encode("world", bos=True, eos=True)
    assert tc.tokens.dtype == np.uint32 and tc.tokens.tolist() == want and tc.n_docs == 2
    assert want[0] == tok.bos_id and want[-1] == tok.eos_id == 257


def test_real_llama3_tokenizer(tmp_path):
    from herd.tokenizer import load_tokenizer

    llama = load_tokenizer()
    (tmp_path / "t.txt").write_text("The quick brown fox <|eot_id|> jumps.", encoding="utf-8")
    tc = tokenize_corpus([tmp_path / "t.txt"], llama, tmp_path / "cache", progress=False)
    assert tc.tokens.tolist() == llama.encode("The quick brown fox <|eot_id|> jumps.", bos=True, eos=True)
    assert tc.tokens[-1] == 128001  # <|end_of_text|>; special-token text in the file stays plain text
    assert 128009 not in tc.tokens.tolist()


def test_cache_is_reused_until_a_file_or_the_tokenizer_changes(tmp_path, tok):
    corpus = make_corpus(tmp_path / "corpus", n_files=2, lines=20)
    first = tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False)
    assert not first.reused
    again = tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False)
    assert again.reused and again.folder == first.folder and np.array_equal(again.tokens, first.tokens)

    f = corpus / "doc1.txt"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched, same bytes: sha256 says re-use
    assert tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False).reused

    f.write_text(f.read_text() + " more", encoding="utf-8")
    changed = tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False)
    assert not changed.reused and len(changed.tokens) == len(first.tokens) + 5

    (corpus / "doc2.txt").write_text("new file", encoding="utf-8")  # a new file changes the file list
    assert not tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False).reused

    from herd.tokenizer import Tokenizer

    other = Tokenizer({bytes([(b + 1) % 256]): b for b in range(256)}, name="shifted")
    assert tokenize_corpus([corpus], other, tmp_path / "cache", progress=False).folder != first.folder


def test_interrupted_build_is_not_reused(tmp_path, tok, monkeypatch):
    corpus = make_corpus(tmp_path / "corpus", n_files=2, lines=5)
    real = data._read_documents

    def crash_on_second(path, errors):
        if path.name == "doc1.txt":
            raise KeyboardInterrupt
        return real(path, errors)

    monkeypatch.setattr(data, "_read_documents", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False)
    monkeypatch.undo()
    (folder,) = (tmp_path / "cache").iterdir()
    assert not (folder / "manifest.json").exists() and not any(p.name.startswith(".") for p in folder.iterdir())
    tc = tokenize_corpus([corpus], tok, tmp_path / "cache", progress=False)
    assert not tc.reused and tc.n_docs == 2


def test_folder_walk_patterns_hidden_files_and_missing_paths(tmp_path, tok):
    (tmp_path / "d" / ".git").mkdir(parents=True)
    (tmp_path / "d" / ".git" / "x.txt").write_text("hidden")
    (tmp_path / "d" / "keep.txt").write_text("k")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\x00\xff")
    (tmp_path / "d" / "sub").mkdir()
    (tmp_path / "d" / "sub" / "code.py").write_text("p")
    assert [p.name for p in data.list_files([tmp_path / "d"])] == ["keep.txt"]
    assert [p.name for p in data.list_files([tmp_path / "d"], ["*.txt", "*.py"])] == ["keep.txt", "code.py"]
    with pytest.raises(DataError, match="no such file"):
        data.list_files([tmp_path / "missing"])
    with pytest.raises(DataError, match="no files matching"):
        data.list_files([tmp_path / "d" / "sub"])


def test_jsonl_documents_and_line_numbered_errors(tmp_path, tok):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"text": "one\u2028line"}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    tc = tokenize_corpus([good], tok, tmp_path / "c1", progress=False)
    assert tc.n_docs == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        tokenize_corpus([bad], tok, tmp_path / "c2", progress=False)
    bad.write_text(json.dumps({"content": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: expected an object"):
        tokenize_corpus([bad], tok, tmp_path / "c3", progress=False)


def test_invalid_utf8_is_an_error_naming_the_file_unless_replaced(tmp_path, tok):
    f = tmp_path / "latin1.txt"
    f.write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt: not UTF-8 at byte 3"):
        tokenize_corpus([f], tok, tmp_path / "c", progress=False)
    tc = tokenize_corpus([f], tok, tmp_path / "c", encoding_errors="replace", progress=False)
    assert tc.tokens.tolist() == tok.encode("caf\ufffd", bos=True, eos=True)


def test_packing_covers_the_stream_and_the_split_is_disjoint():
    tokens = np.arange(1001, dtype=np.uint32)
    train, val = PackedDataset(tokens, 10, "train", 0.1), PackedDataset(tokens, 10, "val", 0.1)
    assert len(train) + len(val) == 100 and len(val) == 10
    assert set(train.windows).isdisjoint(val.windows)
    assert np.diff(val.windows).min() >= 9  # held-out windows are spread through the stream, not one block
    x, y = train[0]
    assert x.dtype == np.int64 and x.tolist() == list(range(10)) and y.tolist() == list(range(1, 11))
    assert len(PackedDataset(tokens, 10, "val", 0.0)) == 0


def test_loader_resumes_with_the_same_batches_across_an_epoch_boundary():
    ds = PackedDataset(np.arange(2001, dtype=np.uint32), 10, "train", 0.0)  # 200 samples
    a = Loader(ds, 16, seed=3)
    for _ in range(11):
        a.next()
    state = json.loads(json.dumps(a.state_dict()))  # the state is plain JSON
    expected = [a.next().inputs for _ in range(5)]  # crosses into epoch 1 (12 x 16 = 192 <= 200)
    b = Loader(ds, 16, seed=3)
    b.load_state_dict(state)
    for want in expected:
        assert np.array_equal(b.next().inputs, want)
    assert a.epoch == 1
    with pytest.raises(DataError, match="seed"):
        Loader(ds, 16, seed=4).load_state_dict(state)


def test_ranks_split_each_global_batch():
    ds = PackedDataset(np.arange(1001, dtype=np.uint32), 10, "train", 0.0)
    one = Loader(ds, 8, seed=0)
    r0, r1 = Loader(ds, 4, rank=0, world=2, seed=0), Loader(ds, 4, rank=1, world=2, seed=0)
    for _ in range(20):
        whole = one.next().inputs
        assert np.array_equal(np.concatenate([r0.next().inputs, r1.next().inputs]), whole)
    with pytest.raises(DataError, match="cannot fill one batch"):
        Loader(ds, 60, world=2)
