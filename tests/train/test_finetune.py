"""herd finetune: full / LoRA / QLoRA on the pretraining loop, with the real Llama 3 tokenizer and a tiny model.

The base is a random `tiny-llama3-vocab` model (dim 64, the 128,256-id vocabulary) written as an HF folder; the data
is the shipped demo set (data/sft-demo). PEFT adapters are checked with peft on transformers' LlamaForCausalLM.
"""

import dataclasses
import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from herd import lora
from herd.checkpoint import save_hf
from herd.cli import main
from herd.config import get_config
from herd.loading import load_model
from herd.model import Transformer
from herd.train import FINETUNING, finetune, load_finetune_settings, loop, parallel, pretrain, train
from herd.train.data import IGNORE_INDEX, Batch, Loader, document_mask
from herd.train.dcp import list_checkpoints

ROOT = Path(__file__).parents[2]
CONFIG = ROOT / "configs" / "finetune-tiny.yaml"
DIALOGS = ROOT / "data" / "sft-demo" / "dialogs.jsonl"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A random tiny-llama3-vocab checkpoint in the HF layout (float32): the model every fine-tune starts from."""
    folder = tmp_path_factory.mktemp("base") / "hf"
    m = Transformer(get_config("tiny-llama3-vocab"))
    m.init_weights(0.02, torch.Generator().manual_seed(7))
    save_hf(m, None, folder)
    return folder


def settings(tmp_path, *overrides, run="run", base=None):
    """finetune-tiny.yaml, made smaller: rows of 96 tokens, 2 rows per step as 2 micro-batches, 6 steps."""
    common = [f"run_dir={tmp_path / run}", f"data.paths=[{DIALOGS}]", "log.progress=false", "data.seq_len=96",
              "train.batch_size=2", "train.micro_batch=1", "train.steps=6", "eval.every=0", "eval.sequences=2",
              "checkpoint.every=3", "optim.warmup_steps=1", "export.hf=false", "export.meta=false"]
    if base is not None:
        common.append(f"model.init_from={base}")
    return load_finetune_settings(CONFIG, common + list(overrides))


def capturing_recipe() -> tuple[list, object]:
    """FINETUNING with a build_model that keeps a reference to the model the loop trains."""
    seen = []

    def build(*a, **k):
        seen.append(finetune.build_model(*a, **k))
        return seen[-1]

    return seen, dataclasses.replace(FINETUNING, build_model=build)


def hf_and_peft(base: Path, adapter: Path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    return PeftModel.from_pretrained(hf, adapter).eval()


TOKENS = torch.randint(0, 128256, (2, 11), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_adapter_methods_end_to_end(tmp_path, base, method):
    seen, recipe = capturing_recipe()
    s = settings(tmp_path, f"finetune.method={method}", "export.merged=true", "export.hf=true", base=base)
    res = train(s, recipe)
    model = seen[0]
    # it learns: the last two steps' loss is below the first two's
    assert res.losses[5] + res.losses[6] < res.losses[1] + res.losses[2] - 0.1, res.losses
    # only the adapters trained: the frozen base (float or quantized buffers) equals a fresh build of it
    fresh = finetune.build_model(s, None, torch.device("cpu"))
    trained = model.state_dict()
    changed = {k for k, v in fresh.state_dict().items() if not torch.equal(v, trained[k])}
    assert changed and all(".lora_a." in k or ".lora_b." in k for k in changed)
    assert any(".lora_b." in k for k in changed)
    if method == "qlora":
        from herd.quantize import Int4Linear

        assert isinstance(model.layers[0].attention.wq.base, Int4Linear)
        assert isinstance(model.output, Int4Linear)
    # the checkpoint holds only the adapters (and their AdamW state): kilobytes, not the 66 MB base
    ckpt = list_checkpoints(res.run_dir / "checkpoints")[-1][1]
    assert sum(f.stat().st_size for f in ckpt.iterdir()) < 1_000_000
    # the PEFT adapter: peft on transformers' model gives herd's logits (float base + adapter)
    ours = load_model(base)
    lora.load_peft(ours, res.run_dir / "adapter")
    with torch.no_grad():
        mine = ours(TOKENS)
        theirs = hf_and_peft(base, res.run_dir / "adapter")(TOKENS).logits
        plain = load_model(base)(TOKENS)
        merged = load_model(res.run_dir / "hf")(TOKENS)
    assert (mine - plain).abs().max() > 1e-4  # the adapter changes the model
    torch.testing.assert_close(theirs, mine, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, mine, rtol=1e-5, atol=1e-5)
    if method == "lora":  # the trained in-process model is the float base + this adapter
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(TOKENS), mine, rtol=1e-5, atol=1e-5)
    cfg = json.loads((res.run_dir / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["base_model_name_or_path"] == str(base)


def test_full_fine_tune_end_to_end(tmp_path, base):
    seen, recipe = capturing_recipe()
    s = settings(tmp_path, "finetune.method=full", "export.hf=true", "export.meta=true", "optim.lr=3e-3",
                 base=base)
    res = train(s, recipe)
    assert res.losses[5] + res.losses[6] < res.losses[1] + res.losses[2] - 0.1, res.losses
    model = seen[0].eval()
    assert not (res.run_dir / "adapter").exists()
    with torch.no_grad():
        want = model(TOKENS)
        assert (want - load_model(base)(TOKENS)).abs().max() > 1e-3
        for fmt in ("hf", "meta"):
            torch.testing.assert_close(load_model(res.run_dir / fmt)(TOKENS), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_stop_and_resume_gives_identical_losses(tmp_path, base, monkeypatch, method):
    """Adapter checkpoints (trainable state + AdamW + RNG) resume exactly, LoRA dropout included."""
    extra = (f"finetune.method={method}", "finetune.lora_dropout=0.1", "train.steps=4", "checkpoint.every=2",
             "data.seq_len=64")
    whole = train(settings(tmp_path, *extra, run="whole", base=base), FINETUNING).losses
    real = loop.lr_at

    def stop_at_step_4(step, *a):
        if step == 4:
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(loop, "lr_at", stop_at_step_4)
    s = settings(tmp_path, *extra, run="split", base=base)
    with pytest.raises(KeyboardInterrupt):
        train(s, FINETUNING)
    monkeypatch.undo()
    resumed = train(s, FINETUNING)
    assert sorted(resumed.losses) == [3, 4]
    assert resumed.losses == {k: whole[k] for k in (3, 4)}  # bit for bit


def test_packed_row_gives_each_dialog_its_own_losses(base):
    """A packed row (positions restart per dialog, block-diagonal mask) = every dialog run alone, token by token."""
    from herd.chat_format import ChatFormat
    from herd.train.sft import SFTDataset, load_sft
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer()
    samples, _ = load_sft([DIALOGS], ChatFormat(tok), seq_len=96)
    three, used = [], 0
    for ids, mask in samples:  # the first dialogs that share one row
        if used + len(ids) - 1 <= 96 and len(three) < 3:
            three.append((ids, mask))
            used += len(ids) - 1
    assert len(three) == 3
    inputs, labels, positions = SFTDataset(three, 96, tok.pad_id, "pack")[0]
    model = load_model(base).eval()
    x, pos = torch.from_numpy(inputs)[None], torch.from_numpy(positions)[None]
    with torch.no_grad():
        packed = model(x, input_pos=pos, mask=document_mask(pos))[0]
        unmasked = model(x)[0]
    at = 0
    for ids, _ in three:
        n = len(ids) - 1
        with torch.no_grad():
            alone = model(torch.tensor(ids[:-1])[None])[0]
        target = torch.tensor(ids[1:])
        want = F.cross_entropy(alone, target, reduction="none")
        got = F.cross_entropy(packed[at : at + n], target, reduction="none")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        if at:  # without the mask, a later dialog would see the earlier ones
            assert (F.cross_entropy(unmasked[at : at + n], target, reduction="none") - want).abs().max() > 1e-3
        at += n
    # the loop's loss: the summed masked cross-entropy of the labelled tokens
    y = torch.from_numpy(labels)[None]
    with torch.no_grad():
        summed = pretrain.causal_lm_loss(model, x, y, pos)
    keep = y[0] != IGNORE_INDEX
    torch.testing.assert_close(summed, F.cross_entropy(packed[keep], y[0][keep], reduction="sum"))


def test_a_batch_without_trainable_tokens_is_zero_loss_not_nan(tmp_path, base, monkeypatch):
    real, calls = Loader.next, []

    def next_batch(self):
        b = real(self)
        calls.append(1)
        if len(calls) <= 2:  # both micro-batches of step 1: no labelled token at all
            b = Batch(b.inputs, torch.full_like(b.labels, IGNORE_INDEX), b.positions)
        return b

    monkeypatch.setattr(Loader, "next", next_batch)
    res = train(settings(tmp_path, "train.steps=2", "checkpoint.every=0", base=base), FINETUNING)
    assert res.losses[1] == 0.0 and 5 < res.losses[2] < 20
    rows = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss_tokens"] for r in rows if "loss" in r][0] == 0


def test_bad_data_is_a_line_numbered_error_or_a_counted_skip(tmp_path, base, capsys):
    good = DIALOGS.read_text().splitlines()[:12]
    bad = tmp_path / "mine.jsonl"
    bad.write_text("\n".join(good[:3] + ['{"messages": [{"role": "user", "content": "hi"}'] + good[3:]) + "\n")
    args = ["finetune", "--config", str(CONFIG), f"run_dir={tmp_path / 'run'}", f"data.paths=[{bad}]",
            f"model.init_from={base}", "log.progress=false", "train.steps=1", "train.batch_size=2",
            "train.micro_batch=2", "data.seq_len=96", "eval.sequences=0", "export.hf=false", "export.meta=false"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herd finetune: error: ") and "mine.jsonl:4: invalid JSON" in err[0]
    assert main(args + ["finetune.bad_data=skip"]) == 0
    err = capsys.readouterr().err
    assert "12 samples" in err and "skipped: 1 malformed" in err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_special_token_text_in_content_is_trained_as_text(tmp_path):
    from herd.tokenizer import load_tokenizer

    tok = load_tokenizer()
    f = tmp_path / "d.jsonl"
    rec = {"messages": [{"role": "user", "content": "Print <|eot_id|> please"},
                        {"role": "assistant", "content": "Here: <|eot_id|><|start_header_id|>"}]}
    f.write_text(json.dumps(rec) + "\n" + json.dumps(rec) + "\n")
    s = settings(tmp_path, f"data.paths=[{f}]", "data.val_fraction=0", "data.seq_len=64")
    env = parallel.DistEnv(0, 1, 0, torch.device("cpu"))
    loader, _, _ = finetune.prepare_data(s, env, 0, 1, lambda msg: None)
    b = loader.next()
    labels = b.labels[b.labels != IGNORE_INDEX].tolist()
    assert labels.count(tok.eot_id) == 2 and labels[-1] == tok.eot_id  # only the real ends of the two turns
    assert tok.start_header_id not in labels
    assert tok.decode(labels) == "Here: <|eot_id|><|start_header_id|><|eot_id|>" * 2
    assert all(t < tok.n_words - 256 for t in labels if t != tok.eot_id)  # the rest is plain text


def test_only_adapters_are_in_the_optimizer_and_frozen_linears_save_no_weights(tmp_path, base):
    from herd.quantize import Int4Linear

    s = settings(tmp_path, "finetune.method=qlora", "finetune.lora_targets=[wq, wv, w2]", base=base)
    model = finetune.build_model(s, None, torch.device("cpu"))
    opt = loop.build_optimizer(model, s.optim)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in lora.lora_parameters(model)} and len(in_opt) == 2 * 3 * 2
    assert all(p.dtype == torch.float32 for p in lora.lora_parameters(model))
    # gradients through the quantized base equal plain autograd through Int4Linear's dequantized weight
    layer = model.layers[0].feed_forward.w2
    assert isinstance(layer.base, Int4Linear)
    with torch.no_grad():
        layer.lora_b.weight.normal_()
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    gx, ga = x.grad.clone(), layer.lora_a.weight.grad.clone()
    x.grad, layer.lora_a.weight.grad = None, None
    ref = Int4Linear.forward(layer.base, x) + layer.lora_b(layer.lora_a(x)) * layer.scaling
    torch.testing.assert_close(y, ref, rtol=1e-6, atol=1e-6)
    ref.square().sum().backward()
    torch.testing.assert_close(gx, x.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, layer.lora_a.weight.grad, rtol=1e-5, atol=1e-5)


def test_frozen_linears_in_row_blocks_and_logits_only_where_labelled(monkeypatch):
    """The memory savers change no number: a frozen linear made a block of rows at a time, and the head and the
    cross-entropy computed only at labelled positions, give the plain model's loss and gradients."""
    torch.manual_seed(0)
    args = get_config("tiny").replace(n_layers=1)
    ref = Transformer(args)
    ref.init_weights(0.02, torch.Generator().manual_seed(1))
    model = Transformer(args)
    model.load_state_dict(ref.state_dict())
    lora.apply_lora(model, lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["wq", "w2"]))
    lora.apply_lora(ref, lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=["wq", "w2"]))
    with torch.no_grad():
        for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
            p.normal_()
            q.copy_(p)
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and not m.weight.requires_grad:
            m.forward = functools.partial(finetune.frozen_forward, m)
    monkeypatch.setattr(finetune, "CHUNK_ELEMENTS", 64 * 100)  # the 512-row head in 6 blocks, w2 in 1
    tokens = torch.randint(0, 512, (3, 20))
    labels = torch.randint(0, 512, (3, 20))
    labels[0, :12] = IGNORE_INDEX
    labels[1] = IGNORE_INDEX  # a row with nothing to learn
    labels[2, ::2] = IGNORE_INDEX
    positions = (torch.arange(20) % 7)[None].expand(3, -1)
    got = finetune.sft_loss(model, tokens, labels, positions)
    want = pretrain.causal_lm_loss(ref, tokens, labels, positions)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    want.backward()
    for p, q in zip(lora.lora_parameters(model), lora.lora_parameters(ref)):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6)
    nothing = torch.full_like(labels, IGNORE_INDEX)
    assert finetune.sft_loss(model, tokens, nothing).item() == 0.0


