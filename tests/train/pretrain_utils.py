"""Shared pieces of the training tests: a small generated corpus and tiny run settings."""

import os
import random
import subprocess
import sys
from pathlib import Path

import yaml

from herd.train.settings import RunSettings, apply_overrides, settings_from_dict, validate

WORDS = ("the a model token loss step llama herd data train eval checkpoint shard rank gradient of to and is "
         "in it for on with as at by we are be this that from or").split()


def make_corpus(folder: Path, n_files: int = 3, lines: int = 200, seed: int = 0) -> Path:
    """A folder of deterministic pseudo-English text files (~20 KB each at the defaults)."""
    folder.mkdir(parents=True, exist_ok=True)
    r = random.Random(seed)
    for i in range(n_files):
        text = "\n".join(" ".join(r.choice(WORDS) for _ in range(14)) + "." for _ in range(lines))
        (folder / f"doc{i}.txt").write_text(text, encoding="utf-8")
    return folder


def tiny_dict(tmp_path: Path, run: str = "run") -> dict:
    """Settings of a tiny fp32 run (2 layers, dim 64, byte ids, 64-token sequences): a step is milliseconds."""
    corpus = tmp_path / "corpus"
    if not corpus.exists():
        make_corpus(corpus)
    return {
        "run_dir": str(tmp_path / run),
        "seed": 0,
        "model": {"name": "tiny"},
        "data": {"paths": [str(corpus)], "tokenizer": "bytes", "seq_len": 64, "val_fraction": 0.1,
                 "cache_dir": str(tmp_path / "cache"), "workers": 1},
        "optim": {"lr": 2e-3, "warmup_steps": 2},
        "train": {"steps": 6, "batch_size": 8, "micro_batch": 4, "mixed_precision": "fp32"},
        "eval": {"every": 3, "sequences": 8},
        "checkpoint": {"every": 3, "keep": 2},
        "log": {"tensorboard": False, "progress": False},
        "export": {"hf": False, "meta": False},
    }


def tiny_settings(tmp_path: Path, *overrides: str, run: str = "run") -> RunSettings:
    s = settings_from_dict(apply_overrides(tiny_dict(tmp_path, run), list(overrides)))
    validate(s)
    return s


def write_config(tmp_path: Path, name: str = "cfg.yaml", run: str = "run") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny_dict(tmp_path, run)), encoding="utf-8")
    return path


def child_env() -> dict:
    # one thread per process: two ranks share this machine's cores
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def torchrun(nproc: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "herd", *args]
    return subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=timeout)


def losses(run_dir: Path) -> dict[int, float]:
    import json

    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "event" not in r}
