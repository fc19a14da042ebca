"""The training loop: the schedule, a whole tiny run, exact resume, the NaN guard and the CLI's errors."""

import json
import math
from pathlib import Path

import pytest
import torch

from herd.cli import main
from herd.loading import load_model
from herd.model import Transformer
from herd.sizing import flops_per_token
from herd.train import PRETRAINING, SettingsError, TrainingDiverged, load_settings, loop, train
from herd.train.dcp import list_checkpoints, load_checkpoint
from herd.train.loop import lr_at
from herd.train.settings import OptimSettings, model_args

from .pretrain_utils import losses, tiny_settings, write_config


def test_warmup_then_cosine():
    o = OptimSettings(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(1, o, 110) == pytest.approx(0.1) and lr_at(10, o, 110) == pytest.approx(1.0)
    assert lr_at(60, o, 110) == pytest.approx(0.55)  # half way down the cosine
    assert lr_at(110, o, 110) == pytest.approx(0.1) and lr_at(500, o, 110) == pytest.approx(0.1)
    steps = [lr_at(i, o, 110) for i in range(10, 111)]
    assert all(a >= b for a, b in zip(steps, steps[1:]))


def test_tiny_run_end_to_end(tmp_path, monkeypatch):
    s = tiny_settings(tmp_path, "log.tensorboard=true", "export.hf=true", "export.meta=true", "export.dtype=fp32",
                      "train.steps=8", "checkpoint.every=3", "checkpoint.keep=2")
    monkeypatch.setattr(loop, "measure_matmul_peak", lambda device, dtype: 1e12)  # a known MFU denominator
    res = train(s, PRETRAINING)
    assert res.step == 8 and sorted(res.losses) == list(range(1, 9))
    assert res.losses[8] < res.losses[1] - 0.5  # it learns
    rows = [json.loads(ln) for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    assert all(r["tokens_per_s"] > 0 and r["grad_norm"] > 0 for r in train_rows)
    # tokens/s and MFU are the formulas of their step's time: 8 x 64 tokens, herd.sizing's FLOPs over the peak
    fpt = flops_per_token(model_args(s), 64)
    for r in train_rows:
        assert r["tokens_per_s"] == pytest.approx(8 * 64 / r["step_time"], rel=1e-9)
        assert r["mfu"] == pytest.approx(fpt * r["tokens_per_s"] / 1e12, rel=1e-9)
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6, 8] and evals[-1]["val_ppl"] == pytest.approx(math.exp(res.val_loss))
    assert any((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    # keep-last-2 of steps 3, 6, 8
    assert [step for step, _ in list_checkpoints(res.run_dir / "checkpoints")] == [6, 8]
    # the exports load and compute the trained model's logits
    model = Transformer(model_args(s))
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


def test_stop_and_resume_gives_bit_identical_losses(tmp_path, monkeypatch):
    """bf16 autocast, grad accumulation, warmup + cosine: a run killed after step 5 and resumed from its step-3
    checkpoint repeats steps 4-5 and continues with exactly the losses of an uninterrupted run."""
    common = ("train.mixed_precision=bf16", "train.steps=8", "checkpoint.every=3", "optim.warmup_steps=3")
    whole = train(tiny_settings(tmp_path, *common, run="whole"), PRETRAINING).losses

    real_lr_at = loop.lr_at

    def stop_at_step_6(step, *a):
        if step == 6:
            raise KeyboardInterrupt  # as if the job were killed during step 6
        return real_lr_at(step, *a)

    monkeypatch.setattr(loop, "lr_at", stop_at_step_6)
    s = tiny_settings(tmp_path, *common, run="split")
    with pytest.raises(KeyboardInterrupt):
        train(s, PRETRAINING)
    monkeypatch.undo()
    assert losses(s.run_dir) == {k: whole[k] for k in range(1, 6)}
    resumed = train(s, PRETRAINING)
    assert sorted(resumed.losses) == [4, 5, 6, 7, 8]
    assert resumed.losses == {k: whole[k] for k in range(4, 9)}  # bit for bit
    assert losses(s.run_dir) == whole  # metrics.jsonl: each step once, the redone steps replaced


def test_resume_refuses_a_different_run_and_honours_never_required(tmp_path):
    s = tiny_settings(tmp_path, "train.steps=3")
    train(s, PRETRAINING)
    with pytest.raises(SettingsError, match="different data.seq_len"):
        train(tiny_settings(tmp_path, "train.steps=4", "data.seq_len=32"), PRETRAINING)
    with pytest.raises(SettingsError, match="already has checkpoints"):
        train(tiny_settings(tmp_path, "checkpoint.resume=never"), PRETRAINING)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(tiny_settings(tmp_path, "checkpoint.resume=required", run="other"), PRETRAINING)
    res = train(tiny_settings(tmp_path, "train.steps=4", "optim.lr=1e-3"), PRETRAINING)  # more steps, other lr: allowed
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
    model = Transformer(model_args(load_settings(cfg)))
    load_checkpoint(saved[-1][1], model)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert f"step-{bad_step - 1:08d}" in err[-1]


def test_injected_inf_gradient_is_caught(tmp_path, monkeypatch):
    real = loop.forward_backward

    def poisoned(model, micro, scale, autocast, device, loss_fn):
        out = real(model, micro, scale, autocast, device, loss_fn)
        next(model.parameters()).grad[0, 0] = float("inf")
        return out

    monkeypatch.setattr(loop, "forward_backward", poisoned)
    s = tiny_settings(tmp_path)
    before = None
    with pytest.raises(TrainingDiverged, match=r"step 1: loss [0-9.]+ / gradient norm inf is not finite.*none saved"):
        before = train(s, PRETRAINING)
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


def test_metrics_rewrite_on_resume_is_atomic(tmp_path, monkeypatch):
    from herd.train import metrics as metrics_module
    from herd.train.metrics import Metrics

    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": i, "loss": 1.0 / i}) + "\n" for i in range(1, 7))
    path.write_text(rows + '{"step": 7, "lo')  # a line cut by a kill
    # killed while rewriting: the write of the new file happens, the rename never does -> the old file is intact
    class Killed(BaseException):
        pass

    monkeypatch.setattr(metrics_module.os, "replace", lambda *a: (_ for _ in ()).throw(Killed()))  # os itself
    with pytest.raises(Killed):
        Metrics(tmp_path, enabled=True, tensorboard=False, resume_step=4)
    assert path.read_text() == rows + '{"step": 7, "lo'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temp file left behind
    monkeypatch.undo()
    m = Metrics(tmp_path, enabled=True, tensorboard=False, resume_step=4)
    m.log(5, loss=0.5)
    m.close()
    assert [json.loads(ln)["step"] for ln in path.read_text().splitlines()] == [1, 2, 3, 4, 5]


def test_read_metrics_bounds_nesting(tmp_path):
    from herd.train.metrics import read_metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: too deeply nested"):
        read_metrics(tmp_path)
