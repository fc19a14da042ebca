"""The training loop: one function, `train(settings, recipe)`, for a laptop CPU or `torchrun --nproc_per_node N` GPUs.

A step: the global batch (train.batch_size sequences) is split over data-parallel ranks and micro-batches ->
forward under bf16 autocast (or FSDP2 mixed precision) -> summed loss, normalised by the number of labelled tokens
in the whole global batch -> backward -> global gradient norm and clipping -> NaN/inf guard -> AdamW step with the
warmup + cosine learning rate. Around it: held-out loss every eval.every steps, tokens/s and MFU, metrics.jsonl +
TensorBoard, DCP checkpoints (herd.train.dcp), and the recipe's export at the end.

What kind of run it is (its data, model, loss, FLOPs per token and export) is not decided here: a `Recipe` supplies
it. Pretraining and fine-tuning are two recipes (herd.train.recipes); the loop has no branch on which one it runs.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import nn
from tqdm import tqdm

from ..config import ModelArgs, num_params
from . import dcp, parallel
from .data import IGNORE_INDEX, Batch, Loader, collate
from .metrics import Metrics, measure_matmul_peak
from .settings import OptimSettings, RunSettings, SettingsError, check_vocab, settings_changes, validate

# (model, inputs, labels[, positions]) -> summed loss over the labelled tokens (a scalar tensor)
LossFn = Callable[..., torch.Tensor]
Say = Callable[[str], None]


@dataclass(frozen=True)
class Recipe:
    """What makes a kind of training run, supplied to `train` from outside (as torchtitan's model spec is).

    Each field is a plain function of the run settings; the loop calls them in this order:
    `prepare_data(settings, env, dp_rank, dp, say)` -> (Loader over the training rows, held-out dataset, tokenizer);
    `build_model(settings, mesh, device)` -> the model, sharded and wrapped as the settings ask;
    `loss_function(settings, mesh)` and `eval_loss_function(settings, mesh)` -> the training and held-out losses;
    `flops_per_token(settings, model_args)` -> training FLOPs per token, for MFU (herd.sizing.flops_per_token);
    `export(model, settings, run_dir, formats)` -> the folders written at the end (collective; rank 0 writes).
    """

    name: str  # the progress bar's label, e.g. "pretrain"
    prepare_data: Callable[[RunSettings, parallel.DistEnv, int, int, Say], tuple[Loader, object, object]]
    build_model: Callable[[RunSettings, object, torch.device], nn.Module]
    loss_function: Callable[[RunSettings, object], LossFn]
    eval_loss_function: Callable[[RunSettings, object], LossFn]
    flops_per_token: Callable[[RunSettings, ModelArgs], float]
    export: Callable[[nn.Module, RunSettings, Path, list[str]], list[Path]]


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before the optimizer step."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last completed step
    losses: dict[int, float]  # step -> training loss, for the steps run in this call
    val_loss: float | None
    checkpoint: Path | None
    exports: list[Path]


# ---- learning-rate schedule and optimizer -------------------------------------------------------------------


def lr_at(step: int, o: OptimSettings, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    decay = o.decay_steps or total_steps
    p = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, decay - o.warmup_steps)))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def build_optimizer(model: nn.Module, o: OptimSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (a LoRA model's frozen base is not in it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates each tensor in one pass (CPU and CUDA): ~4x less optimizer time than foreach on CPU
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr_at(1, o, 1), betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


# ---- the loop -----------------------------------------------------------------------------------------------


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


class _Say:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, msg: str) -> None:
        if self.on:
            tqdm.write(msg, file=sys.stderr)


def forward_backward(model, micro: list[Batch], scale: float, autocast, device, loss_fn: LossFn) -> torch.Tensor:
    """Summed loss over the micro-batches (a float64 scalar); the gradients of sum * scale accumulate."""
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for b in micro:
        extra = () if b.positions is None else (b.positions.to(device, non_blocking=True),)
        with autocast:
            loss = loss_fn(model, b.inputs.to(device, non_blocking=True), b.labels.to(device, non_blocking=True),
                           *extra)
        (loss * scale).backward()
        loss_sum += loss.detach()
        del loss
    return loss_sum


@torch.no_grad()
def evaluate(model, val_ds, s: RunSettings, device, dp_rank: int, dp: int, group, autocast,
             loss_fn: LossFn) -> float | None:
    """Mean loss over the first eval.sequences held-out sequences: the same set whatever the number of ranks.

    Rank r takes sequences r, r + dp, ...; every rank runs the same number of forwards of the same shapes (FSDP's
    collectives need it), so a rank short of one sequence runs a dummy: a copy of a held-out sequence with every
    label ignored, whose loss and token count are zero."""
    n = min(s.eval.sequences, len(val_ds))
    if not (s.data.val_fraction or s.data.val_paths) or n == 0:
        return None
    per_rank = -(-n // dp)
    mine = list(range(dp_rank, n, dp))
    samples = [val_ds[j] for j in mine]
    if len(samples) < per_rank:
        inputs, labels, *rest = val_ds[0]
        samples += [(inputs, np.full_like(labels, IGNORE_INDEX), *rest)] * (per_rank - len(samples))
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, per_rank, s.train.micro_batch):
        b = collate(samples[i : i + s.train.micro_batch])
        labels = b.labels.to(device)
        positions = None if b.positions is None else b.positions.to(device)
        with autocast:
            tot[0] += loss_fn(model, b.inputs.to(device), labels, *([] if positions is None else [positions]))
        tot[1] += (labels != IGNORE_INDEX).sum()
    model.train()
    _all_reduce_sum(tot, group)
    return (tot[0] / tot[1].clamp(min=1)).item()


def train(s: RunSettings, recipe: Recipe) -> TrainResult:
    """Run (or resume) the training described by `s`, of the kind `recipe` describes; returns when train.steps are
    done. Raises TrainingDiverged (weights untouched since the last good step), SettingsError, DataError."""
    validate(s)
    env = parallel.init_distributed(s.train.device)
    try:
        return _train(s, recipe, env)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(s: RunSettings, recipe: Recipe, env: parallel.DistEnv) -> TrainResult:
    say = _Say(env.is_main)
    if s.train.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    mesh = parallel.build_mesh(env, s.parallel.tp)
    dp = mesh["dp"].size() if mesh is not None else 1
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    dp_group = mesh["dp"].get_group() if dp > 1 else None
    if s.train.batch_size % (s.train.micro_batch * dp):
        raise SettingsError(f"train.batch_size {s.train.batch_size} is not a multiple of micro_batch x dp ranks "
                            f"= {s.train.micro_batch} x {dp}")
    accum = s.train.batch_size // (s.train.micro_batch * dp)
    run_dir, ckpt_dir = Path(s.run_dir), Path(s.run_dir) / "checkpoints"
    torch.manual_seed(s.seed + env.rank)

    loader, val_ds, tok = recipe.prepare_data(s, env, dp_rank, dp, say)
    model = recipe.build_model(s, mesh, env.device)
    args = model.args
    check_vocab(tok, args)
    if s.data.seq_len > args.max_seq_len:
        raise SettingsError(f"data.seq_len {s.data.seq_len} exceeds the model context {args.max_seq_len}")
    optimizer = build_optimizer(model, s.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_only = len(params) < len(list(model.parameters()))  # adapters: checkpoint only what trains
    loss_fn, eval_loss_fn = recipe.loss_function(s, mesh), recipe.eval_loss_function(s, mesh)

    # ---- resume
    start, tokens_seen, last_ckpt = 0, 0, None
    latest = dcp.latest_checkpoint(ckpt_dir)
    if s.checkpoint.resume == "required" and latest is None:
        raise dcp.CheckpointLoadError(f"checkpoint.resume=required but {ckpt_dir} has no complete checkpoint")
    if s.checkpoint.resume == "never" and latest is not None:
        raise SettingsError(f"{ckpt_dir} already has checkpoints and checkpoint.resume=never: use a new run_dir")
    if latest is not None:
        state = dcp.load_checkpoint(latest, model, optimizer, trainable_only=trainable_only)
        fixed, other = settings_changes(state.get("settings", {}), s.to_dict())
        if fixed:
            raise SettingsError(f"{latest} was trained with different {', '.join(fixed)}: resume with the same "
                                "settings, or start a new run_dir")
        loader.load_state_dict(state["loader"])
        start, tokens_seen, last_ckpt = state["step"], state["tokens_seen"], latest
        say(f"resumed from {latest} (step {start})" + (f"; changed settings: {', '.join(other)}" if other else ""))
        if state.get("world_size") != env.world:
            say(f"note: world size changed from {state.get('world_size')} to {env.world}: RNG states not restored")
    elif s.checkpoint.resume == "auto":
        say(f"no checkpoint in {ckpt_dir}: starting from step 0")
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "settings.yaml").write_text(yaml.safe_dump(s.to_dict(), sort_keys=False), encoding="utf-8")

    # ---- numbers for tokens/s and MFU
    use_autocast = s.train.mixed_precision == "bf16" and dp == 1
    autocast = torch.autocast(env.device.type, dtype=torch.bfloat16) if use_autocast else nullcontext()
    compute_dtype = torch.bfloat16 if s.train.mixed_precision == "bf16" else torch.float32
    peak = measure_matmul_peak(env.device, compute_dtype)
    fpt = recipe.flops_per_token(s, args)
    tokens_per_step = s.train.batch_size * s.data.seq_len
    say(f"model: {num_params(args):,} parameters ({sum(p.numel() for p in params):,} trained); {env.world} rank(s) "
        f"(dp {dp} x tp {s.parallel.tp}) on {env.device.type}; {tokens_per_step:,} tokens/step in {accum} "
        f"micro-batch(es) of {s.train.micro_batch}; "
        f"matmul peak {peak / 1e12:.2f} TFLOP/s ({compute_dtype})")

    metrics = Metrics(run_dir, env.is_main, s.log.tensorboard, start)
    bar = tqdm(total=s.train.steps, initial=start, desc=recipe.name, unit="step",
               disable=not (env.is_main and s.log.progress))
    losses: dict[int, float] = {}
    val_loss = None
    try:
        for step in range(start + 1, s.train.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step, s.optim, s.train.steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            micro = [loader.next() for _ in range(accum)]
            # normalise by the labelled tokens of the whole global batch (exact for masked SFT labels too);
            # FSDP averages gradients over dp ranks, hence the factor dp
            n_tok = _all_reduce_sum(torch.tensor(float(sum(int((b.labels != IGNORE_INDEX).sum()) for b in micro)),
                                                device=env.device), dp_group)
            loss_sum = forward_backward(model, micro, dp / max(n_tok.item(), 1.0), autocast, env.device, loss_fn)
            loss_val = (_all_reduce_sum(loss_sum, dp_group) / n_tok.clamp(min=1.0)).item()  # 0 tokens: 0, not NaN
            gnorm = parallel.clip_grad_norm_(params, s.optim.grad_clip).item()
            if not (math.isfinite(loss_val) and math.isfinite(gnorm)):
                metrics.log(step, event="diverged", loss=loss_val, grad_norm=gnorm, lr=lr)
                where = str(last_ckpt) if last_ckpt else "none saved yet"
                raise TrainingDiverged(
                    f"step {step}: loss {loss_val} / gradient norm {gnorm} is not finite; stopped before the optimizer "
                    f"step. Last good checkpoint: {where}. Lower optim.lr (now {s.optim.lr:g}), lengthen "
                    "optim.warmup_steps or set optim.grad_clip.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step_time = time.perf_counter() - t0
            tokens_seen += tokens_per_step
            tps = tokens_per_step / step_time
            mfu = fpt * tps / (peak * env.world)
            losses[step] = loss_val
            metrics.log(step, loss=loss_val, lr=lr, grad_norm=gnorm, tokens=tokens_seen, tokens_per_s=tps, mfu=mfu,
                        step_time=step_time, loss_tokens=int(n_tok.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")

            last = step == s.train.steps
            if (s.eval.every and step % s.eval.every == 0) or last:
                val_loss = evaluate(model, val_ds, s, env.device, dp_rank, dp, dp_group, autocast, eval_loss_fn)
                if val_loss is not None:
                    metrics.log(step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 80.0)))
                    say(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 80.0)):.2f}")
            if (s.checkpoint.every and step % s.checkpoint.every == 0) or last:
                state = {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "settings": s.to_dict(),
                         "loss": loss_val, "lr": lr}
                last_ckpt = dcp.save_checkpoint(ckpt_dir, step, model, optimizer, state, keep=s.checkpoint.keep,
                                                trainable_only=trainable_only)
    finally:
        bar.close()
        metrics.close()

    exports = recipe.export(model, s, run_dir, [f for f in ("hf", "meta") if getattr(s.export, f)])
    for p in exports:
        say(f"exported {p}")
    return TrainResult(run_dir, max(start, s.train.steps), losses, val_loss, last_ckpt, exports)
