"""GGUF: herd's Q8_0/Q4_0 blocks vs the gguf package's reference, write/read round trips, and hostile files."""

import struct

import numpy as np
import pytest
import torch
from conftest import tiny_model as random_model  # tiny_model(name, **changes): pretraining init, eval mode

from herd import gguf as hg
from herd import gguf_vocab as hv


class TinyTokenizer:
    """A stand-in tokenizer over 256 single bytes + 256 special names, enough for weight-only tests."""

    def __init__(self, n_base=256):
        from herd.tokenizer import Tokenizer

        ranks = {bytes([i]): i for i in range(256)}
        pairs = [(a, b) for a in b"etaoinshr" for b in b"etaoinshr "]
        for i, (a, b) in enumerate(pairs[: n_base - 256]):
            ranks[bytes([a, b])] = 256 + i
        self.tok = Tokenizer(ranks)

    def __getattr__(self, k):
        return getattr(self.tok, k)


@pytest.fixture(scope="module")
def tiny_tok():
    return TinyTokenizer().tok


# ---- blocks --------------------------------------------------------------------------------------------------


def _weights():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(6, 128, generator=g)
    w[0, :32] = 0  # an all-zero block
    w[1, :32] = torch.arange(32) - 15.5  # exact halves after scaling
    w[2, 32:64] = 1e-30  # denormal scale
    w[3, 64:96] = -w[3, 64:96].abs()  # negative extreme
    return w


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_blocks_equal_ggml_reference(qtype):
    from gguf import GGMLQuantizationType, quants

    w = _weights()
    ours = hg.quantize_q8_0(w) if qtype == "Q8_0" else hg.quantize_q4_0(w)
    ref = quants.quantize(w.numpy(), GGMLQuantizationType[qtype])
    assert ours.dtype == np.uint8 and ours.shape == ref.shape
    assert np.array_equal(ours, ref)
    t = getattr(hg, qtype)
    back = hg.dequantize(ours.reshape(-1), t, tuple(w.shape))
    ref_back = quants.dequantize(ref, GGMLQuantizationType[qtype])
    assert np.array_equal(back.numpy(), ref_back)
    tol = 0.01 if qtype == "Q8_0" else 0.2  # scale/127 and scale/8 per block
    assert (back - w).abs().max() <= tol * w.abs().max()


# ---- round trips ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_f32_round_trip_is_exact(tmp_path, name, tiny_tok):
    model = random_model(name)
    path = hg.write_gguf(model.state_dict(), model.args, tiny_tok, tmp_path / "m.gguf", dtype="f32")
    args, sd = hg.read_gguf(path)
    assert args == model.args  # including rope factor 8 / 32 and tying
    for k, v in model.state_dict().items():
        assert torch.equal(sd[k], v), k


@pytest.mark.parametrize("dtype, tol", [("f16", 1e-3), ("bf16", 1e-2), ("q8_0", 2e-2), ("q4_0", 0.25)])
def test_lossy_round_trips(tmp_path, dtype, tol, tiny_tok):
    model = random_model()
    path = hg.write_gguf(model.state_dict(), model.args, tiny_tok, tmp_path / "m.gguf", dtype=dtype)
    f = hg.GGUFFile(path)
    want = {"f16": hg.F16, "bf16": hg.BF16, "q8_0": hg.Q8_0, "q4_0": hg.Q4_0}[dtype]
    assert f.tensors["blk.0.attn_q.weight"].ggml_type == want
    assert f.tensors["blk.0.attn_norm.weight"].ggml_type == hg.F32  # 1-D tensors stay f32
    assert f.get("general.file_type", int) == hg.FILE_TYPES[want]
    f.close()
    _, sd = hg.read_gguf(path)
    for k, v in model.state_dict().items():
        assert (sd[k].float() - v).abs().max() <= tol * v.abs().max(), k


