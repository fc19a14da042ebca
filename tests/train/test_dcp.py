"""Training checkpoints: complete-or-ignored folders, keep-last-k, kill -9 mid-save, hostile metadata."""

import os
import pickle
import signal
import subprocess
import sys
import time

import pytest
import torch

from herd.config import get_config
from herd.model import Transformer
from herd.train import PRETRAINING, train
from herd.train import dcp

from .pretrain_utils import child_env, losses, tiny_settings, write_config


def tiny_model_and_optimizer(seed=0):
    torch.manual_seed(seed)
    model = Transformer(get_config("tiny-tied"))
    model.init_weights()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 512, (2, 8))).logsumexp(-1).mean().backward()
    opt.step()
    return model, opt


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, opt = tiny_model_and_optimizer()
    torch.manual_seed(123)
    path = dcp.save_checkpoint(tmp_path, 7, model, opt, {"tokens_seen": 5, "loader": {"epoch": 1}})
    expected_draw = torch.rand(3)
    assert path.name == "step-00000007" and (path / dcp.MARKER).is_file()

    other, other_opt = tiny_model_and_optimizer(seed=1)
    state = dcp.load_checkpoint(path, other, other_opt)
    assert state["step"] == 7 and state["tokens_seen"] == 5 and state["loader"] == {"epoch": 1}
    assert torch.equal(torch.rand(3), expected_draw)  # the RNG continues where it was saved
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    assert other.output.weight is other.tok_embeddings.weight  # still tied
    s1, s2 = opt.state_dict()["state"], other_opt.state_dict()["state"]
    assert s1.keys() == s2.keys()
    for k in s1:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1[k][name], s2[k][name])
    assert not any(f.suffix == ".pkl" for f in path.iterdir())


def test_incomplete_folders_are_ignored_then_cleaned_and_keep_last_k(tmp_path):
    model, opt = tiny_model_and_optimizer()
    for step in (1, 2, 3):
        dcp.save_checkpoint(tmp_path, step, model, opt, {}, keep=2)
    assert [s for s, _ in dcp.list_checkpoints(tmp_path)] == [2, 3]
    (tmp_path / "step-00000009.partial").mkdir()  # a save that was killed
    (tmp_path / "step-00000008").mkdir()  # a folder without COMPLETE (e.g. copied half-way)
    (tmp_path / "step-00000001.deleting").mkdir()  # a prune that was killed
    assert dcp.latest_checkpoint(tmp_path).name == "step-00000003"
    with pytest.raises(dcp.CheckpointLoadError, match="no COMPLETE marker"):
        dcp.load_checkpoint(tmp_path / "step-00000008", model)
    removed = dcp.clean_stale(tmp_path)
    assert sorted(p.name for p in removed) == ["step-00000001.deleting", "step-00000008", "step-00000009.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]


def test_metadata_pickle_with_a_payload_is_refused_and_never_run(tmp_path):
    model, opt = tiny_model_and_optimizer()
    path = dcp.save_checkpoint(tmp_path, 1, model, opt, {})
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (path / ".metadata").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(dcp.CheckpointLoadError, match="names posix.system|names os.system"):
        dcp.load_checkpoint(path, model, opt)
    assert not marker.exists()


KILLER = r"""
import sys, time
from pathlib import Path
from herd.train import dcp
from herd.cli import main

point, flag = sys.argv[1], Path(sys.argv[2])

def hang():
    flag.write_text("saving")
    time.sleep(600)

if point == "dcp":  # inside DCP's writes: the shard files exist, nothing else does
    real_save = dcp.distcp.save
    def save(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        if "step-00000004" in str(checkpoint_id):
            hang()
    dcp.distcp.save = save
else:  # the COMPLETE marker is written and synced, the rename has not happened
    real_write = dcp._write_json
    def write_json(path, obj):
        real_write(path, obj)
        if path.name == dcp.MARKER and obj["step"] == 4:
            hang()
    dcp._write_json = write_json
sys.exit(main(["pretrain", "--config", sys.argv[3], *sys.argv[4:]]))
"""


@pytest.mark.parametrize("point", ["dcp", "commit"])
def test_kill_9_during_a_save_leaves_the_previous_checkpoint_loadable(tmp_path, point):
    cfg = write_config(tmp_path)
    flag = tmp_path / "flag"
    args = ["train.steps=6", "checkpoint.every=2", "checkpoint.keep=1"]
    proc = subprocess.Popen([sys.executable, "-c", KILLER, point, str(flag), str(cfg), *args], env=child_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while not flag.exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "the save at step 4 never started"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    ckpts = tmp_path / "run" / "checkpoints"
    assert (ckpts / "step-00000004.partial").is_dir()  # the killed save, never picked
    assert [s for s, _ in dcp.list_checkpoints(ckpts)] == [2]  # keep=1 had not pruned step 2 yet
    s = tiny_settings(tmp_path, *args)
    model = Transformer(get_config("tiny"))
    assert dcp.load_checkpoint(dcp.latest_checkpoint(ckpts), model)["step"] == 2

    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')  # a metrics line cut by the kill
    res = train(s, PRETRAINING)  # resumes from step 2 and cleans the partial folder on its next save
    assert sorted(res.losses) == [3, 4, 5, 6]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000006"]
    assert sorted(losses(s.run_dir)) == [1, 2, 3, 4, 5, 6]
