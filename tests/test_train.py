"""The training loop: settings, schedule, a whole tiny run, exact resume, the NaN guard and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from pretrain_utils import losses, tiny_settings, write_config

from herd import train as train_mod
from herd.checkpoint import load_model
from herd.checkpointing import list_checkpoints, load_checkpoint
from herd.cli import main
from herd.model import Transformer
from herd.train import SettingsError, TrainingDiverged, load_settings, lr_at, train

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    s = load_settings(path)
    assert s.train.batch_size % s.train.micro_batch == 0
    assert train_mod.model_args(s).max_seq_len >= s.data.seq_len


def test_shipped_configs_exist():
    assert {"pretrain-tiny.yaml", "pretrain-100m.yaml"} <= {p.name for p in CONFIGS}


def test_unknown_keys_and_bad_types_are_errors(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  lr: 1.0e-3\n  learning_rate: 2\n")
    with pytest.raises(SettingsError, match=r"unknown setting optim.learning_rate \(known in optim: lr,"):
        load_settings(cfg)
    cfg.write_text("data: {paths: [x]}\nepochs: 3\n")
    with pytest.raises(SettingsError, match="unknown setting epochs"):
        load_settings(cfg)
    cfg.write_text("data: {paths: [x]}\n")
    with pytest.raises(SettingsError, match="unknown setting train.stepz"):
        load_settings(cfg, ["train.stepz=5"])
    with pytest.raises(SettingsError, match="train.steps: expected int, got 'many'"):
        load_settings(cfg, ["train.steps=many"])
    with pytest.raises(SettingsError, match="not KEY=VALUE"):
        load_settings(cfg, ["train.steps"])
    with pytest.raises(Exception, match="unknown model config keys"):
        load_settings(cfg, ["model.overrides={dimension: 3}"])
    with pytest.raises(SettingsError, match="batch_size 10 is not a multiple of micro_batch 4"):
        load_settings(cfg, ["train.batch_size=10"])


def test_overrides_parse_yaml_values(tmp_path):
    cfg = write_config(tmp_path)
    s = load_settings(cfg, ["optim.lr=3e-4", "train.steps=7", "data.paths=[a, b]", "optim.grad_clip=null",
                            "model.overrides={n_layers: 3}"])
    assert s.optim.lr == 3e-4 and s.train.steps == 7 and s.data.paths == ["a", "b"] and s.optim.grad_clip is None
    assert train_mod.model_args(s).n_layers == 3


def test_warmup_then_cosine():
    o = train_mod.OptimSettings(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, o, 110) == pytest.approx(0.1) and lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, o, 110) == pytest.approx(0.1) and lr_at(500, o, 110) == pytest.approx(0.1)
    steps = [lr_at(i, o, 110) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_flops_per_token_is_6n_plus_attention():
    from herd.config import get_config, num_params
    from herd.metrics import flops_per_token

    a = get_config("llama-3.1-8b")
    n = num_params(a) - a.vocab_size * a.dim  # the embedding lookup is not a matmul; the output head is
    assert flops_per_token(a, 8192) == 6 * n + 12 * 32 * 4096 * 8192


def test_tiny_run_end_to_end(tmp_path):
    s = tiny_settings(tmp_path, "log.tensorboard=true", "export.hf=true", "export.meta=true", "export.dtype=fp32",
                      "train.steps=8", "checkpoint.every=3", "checkpoint.keep=2")
    res = train(s)
    assert res.step == 8 and sorted(res.losses) == list(range(1, 9))
    assert res.losses[8] < res.losses[1] - 0.5  # it learns
    rows = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0 for r in train_rows)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 8] and evals[-1]["val_ppl"] == pytest.approx(math.exp(res.val_loss))
    assert any((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # keep-last-2 of steps 3, 6, 8
    assert [step for step, _ in list_checkpoints(res.run_dir / "checkpoints")] == [6, 8]
    # the exports load and compute the trained model's logits
    model = Transformer(train_mod.model_args(s))
    load_checkpoint(res.checkpoint, model)
    tokens = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        want = model(tokens)
        for fmt in ("hf", "meta"):
            got = load_model(res.run_dir / fmt)(tokens)
            assert torch.allclose(got, want, atol=1e-5), fmt
    from herd.tokenizer import load_tokenizer

    assert load_tokenizer(res.run_dir / "hf").encode("hi") == [104, 105]
    assert main(["plot", str(res.run_dir)]) == 0
    assert (res.run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_held_out_files_as_the_validation_set(tmp_path):
    import numpy as np
    import torch.nn.functional as F
    from pretrain_utils import make_corpus

    from herd.data import PackedDataset, byte_tokenizer

    held_out = make_corpus(tmp_path / "held_out", n_files=1, seed=7)
    s = tiny_settings(tmp_path, f"data.val_paths=[{held_out}]", "train.steps=3", "eval.sequences=4")
    res = train(s)
    # the eval loss is the trained model's loss on the held-out file's first 4 windows
    ids = np.array(byte_tokenizer().encode((held_out / "doc0.txt").read_text(), bos=True, eos=True))
    ds = PackedDataset(ids, 64, "train", 0.0)
    model = Transformer(train_mod.model_args(s))
    load_checkpoint(res.checkpoint, model)
    x = torch.from_numpy(np.stack([ds[j][0] for j in range(4)]))
    y = torch.from_numpy(np.stack([ds[j][1] for j in range(4)]))
    with torch.no_grad():
        want = F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    assert res.val_loss == pytest.approx(want, rel=1e-4)


def test_stop_and_resume_gives_bit_identical_losses(tmp_path, monkeypatch):
    """bf16 autocast, grad accumulation, warmup + cosine: a run killed after step 5 and resumed from its step-3
    checkpoint repeats steps 4-5 and continues with exactly the losses of an uninterrupted run."""
    common = ("train.mixed_precision=bf16", "train.steps=8", "checkpoint.every=3", "optim.warmup_steps=3")
    whole = train(tiny_settings(tmp_path, *common, run="whole")).losses

    real_lr_at = train_mod.lr_at

    def stop_at_step_6(step, *a):
        if step == 6:
            raise KeyboardInterrupt  # as if the job were killed during step 6
        return real_lr_at(step, *a)

    monkeypatch.setattr(train_mod, "lr_at", stop_at_step_6)
    s = tiny_settings(tmp_path, *common, run="split")
    with pytest.raises(KeyboardInterrupt):
        train(s)
    monkeypatch.undo()
    assert losses(s.run_dir) == {k: whole[k] for k in range(1, 6)}
    resumed = train(s)
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    assert resumed.losses == {k: whole[k] for k in range(4, 9)}  # bit for bit
    assert losses(s.run_dir) == whole  # metrics.jsonl: each step once, the redone steps replaced


def test_resume_refuses_a_different_run_and_honours_never_required(tmp_path):
    s = tiny_settings(tmp_path, "train.steps=3")
    train(s)
    with pytest.raises(SettingsError, match="different data.seq_len"):
        train(tiny_settings(tmp_path, "train.steps=4", "data.seq_len=32"))
    with pytest.raises(SettingsError, match="already has checkpoints"):
        train(tiny_settings(tmp_path, "checkpoint.resume=never"))
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(tiny_settings(tmp_path, "checkpoint.resume=required", run="other"))
    res = train(tiny_settings(tmp_path, "train.steps=4", "optim.lr=1e-3"))  # more steps, other lr: allowed
    assert sorted(res.losses) == [4]


def test_nan_guard_stops_before_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    cfg = write_config(tmp_path)
    code = main(["pretrain", "--config", str(cfg), "optim.lr=1e9", "optim.warmup_steps=0", "optim.grad_clip=null",
                 "checkpoint.every=1", "checkpoint.keep=5", "train.steps=10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3
    assert err[-1].startswith("herd pretrain: stopped: step ") and "not finite" in err[-1]
    bad_step = int(err[-1].split("step ")[1].split(":")[0])
    assert bad_step >= 2 and "Last good checkpoint: " in err[-1]
    saved = list_checkpoints(tmp_path / "run" / "checkpoints")
    assert [step for step, _ in saved] == list(range(1, bad_step))
    model = Transformer(train_mod.model_args(load_settings(cfg)))
    load_checkpoint(saved[-1][1], model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert f"step-{bad_step - 1:08d}" in err[-1]


def test_injected_inf_gradient_is_caught(tmp_path, monkeypatch):
    real = train_mod.forward_backward

    def poisoned(model, micro, scale, autocast, device, loss_fn):
        out = real(model, micro, scale, autocast, device, loss_fn)
        next(model.parameters()).grad[0, 0] = float("inf")
        return out

    monkeypatch.setattr(train_mod, "forward_backward", poisoned)
    s = tiny_settings(tmp_path)
    before = None
    with pytest.raises(TrainingDiverged, match=r"step 1: loss [0-9.]+ / gradient norm inf is not finite.*none saved"):
        before = train(s)
    assert before is None and not list_checkpoints(Path(s.run_dir) / "checkpoints")


@pytest.mark.parametrize("argv, message", [
    (["--config", "{tmp}/missing.yaml"], "No such file"),
    (["--config", "{cfg}", "optim.learning_rate=1"], "unknown setting optim.learning_rate"),
    (["--config", "{cfg}", "train.steps=0"], "train.steps must be positive"),
    (["--config", "{cfg}", "steps"], "is not KEY=VALUE"),
    (["--config", "{cfg}", "data.paths=[{tmp}/nope]"], "no such file or folder"),
    (["--config", "{cfg}", "model.name=llama-9b"], "unknown model name"),
    (["--config", "{cfg}", "data.seq_len=1000000"], "exceeds the model context"),
    (["--config", "{cfg}", "data.tokenizer=null"], "the tokenizer has 128256 ids but the model's vocab_size is 512"),
])
def test_cli_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, argv, message):
    cfg = write_config(tmp_path)
    argv = [a.format(tmp=tmp_path, cfg=cfg) for a in argv]
    assert main(["pretrain", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herd pretrain: error: ") and message in err[0], err


def test_cli_plot_of_a_folder_without_metrics_is_exit_2(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


@pytest.mark.slow  # torch.compile's first (cold-cache) compilation takes ~25 s on 2 cores
def test_activation_checkpointing_and_compile_keep_the_losses(tmp_path):
    base = train(tiny_settings(tmp_path, "train.steps=3", run="eager")).losses
    ac = train(tiny_settings(tmp_path, "train.steps=3", "train.activation_checkpointing=true", run="ac")).losses
    assert ac == base  # recomputation repeats the same float32 operations
    compiled = train(tiny_settings(tmp_path, "train.steps=3", "train.compile=true", run="compiled")).losses
    for step, loss in compiled.items():
        assert loss == pytest.approx(base[step], rel=1e-4), step