def test_peer_reader_sees_llama_metadata(tmp_path, tiny_tok):
    from gguf import GGUFReader

    model = random_model()
    path = hg.write_gguf(model.state_dict(), model.args, tiny_tok, tmp_path / "m.gguf", dtype="q8_0")
    r = GGUFReader(path)
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "rope_freqs.weight", "blk.1.ffn_down.weight"} <= names
    field = r.fields["llama.attention.head_count_kv"]
    assert int(field.parts[field.data[0]][0]) == 2
    rope = next(t for t in r.tensors if t.name == "rope_freqs.weight")
    assert torch.allclose(torch.from_numpy(np.array(rope.data)), hg.rope_factors(model.args))
    # factor 8 keeps the highest frequencies (divisor 1) and divides the lowest by 8
    assert rope.data[0] == 1.0 and rope.data[-1] == pytest.approx(8.0)


def test_tokenizer_round_trip_with_the_llama3_vocab(tmp_path):
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer()
    model = random_model("tiny-llama3-vocab")
    path = hg.write_gguf(model.state_dict(), model.args, tok, tmp_path / "m.gguf", dtype="q8_0")
    back = hv.read_gguf_tokenizer(path)
    assert back.n_words == 128256 and back.special_tokens == tok.special_tokens
    text = "Hello, world! 12345 ünïcödé 🦙 <|eot_id|>\r\n  code(x) => x**2"
    assert back.encode(text) == tok.encode(text)
    merges = hg.GGUFFile(path).get("tokenizer.ggml.merges", list)[1]
    assert "Ġ t" in merges[:1000]  # " t" is one of the earliest merges of the Llama 3 vocabulary


def test_merges_from_ranks_reproduce_bpe():
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer()
    ranks = {tok.token_bytes(i): i for i in range(tok.n_base)}
    merges = hg.merges_from_ranks(ranks)
    # every multi-byte token is produced by at least one merge, and merges come in rank order
    produced = {a + b for a, b in merges}
    assert produced == {t for t in ranks if len(t) > 1}
    ordered = [ranks[a + b] for a, b in merges]
    assert ordered == sorted(ordered)


# ---- hostile files ---------------------------------------------------------------------------------------------


def _s(text: str | bytes) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _kv(key, vtype, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _build(kvs=(), tensors=(), data=b"", version=3, n_kv=None, n_tensors=None, magic=b"GGUF", align=32) -> bytes:
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = b"".join(kvs)
    for name, ne, gtype, offset in tensors:
        body += _s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne)
        body += struct.pack("<IQ", gtype, offset)
    out = head + body
    out += b"\0" * (-len(out) % align)
    return out + data


ARCH = _kv("general.architecture", 8, _s("llama"))
F32_TENSOR = [("output_norm.weight", [8], 0, 0)]


def _u32(key, v):
    return _kv(key, 4, struct.pack("<I", v))