def test_cli_print_config_and_pretrain_refuses_a_finetune_config(capsys):
    assert main(["finetune", "--config", str(CONFIG), "--print-config", "finetune.method=qlora"]) == 0
    out = capsys.readouterr().out
    assert "method: qlora" in out and "packing: pack" in out
    assert main(["pretrain", "--config", str(CONFIG)]) == 2
    assert "run it with `herd finetune`" in capsys.readouterr().err


def test_pad_mode_rows_hold_one_dialog_and_train(tmp_path, base):
    s = settings(tmp_path, "finetune.packing=pad", "train.steps=2", "checkpoint.every=0", base=base)
    env = parallel.DistEnv(0, 1, 0, torch.device("cpu"))
    loader, val_ds, _ = finetune.prepare_data(s, env, 0, 1, lambda msg: None)
    assert loader.next().positions is None and len(val_ds[0]) == 2
    res = train(s, FINETUNING)
    assert all(np.isfinite(v) for v in res.losses.values())


def test_two_rank_fsdp_qlora_matches_one_process_and_resumes_in_one(tmp_path, base):
    """torchrun, 2 ranks (gloo, FSDP2 over the adapters and the frozen float weights; int4 buffers replicated):
    the 1-process losses and adapter; its adapter-only DCP checkpoint resumes in one process."""
    from .pretrain_utils import losses, torchrun
    from safetensors.torch import load_file

    extra = ["finetune.method=qlora", "optim.decay_steps=3", "data.seq_len=64", "train.steps=3", "checkpoint.every=2"]
    one = train(settings(tmp_path, *extra, run="one", base=base), FINETUNING)
    argv = [f"run_dir={tmp_path / 'two'}", f"data.paths=[{DIALOGS}]", f"model.init_from={base}", "log.progress=false",
            "train.batch_size=2", "train.micro_batch=1", "eval.every=0", "eval.sequences=2", "optim.warmup_steps=1",
            "export.hf=false", "export.meta=false"]
    out = torchrun(2, "finetune", "--config", str(CONFIG), *argv, *extra[:3], "train.steps=2", "checkpoint.every=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "(dp 2 x tp 1)" in out.stderr
    two = losses(tmp_path / "two")
    assert two == pytest.approx({k: one.losses[k] for k in (1, 2)}, rel=1e-6)
    a = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert a.keys() and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in a)
    resumed = train(settings(tmp_path, *extra, run="two", base=base), FINETUNING)
    assert sorted(resumed.losses) == [3] and resumed.losses[3] == pytest.approx(one.losses[3], rel=1e-5)
    b = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    c = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert all(torch.allclose(b[k], c[k], atol=1e-4) for k in b)  # float32 sums in another order, then 3 Adam steps


