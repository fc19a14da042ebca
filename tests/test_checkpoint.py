"""Checkpoint I/O: HF and Meta layouts, MP shards, transformers interop, and malformed or hostile files."""

import json
import os
import pickle
import shutil

import functools

import pytest
import torch
from conftest import hf_model, tiny_model

from herd import checkpoint as ck
from herd.convert import convert
from herd.loading import load_model
from herd.cli import main
from herd.config import get_config


random_model = functools.partial(tiny_model, random_norms=True)  # non-trivial norms so that a swapped norm would show


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def same_sd(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_meta_hf_meta_round_trip_is_bit_exact(tmp_path, name):
    model = random_model(name)
    ck.save_meta(model, None, tmp_path / "meta")
    convert(tmp_path / "meta", tmp_path / "hf", to="hf")
    convert(tmp_path / "hf", tmp_path / "meta2", to="meta")
    same_sd(state(load_model(tmp_path / "meta2")), state(model))
    a = torch.load(tmp_path / "meta" / "consolidated.00.pth", weights_only=True)
    b = torch.load(tmp_path / "meta2" / "consolidated.00.pth", weights_only=True)
    same_sd(a, b)
    assert json.loads((tmp_path / "meta2" / "params.json").read_text()) == model.args.to_params()


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_hf_written_by_herd_loads_in_transformers(tmp_path, name):
    from transformers import LlamaForCausalLM

    model = random_model(name)
    ck.save_hf(model, None, tmp_path / "hf")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    tokens = torch.randint(0, model.args.vocab_size, (2, 17))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-5
    if model.args.tie_embeddings:
        assert "lm_head.weight" not in json.dumps(_safetensors_keys(tmp_path / "hf" / "model.safetensors"))


def _safetensors_keys(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_transformers_sharded_checkpoint_loads_in_herd(tmp_path):
    args = get_config("tiny")
    hf = hf_model(args)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    model = load_model(tmp_path / "hf").eval()
    tokens = torch.randint(0, args.vocab_size, (1, 21))
    with torch.no_grad():
        assert (hf(tokens).logits - model(tokens)).abs().max() <= 1e-5


def test_herd_sharded_hf_and_dtype(tmp_path):
    from transformers import LlamaForCausalLM

    model = random_model()
    ck.save_hf(model, None, tmp_path / "hf", max_shard_bytes=100_000, dtype=torch.bfloat16)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_model(tmp_path / "hf")
    assert loaded.tok_embeddings.weight.dtype == torch.bfloat16
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        assert (hf(tokens).logits.float() - loaded(tokens)).abs().max() < 0.05
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.parametrize("mp", [2, 4])
def test_model_parallel_shards_merge_to_the_same_model(tmp_path, mp):
    model = random_model()  # n_kv_heads 2: mp 4 repeats each KV head on two ranks
    ck.save_meta(model, None, tmp_path / "mp1")
    ck.save_meta(model, None, tmp_path / f"mp{mp}", mp=mp)
    shards = sorted((tmp_path / f"mp{mp}").glob("consolidated.*.pth"))
    assert [s.name for s in shards] == [f"consolidated.{i:02d}.pth" for i in range(mp)]
    rank0 = torch.load(shards[0], weights_only=True)
    dim, hd, hidden = 64, 16, model.args.ffn_hidden_dim
    assert rank0["layers.0.attention.wq.weight"].shape == (4 * hd // mp, dim)  # column parallel: rows split
    assert rank0["layers.0.attention.wo.weight"].shape == (dim, 4 * hd // mp)  # row parallel: columns split
    assert rank0["layers.0.feed_forward.w2.weight"].shape == (dim, hidden // mp)
    assert rank0["tok_embeddings.weight"].shape == (512 // mp, dim)  # vocab parallel
    assert rank0["layers.0.attention.wk.weight"].shape == (max(1, 2 // mp) * hd, dim)
    tokens = torch.randint(0, 512, (2, 11))
    merged = load_model(tmp_path / f"mp{mp}")
    if mp == 2:
        same_sd(state(merged), state(load_model(tmp_path / "mp1")))
    else:
        assert merged.args.n_kv_heads == 4
    with torch.no_grad():
        assert (merged(tokens) - model(tokens)).abs().max() <= 1e-5


def test_hf_original_subfolder_is_found(tmp_path):
    model = random_model()
    ck.save_meta(model, None, tmp_path / "repo" / "original")
    same_sd(state(load_model(tmp_path / "repo")), state(model))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "/nonexistent", "OUT", "--to", "hf"], "no such file"),
        (["info", "/etc/hostname"], "expected a checkpoint folder"),
        (["info", "llama-9b"], "no such file"),
    ],
)
def test_cli_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_cli_rejects_bad_flags(tmp_path, capsys):
    for argv in (["convert", "a", "b", "--to", "gguf2"], ["convert", "a", "b", "--to", "meta", "--mp", "0"],
                 ["convert", "a", "b", "--to", "meta", "--mp", "x"], ["convert", "a", "b", "--to", "hf", "--dtype", "int3"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


# ---- malformed and hostile files -----------------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    ck.save_hf(random_model(), None, tmp_path / "hf", max_shard_bytes=200_000)
    return tmp_path / "hf"


def _edit_index(folder, fn):
    path = folder / "model.safetensors.index.json"
    data = json.loads(path.read_text())
    fn(data["weight_map"])
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/x.safetensors", "..", ""])
def test_index_cannot_escape_the_folder(hf_dir, shard):
    _edit_index(hf_dir, lambda m: m.update({"model.norm.weight": shard}))
    with pytest.raises(ck.CheckpointError, match="shard"):
        load_model(hf_dir)


def test_index_symlink_escape(hf_dir, tmp_path):
    target = tmp_path / "elsewhere.safetensors"
    shutil.copy(next(hf_dir.glob("model-00001-*")), target)
    os.symlink(target, hf_dir / "link.safetensors")
    _edit_index(hf_dir, lambda m: m.update({"model.norm.weight": "link.safetensors"}))
    with pytest.raises(ck.CheckpointError, match="escapes"):
        load_model(hf_dir)


def test_index_missing_shard_and_wrong_assignment(hf_dir):
    first = next(hf_dir.glob("model-00001-*"))
    index = (hf_dir / "model.safetensors.index.json").read_text()
    first.rename(hf_dir / "gone")
    with pytest.raises(ck.CheckpointError, match="missing"):
        load_model(hf_dir)
    (hf_dir / "gone").rename(first)
    # a tensor the index places in another shard than the one holding it
    data = json.loads(index)
    k = next(k for k, v in data["weight_map"].items() if v == first.name)
    data["weight_map"][k] = next(v for v in data["weight_map"].values() if v != first.name)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(data))
    with pytest.raises(ck.CheckpointError):
        load_model(hf_dir)


def test_index_duplicate_keys_and_garbage(hf_dir):
    path = hf_dir / "model.safetensors.index.json"
    text = path.read_text()
    path.write_text(text.replace('"weight_map": {', '"weight_map": {"model.norm.weight": "x.safetensors", ', 1))
    with pytest.raises(ck.CheckpointError, match="duplicate"):
        load_model(hf_dir)
    path.write_text("{\"weight_map\": [1, 2]}")
    with pytest.raises(ck.CheckpointError, match="malformed"):
        load_model(hf_dir)


def test_truncated_or_fake_safetensors(tmp_path):
    ck.save_hf(random_model(), None, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(ck.CheckpointError, match="model.safetensors"):
        load_model(tmp_path / "hf")
    f.write_bytes((2**62).to_bytes(8, "little") + b"{}")  # header length far past the file
    with pytest.raises(ck.CheckpointError, match="not a valid safetensors"):
        load_model(tmp_path / "hf")
    torch.save({"a": torch.zeros(2)}, f)  # a .pth renamed .safetensors
    with pytest.raises(ck.CheckpointError, match="not a valid safetensors"):
        load_model(tmp_path / "hf")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_payload_is_never_run(tmp_path):
    model = random_model()
    ck.save_meta(model, None, tmp_path / "meta")
    marker = tmp_path / "pwned"
    sd = state(model)
    sd["evil"] = _Payload(marker)
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(ck.CheckpointError, match="refused to unpickle"):
        load_model(tmp_path / "meta")
    assert not marker.exists()
    with open(tmp_path / "meta" / "consolidated.00.pth", "wb") as f:
        pickle.dump(_Payload(marker), f)  # a bare pickle, not even a zip
    with pytest.raises(ck.CheckpointError, match="zip"):
        load_model(tmp_path / "meta")
    assert not marker.exists()


def test_truncated_pth(tmp_path):
    ck.save_meta(random_model(), None, tmp_path / "meta")
    f = tmp_path / "meta" / "consolidated.00.pth"
    f.write_bytes(f.read_bytes()[:-4000])
    with pytest.raises(ck.CheckpointError, match="consolidated.00.pth"):
        load_model(tmp_path / "meta")


def test_shape_and_key_mismatches_name_the_key(tmp_path):
    model = random_model()
    ck.save_meta(model, None, tmp_path / "meta")
    params = tmp_path / "meta" / "params.json"
    good = params.read_text()
    params.write_text(json.dumps({**json.loads(good), "n_kv_heads": 4}))
    with pytest.raises(ck.CheckpointError, match=r"layers\.0\.attention\.wk\.weight has shape"):
        load_model(tmp_path / "meta")
    params.write_text(json.dumps({**json.loads(good), "vocab_size": 1000}))
    with pytest.raises(ck.CheckpointError, match="tok_embeddings.weight has shape"):
        load_model(tmp_path / "meta")
    params.write_text(good)
    sd = state(model)
    del sd["layers.1.ffn_norm.weight"]
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(ck.CheckpointError, match="missing tensor 'layers.1.ffn_norm.weight'"):
        load_model(tmp_path / "meta")
    sd = {**state(model), "layers.9.attention.wq.weight": torch.zeros(64, 64)}
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(ck.CheckpointError, match="unexpected tensor 'layers.9.attention.wq.weight'"):
        load_model(tmp_path / "meta")
    sd = {**state(model), "tok_embeddings.weight": torch.zeros(512, 64, dtype=torch.int32)}
    torch.save(sd, tmp_path / "meta" / "consolidated.00.pth")
    with pytest.raises(ck.CheckpointError, match="floating point"):
        load_model(tmp_path / "meta")


def test_unknown_hf_tensor_and_untied_head_in_tied_config(tmp_path):
    from safetensors.torch import save_file

    model = random_model("tiny-tied")
    ck.save_hf(model, None, tmp_path / "hf")
    f = tmp_path / "hf" / "model.safetensors"
    from safetensors.torch import load_file

    sd = load_file(f)
    save_file({**sd, "lm_head.weight": torch.randn(512, 64)}, f)
    with pytest.raises(ck.CheckpointError, match="differs from tok_embeddings"):
        load_model(tmp_path / "hf")
    save_file({**sd, "model.layers.0.self_attn.q_norm.weight": torch.ones(16)}, f)
    with pytest.raises(ck.CheckpointError, match="unexpected tensor"):
        load_model(tmp_path / "hf")


def test_mp_shards_must_agree(tmp_path):
    ck.save_meta(random_model(), None, tmp_path / "meta", mp=2)
    f = tmp_path / "meta" / "consolidated.01.pth"
    sd = torch.load(f, weights_only=True)
    sd["norm.weight"] = sd["norm.weight"] + 1
    torch.save(sd, f)
    with pytest.raises(ck.CheckpointError, match="replicated tensor 'norm.weight' differs"):
        load_model(tmp_path / "meta")
    del sd["norm.weight"]
    torch.save(sd, f)
    with pytest.raises(ck.CheckpointError, match="differs from consolidated.00.pth"):
        load_model(tmp_path / "meta")
    f.rename(tmp_path / "meta" / "consolidated.03.pth")
    with pytest.raises(ck.CheckpointError, match="consolidated.03.pth"):
        load_model(tmp_path / "meta")


def test_checklist_md5(tmp_path):
    import hashlib

    ck.save_meta(random_model(), None, tmp_path / "meta")
    f = tmp_path / "meta" / "consolidated.00.pth"
    digest = hashlib.md5(f.read_bytes()).hexdigest()
    chk = tmp_path / "meta" / "checklist.chk"
    chk.write_text(f"{digest}  consolidated.00.pth\n{'0' * 32}  tokenizer.model\n")
    assert ck.verify_checklist(tmp_path / "meta") == 1
    chk.write_text(f"{'0' * 32}  consolidated.00.pth\n")
    with pytest.raises(ck.CheckpointError, match="md5"):
        convert(tmp_path / "meta", tmp_path / "out", to="hf")
    assert not (tmp_path / "out").exists()
    convert(tmp_path / "meta", tmp_path / "out", to="hf", verify=False)
    chk.write_text(f"{digest}  ../meta/consolidated.00.pth\n")
    with pytest.raises(ck.CheckpointError, match="invalid shard"):
        ck.verify_checklist(tmp_path / "meta")


def test_writes_are_atomic(tmp_path, monkeypatch):
    model = random_model()
    calls = []
    real_save = torch.save

    def failing_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        ck.save_meta(model, None, tmp_path / "meta", mp=2)
    assert not (tmp_path / "meta").exists()
    assert not list(tmp_path.iterdir())  # the partial folder was removed too
    monkeypatch.setattr(torch, "save", real_save)
    ck.save_meta(model, None, tmp_path / "meta")
    with pytest.raises(ck.CheckpointError, match="already exists"):
        ck.save_meta(model, None, tmp_path / "meta")
    ck.save_meta(model, None, tmp_path / "meta", overwrite=True, mp=2)
    assert len(list((tmp_path / "meta").glob("*.pth"))) == 2


def test_detect_format_errors(tmp_path):
    with pytest.raises(ck.CheckpointError, match="neither"):
        ck.detect_format(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ck.CheckpointError, match="expected a checkpoint folder"):
        ck.detect_format(tmp_path / "weights.bin")


def test_loading_is_lazy_memory_mapped(tmp_path):
    """Loaded weights are views of the files (no copy) when the dtype is kept."""
    model = random_model()
    ck.save_hf(model, None, tmp_path / "hf")
    ck.save_meta(model, None, tmp_path / "meta")
    for d in ("hf", "meta"):
        loaded = load_model(tmp_path / d)
        # torch and safetensors expose mmap-backed storages as non-resizable views of the file mapping
        assert not loaded.layers[0].feed_forward.w1.weight.untyped_storage().resizable(), d


# ---- sizes and nesting from untrusted files ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny", "tiny-tied", "llama-3.2-1b", "llama-3.1-8b", "llama-3.1-405b"])
def test_expected_shapes_equal_a_real_transformer(name):
    from herd.model import Transformer

    args = get_config(name)
    with torch.device("meta"):
        model = Transformer(args)
    want = [(k, tuple(v.shape)) for k, v in model.state_dict(keep_vars=True).items()]
    assert list(ck.expected_shapes(args).items()) == want  # keys, order and shapes


def test_checking_a_checkpoint_never_builds_the_model(monkeypatch):
    import herd.model

    def refuse(*a, **kw):
        raise AssertionError("check_state_dict built a Transformer")

    sd = state(random_model())
    monkeypatch.setattr(herd.model.Transformer, "__init__", refuse)
    ck.check_state_dict(sd, get_config("tiny"))
    args = get_config("tiny").replace(n_layers=1024)  # the largest depth allowed, against a 2-layer state dict
    with pytest.raises(ck.CheckpointError, match="missing tensor 'layers.2"):
        ck.check_state_dict(sd, args)


def test_hf_folder_claiming_a_billion_layers_is_refused_before_reading(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 1_000_000_000}))
    with pytest.raises(ck.ConfigError, match="n_layers 1000000000 is over"):
        load_model(hf_dir)
    assert main(["info", str(hf_dir)]) == 2


def test_deeply_nested_index_is_a_located_error(hf_dir):
    path = hf_dir / "model.safetensors.index.json"
    path.write_text('{"metadata": {},\n "weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ck.CheckpointError, match=r"index\.json:2: too deeply nested"):
        load_model(hf_dir)
    path.write_text('{"weight_map": {"model.norm.weight": ' + "1" * 5000 + "}}")
    with pytest.raises(ck.CheckpointError, match="digits"):
        load_model(hf_dir)


def test_written_files_are_world_readable(tmp_path):
    """safetensors writes 0600; every folder herd writes ends 0644 / 0755, like config.json (umask aside)."""
    model = random_model()
    for out, save in ((tmp_path / "hf", ck.save_hf), (tmp_path / "meta", ck.save_meta)):
        save(model, None, out)
        assert {f.stat().st_mode & 0o777 for f in out.iterdir()} == {0o644} and out.stat().st_mode & 0o777 == 0o755