@pytest.mark.parametrize(
    "blob, message",
    [
        (b"GGML" + b"\0" * 40, "bad magic"),
        (_build(version=1), "version 1"),
        (_build(version=99), "version 99"),
        (_build(n_kv=0xFFFFFFFF), "more than the file holds"),
        (_build(n_tensors=2**60), "more than the file holds"),
        (_build([struct.pack("<Q", 2**30) + b"key"]), "over the"),  # 1 GiB key
        (_build([_kv("k", 8, struct.pack("<Q", 2**30) + b"x")]), "over the"),  # 1 GiB string value
        (_build([_kv("k", 8, struct.pack("<Q", 500) + b"x")]), "truncated"),
        (_build([_kv("k", 99, b"")]), "unknown value type"),
        (_build([_kv("k", 9, struct.pack("<IQ", 4, 2**61))]), "truncated or oversized"),  # huge u32 array
        (_build([_kv("k", 9, struct.pack("<IQ", 8, 2**40))]), "more than the file can hold"),  # huge string array
        (_build([_kv("k", 9, struct.pack("<IQ", 9, 1) + struct.pack("<IQ", 4, 0))]), "nests arrays"),
        (_build([ARCH, ARCH]), "duplicate metadata key"),
        (_build([_u32("general.alignment", 0)]), "power of two"),
        (_build([_u32("general.alignment", 3)]), "power of two"),
        (_build([_u32("general.alignment", 2**31)]), "power of two"),
        (_build([ARCH], [("t", [1, 1, 1, 1, 1], 0, 0)], b"\0" * 64), "dimensions"),
        (_build([ARCH], [("t", [0], 0, 0)], b"\0" * 64), "bad shape"),
        (_build([ARCH], [("t", [8], 12, 0)], b"\0" * 64), "ggml type 12"),
        (_build([ARCH], [("t", [8], 77, 0)], b"\0" * 64), "ggml type 77"),
        (_build([ARCH], [("t", [30], 8, 0)], b"\0" * 64), "block size"),
        (_build([ARCH], [("t", [8], 0, 16)], b"\0" * 64), "not aligned"),
        (_build([ARCH], [("t", [8], 0, 64)], b"\0" * 64), "past the end"),
        (_build([ARCH], [("t", [2**40, 2**40], 0, 0)], b"\0" * 64), "past the end"),
        (_build([ARCH], [("a", [16], 0, 0), ("b", [8], 0, 32)], b"\0" * 96), "overlaps"),
        (_build([ARCH], [("a", [8], 0, 0), ("a", [8], 0, 32)], b"\0" * 96), "duplicate tensor"),
        (_build([_kv("k", 8, _s(b"\xff\xfe"))]), "UTF-8"),
    ],
)
def test_malformed_files_give_typed_errors(tmp_path, blob, message):
    p = tmp_path / "bad.gguf"
    p.write_bytes(blob)
    with pytest.raises(hg.GGUFError, match=message):
        hg.read_gguf(p)