def test_format_setting_accepts_only_its_kind_of_record(tmp_path):
    from herd.chat_format import ChatFormat
    from herd.train.data import DataError
    from herd.train.sft import load_sft
    from herd.tokenizer import load_tokenizer

    chat = ChatFormat(load_tokenizer())
    f = tmp_path / "mixed.jsonl"
    f.write_text(DIALOGS.read_text().splitlines()[0] + "\n" + json.dumps(
        {"instruction": "Say hi.", "output": "Hi."}) + "\n")
    assert load_sft([f], chat, 96)[1].samples == 2  # auto: both kinds
    with pytest.raises(DataError, match=r"mixed.jsonl:2: .*the format is chat"):
        load_sft([f], chat, 96, fmt="chat")
    with pytest.raises(DataError, match=r"mixed.jsonl:1: .*the format is alpaca"):
        load_sft([f], chat, 96, fmt="alpaca")
    assert load_sft([f], chat, 96, fmt="alpaca", policy="skip")[1].skipped["invalid dialog"] == 1


# ---- fine-tuning the bundled model the first time (issue 21) ---------------------------------------------------


def documented_command(doc: str, marker: str) -> list[str]:
    """The `herd ...` command on the line after `marker` in a docs file, as argv (without `herd`)."""
    import shlex

    lines = (ROOT / "docs" / doc).read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    cmd = next(line for line in lines[at:] if line.startswith("herd "))
    return shlex.split(cmd.split("#")[0])[1:]


