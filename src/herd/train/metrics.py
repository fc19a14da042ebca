"""What a training run records, and reading it back: a measured matmul peak (for MFU), the metrics.jsonl +
TensorBoard writer, and `herd plot RUN_DIR` (loss curves as a PNG, matplotlib's Agg backend).

MFU = (training FLOPs per token x tokens/s) / (matmul peak x devices). The FLOPs per token are
herd.sizing.flops_per_token, the formula `herd plan` uses too. The peak is the best n x n matmul rate measured on
this device at the start of the run in the compute dtype, not a datasheet number, so on CPUs and throttled GPUs
the ratio says how much of what the hardware can actually do is used.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..config import JSONError, parse_json


def measure_matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, max_iters: int = 10,
                        budget_s: float = 0.25) -> float:
    """Best FLOP/s of an n x n matmul on this device and dtype: the denominator of MFU, measured, not quoted.

    The best of up to `max_iters` timed calls (at least 2, stopping once `budget_s` is spent): on a shared machine
    the best call is the one that ran with the cores to itself.
    """
    n = n or (8192 if device.type == "cuda" else 2048)
    g = torch.Generator(device=device).manual_seed(0)  # its own generator: a resumed run's RNG stays as saved
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b  # warm-up
    best, spent = float("inf"), 0.0
    for i in range(max_iters):
        sync()
        t0 = time.perf_counter()
        a @ b
        sync()
        dt = time.perf_counter() - t0
        best, spent = min(best, dt), spent + dt
        if i >= 1 and spent > budget_s:
            break
    return 2 * n**3 / best


def _step_of(line: str) -> int | None:
    try:
        return int(parse_json(line)["step"])
    except (ValueError, KeyError, TypeError):  # JSONError is a ValueError
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that a kill at any instant leaves the old file or the new one, never an empty
    or half-written one: a temp file in the same folder, fsync, os.replace, fsync of the folder."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - a folder that cannot be opened (not on Linux)
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Metrics:
    """metrics.jsonl (one JSON object per line) and TensorBoard scalars, written by rank 0 only."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, resume_step: int):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if not enabled:
            return
        if resume_step and self.path.exists():  # drop rows of steps after the checkpoint: they are redone
            keep = [ln for ln in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if _step_of(ln) is not None and _step_of(ln) <= resume_step]  # a line cut by a kill is dropped
            _write_atomic(self.path, "".join(ln + "\n" for ln in keep))
        elif not resume_step:
            self.path.unlink(missing_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                raise ImportError("log.tensorboard needs the tensorboard package (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        # NaN/inf are not JSON: written as strings ("nan"), which readers skip
        row = {"step": step, **{k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                                for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ---- reading a run back ---------------------------------------------------------------------------------------


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """The rows of RUN_DIR/metrics.jsonl (or of a metrics.jsonl path); bad lines are an error naming the line."""
    path = Path(run_dir)
    path = path / "metrics.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is this a herd run folder?)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(parse_json(line))
            except JSONError as e:
                raise ValueError(f"{path}:{n}: {e.reason}") from None
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_run(run_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Write training and held-out loss (top) and learning rate (bottom) against step; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(run_dir)
    steps, loss = _series(rows, "loss")
    if not steps:
        raise ValueError(f"{run_dir}: metrics.jsonl has no training loss yet")
    vsteps, vloss = _series(rows, "val_loss")
    lsteps, lr = _series(rows, "lr")
    fig, (ax, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax.plot(steps, loss, lw=0.8, alpha=0.6, label="train loss")
    if len(loss) >= 20:  # a moving average makes the trend readable under step-to-step noise
        k = max(5, len(loss) // 50)
        avg = [sum(loss[max(0, i - k + 1) : i + 1]) / len(loss[max(0, i - k + 1) : i + 1]) for i in range(len(loss))]
        ax.plot(steps, avg, lw=1.5, label=f"train loss ({k}-step mean)")
    if vsteps:
        ax.plot(vsteps, vloss, "o-", lw=1.5, label="held-out loss")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{Path(run_dir).resolve().name}: {steps[-1]} steps")
    ax.grid(alpha=0.3)
    ax.legend()
    ax_lr.plot(lsteps, lr, color="gray")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if out else (Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent) / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