def test_every_truncation_of_a_real_file_is_a_typed_error(tmp_path, tiny_tok):
    model = random_model()
    path = hg.write_gguf(model.state_dict(), model.args, tiny_tok, tmp_path / "m.gguf", dtype="q8_0")
    blob = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in list(range(0, 200, 7)) + list(range(200, len(blob), len(blob) // 40)):
        cut.write_bytes(blob[:n])
        with pytest.raises(hg.GGUFError):
            hg.read_gguf(cut)


def _tokenizer_file(tmp_path, tiny_tok, edit):
    """A valid file whose tokenizer metadata is then edited by `edit(kvs)` before writing."""
    model = random_model()
    path = hg.write_gguf(model.state_dict(), model.args, tiny_tok, tmp_path / "ok.gguf", dtype="f32")
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(path)
    w = GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    kvs = {}
    for name, field in r.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        kvs[name] = field.contents()
    edit(kvs)
    for k, v in kvs.items():
        if isinstance(v, np.ndarray):  # an array with an explicit element type
            w.add_key_value(k, v.tolist(), GGUFValueType.ARRAY, sub_type=GGUFValueType.UINT8)
        elif isinstance(v, list):
            w.add_array(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        elif isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        else:
            w.add_float32(k, v)
    for t in r.tensors:
        w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tmp_path / "bad.gguf"


def test_special_token_ids_past_the_vocab(tmp_path, tiny_tok):
    bad = _tokenizer_file(tmp_path, tiny_tok, lambda kv: kv.update({"tokenizer.ggml.eos_token_id": 10**6}))
    with pytest.raises(hg.GGUFError, match="eos_token_id 1000000 is outside"):
        hv.read_gguf_tokenizer(bad)


def test_token_type_with_one_byte_elements(tmp_path, tiny_tok):
    def edit(kv):
        kv["tokenizer.ggml.token_type"] = np.ones(len(kv["tokenizer.ggml.tokens"]), dtype=np.uint8)

    bad = _tokenizer_file(tmp_path, tiny_tok, edit)
    with pytest.raises(hg.GGUFError, match="token_type must be int32"):
        hv.read_gguf_tokenizer(bad)


def test_token_outside_the_byte_alphabet(tmp_path, tiny_tok):
    def edit(kv):
        kv["tokenizer.ggml.tokens"][5] = "<0x-1>\u2603"

    bad = _tokenizer_file(tmp_path, tiny_tok, edit)
    with pytest.raises(hg.GGUFError, match="byte-level alphabet"):
        hv.read_gguf_tokenizer(bad)


@pytest.mark.parametrize(
    "template",
    [
        "{{ lipsum.__globals__['os'].system('touch MARKER') }}",
        "{{ cycler.__init__.__globals__.os.popen('touch MARKER').read() }}",
        "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{{ c }}{% endfor %}",
        "{{ messages.append(1) }}",
    ],
)
def test_hostile_chat_template_only_in_sandbox(tmp_path, template, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        out = hv.render_chat_template(template, [{"role": "user", "content": "hi"}])
        assert "class" not in out
    except hg.GGUFError as e:
        assert "refused" in str(e)
    assert not (tmp_path / "MARKER").exists()


def test_cli_convert_to_gguf_and_back(tmp_path, capsys):
    import json

    from herd.checkpoint import save_hf
    from herd.loading import load_model
    from herd.cli import main

    model = random_model("tiny-llama3-vocab")
    save_hf(model, None, tmp_path / "hf")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf", "--dtype", "f32"]) == 0
    capsys.readouterr()
    assert main(["info", str(tmp_path / "m.gguf"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "gguf" and info["config"] == model.args.to_params()
    # --model M.gguf: load directly, and convert back to the HF and Meta layouts
    tokens = torch.randint(0, 128256, (1, 7))
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "m.gguf")(tokens), model(tokens))
    assert main(["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--to", "meta"]) == 0
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "back")(tokens), model(tokens))
    from herd.loading import load_tokenizer

    assert load_tokenizer(tmp_path / "m.gguf").encode("Hello, world!") == [9906, 11, 1917, 0]


def test_cli_gguf_errors(tmp_path, capsys):
    from herd.checkpoint import save_hf
    from herd.cli import main

    save_hf(random_model(), None, tmp_path / "hf")  # vocab 512: the Llama 3 vocabulary does not fit
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "m.gguf"), "--to", "gguf"]) == 2
    assert "vocab_size is 512" in capsys.readouterr().err
    assert not (tmp_path / "m.gguf").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "x"), "--to", "hf", "--dtype", "q8_0"]) == 2
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\0\0\0" + b"\xff" * 16)
    assert main(["info", str(tmp_path / "bad.gguf")]) == 2
    err = capsys.readouterr().err
    assert "more than the file holds" in err and "Traceback" not in err


def _f32(key, v):
    return _kv(key, 6, struct.pack("<f", v))


def _llama_header(**changes) -> bytes:
    """A llama GGUF whose header claims the sizes in `changes` (u32) over one small token_embd tensor."""
    sizes = {"embedding_length": 64, "attention.head_count": 4, "block_count": 2, "feed_forward_length": 128,
             **changes}
    kvs = [ARCH, _f32("llama.attention.layer_norm_rms_epsilon", 1e-5)]
    kvs += [_u32(f"llama.{k}", v) for k, v in sizes.items()]
    return _build(kvs, [("token_embd.weight", [64, 8], 0, 0)], b"\0" * (64 * 8 * 4))


@pytest.mark.parametrize("changes, message", [
    ({"block_count": 10**9}, "n_layers 1000000000 is over"),
    ({"block_count": 4_000_000_000}, "n_layers"),
    ({"embedding_length": 2**31, "attention.head_count": 2**20}, "dim 2147483648 is over"),
    ({"context_length": 2**31}, "max_seq_len"),
    ({"vocab_size": 2**30}, "vocab_size"),
    ({"feed_forward_length": 2**30}, "multiple_of"),
])
def test_header_sizes_are_bounded_before_anything_is_built(tmp_path, changes, message):
    p = tmp_path / "big.gguf"
    p.write_bytes(_llama_header(**changes))
    for read in (hg.read_gguf_config, hg.read_gguf):
        with pytest.raises(hg.GGUFError, match=message):
            read(p)