def test_the_documented_first_fine_tune_runs_as_written(tmp_path, monkeypatch, capsys):
    """docs/finetuning.md's worked example on the bundled model and the shipped 10-line JSONL: no model name, no
    tokenizer, nothing to lower; the merged model carries the bundled tokenizer and chats at once."""
    import herd

    argv = documented_command("finetuning.md", "<!-- first fine-tune")
    assert argv == ["finetune", "--config", "configs/default-lora-demo.yaml"]
    assert len((ROOT / "data" / "sft-demo" / "herd-persona.jsonl").read_text().splitlines()) == 10
    monkeypatch.chdir(ROOT)  # the command runs from the repository root
    run = tmp_path / "demo"
    assert main(argv + [f"run_dir={run}", "train.steps=2"]) == 0
    capsys.readouterr()
    hf = run / "hf"
    assert (hf / "tokenizer.model").read_bytes() == (ROOT / "src/herd/assets/default/tokenizer.model").read_bytes()
    assert all(f.stat().st_mode & 0o777 == 0o644 for f in hf.iterdir())  # readable like config.json
    llm = herd.load(hf, dtype="float32")
    reply = llm.chat([{"role": "user", "content": "Who art thou?"}], max_new_tokens=8, temperature=0)
    assert reply.message.role == "assistant"
    written = (run / "settings.yaml").read_text()
    assert "name: null" in written and "assets/default" in written.split("tokenizer:")[1].splitlines()[0]


def test_a_data_set_too_small_for_one_batch_says_what_to_lower(tmp_path, base, capsys):
    argv = ["finetune", "--config", str(CONFIG), f"run_dir={tmp_path / 'r'}", f"model.init_from={base}",
            f"data.paths=[{ROOT / 'data' / 'sft-demo' / 'herd-persona.jsonl'}]", "train.batch_size=16",
            "train.micro_batch=16", "data.val_fraction=0.1", "log.progress=false"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    for hint in ("train.batch_size=", "train.micro_batch=", "data.seq_len", "data.val_fraction=0", "holding out 1"):
        assert hint in err, (hint, err)


def test_text_files_train_every_token_beside_dialogs(tmp_path, base):
    """.txt files in data.paths are plain text (loss on every token, windows of seq_len); the held-out split is drawn
    from the dialogs only."""
    text = tmp_path / "prose.txt"
    text.write_text("Once upon a time there was a llama. " * 40)
    s = settings(tmp_path, f"data.paths=[{DIALOGS},{text}]", "data.val_fraction=0.1", base=base)
    _, val_ds, tok = finetune.prepare_data(s, None, 0, 1, lambda *_: None)
    ids = tok.encode(text.read_text(), bos=True, eos=True)
    windows, n = finetune.text_samples([text], tok, 96)
    assert n == len(ids) - 1 and len(windows) == -(-(len(ids) - 1) // 96)
    assert [i for w in windows for i in w[0][1:]] == ids[1:]  # every token after the first is a target once
    assert all(all(mask) for _, mask in windows)
    held_out = [ids for row in val_ds.rows for ids, _ in row]
    assert held_out and not any(ids in held_out for ids, _ in windows)  # only dialogs are held out
