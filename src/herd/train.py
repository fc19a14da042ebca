"""The training loop: one function, `train(settings)`, for a laptop CPU or `torchrun --nproc_per_node N` GPUs.

A step: the global batch (train.batch_size sequences) is split over data-parallel ranks and micro-batches ->
forward under bf16 autocast (or FSDP2 mixed precision) -> summed cross-entropy, normalised by the number of
labelled tokens in the whole global batch -> backward -> global gradient norm and clipping -> NaN/inf guard ->
AdamW step with the warmup + cosine learning rate. Around it: held-out loss every eval.every steps, tokens/s and
MFU, metrics.jsonl + TensorBoard, DCP checkpoints (herd.checkpointing), and HF + Meta exports at the end.

Settings are typed dataclasses read from YAML (configs/*.yaml) plus `key=value` overrides; unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from tqdm import tqdm

from . import checkpointing as ckpt
from . import data as data_mod
from . import parallel
from .config import ModelArgs, get_config, num_params
from .data import IGNORE_INDEX, Batch, DataError, Loader, PackedDataset
from .metrics import Metrics, flops_per_token, measure_matmul_peak
from .model import Transformer
from .settings import SettingsError, apply_overrides, from_dict


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm became NaN/inf; training stopped before the optimizer step."""


# ---- settings -----------------------------------------------------------------------------------------------


@dataclass
class ModelSettings:
    name: str = "tiny"  # a herd config name (herd.config.CONFIGS), e.g. tiny, llama-3.2-1b
    overrides: dict = field(default_factory=dict)  # ModelArgs fields to change in that config, e.g. {dim: 768}
    init_from: str | None = None  # HF/Meta checkpoint to continue from instead of random weights (name ignored)
    init_std: float = 0.02  # std of the random initialisation (output projections scaled by depth)


@dataclass
class DataSettings:
    paths: list[str] = field(default_factory=list)  # text files and folders (folders: files matching `patterns`)
    tokenizer: str | None = None  # null: the Llama 3 vocabulary; "bytes": 512 byte-level ids; or a file/folder
    seq_len: int = 512  # tokens per training sequence
    val_fraction: float = 0.01  # share of sequences held out for eval (spread evenly through the data)
    val_paths: list[str] = field(default_factory=list)  # held-out files/folders instead (then val_fraction is unused)
    patterns: list[str] = field(default_factory=lambda: list(data_mod.DEFAULT_PATTERNS))
    bos: bool = True  # wrap every document as <|begin_of_text|> ... <|end_of_text|>
    eos: bool = True
    encoding_errors: str = "strict"  # strict: invalid UTF-8 is an error naming the file; replace: U+FFFD
    cache_dir: str | None = None  # token cache (default $HERD_CACHE or ~/.cache/herd, then data/)
    workers: int = 4  # tokenizer threads


@dataclass
class OptimSettings:
    lr: float = 3e-4  # peak learning rate (AdamW)
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100  # linear warmup from lr / warmup_steps
    decay_steps: int | None = None  # step where the cosine reaches its minimum (default: train.steps)
    weight_decay: float = 0.1  # on matrices and embeddings, not on norm weights
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient L2 norm (null: no clipping)


@dataclass
class TrainSettings:
    steps: int = 1000  # optimizer steps in the whole run (a resumed run continues up to it)
    batch_size: int = 32  # global sequences per optimizer step, whatever the number of ranks
    micro_batch: int = 4  # sequences per rank per forward; accumulation = batch_size / (micro_batch * dp ranks)
    mixed_precision: str = "bf16"  # bf16 (autocast, or FSDP2 param casts) | fp32
    activation_checkpointing: bool = False  # recompute each block in the backward pass (less memory)
    compile: bool = False  # torch.compile: forward + loss as one graph (one process), or each block (sharded)
    device: str = "auto"  # auto: cuda when present, else cpu
    deterministic: bool = False  # torch.use_deterministic_algorithms (bit-exact resume on GPUs too)


@dataclass
class EvalSettings:
    every: int = 100  # steps between held-out evaluations (0: only at the end)
    sequences: int = 64  # held-out sequences per evaluation (the first ones of the split, split over ranks)


@dataclass
class CheckpointSettings:
    every: int = 500  # steps between checkpoints (0: only at the end)
    keep: int = 2  # complete checkpoints kept (older ones are deleted)
    resume: str = "auto"  # auto: continue from the latest checkpoint if any | required | never


@dataclass
class LogSettings:
    tensorboard: bool = True  # event files in run_dir/tensorboard (metrics.jsonl is always written)
    progress: bool = True  # tqdm bar on rank 0


@dataclass
class ExportSettings:
    hf: bool = True  # run_dir/hf: config.json + model.safetensors (+ tokenizer when herd may copy it)
    meta: bool = True  # run_dir/meta: params.json + consolidated.00.pth
    dtype: str = "bf16"  # bf16 | fp16 | fp32
    merged: bool = False  # LoRA/QLoRA: also write the base + adapter merged (hf/meta above) from model.init_from


@dataclass
class FinetuneSettings:
    """`herd finetune`: chat/Alpaca JSONL in data.paths (see herd.sft), a method, and its adapter settings."""

    method: str = "lora"  # full | lora | qlora (LoRA on a frozen base quantized to qlora_dtype)
    format: str = "auto"  # auto | chat ({"messages": [...]}) | alpaca ({"instruction", "input", "output"})
    packing: str = "pack"  # pack: dialogs share rows, block-diagonal attention | pad: one dialog per row
    bad_data: str = "error"  # error: stop at the first bad record (file:line) | skip: drop it, count and log it
    max_samples: int | None = None  # use only the first N usable dialogs (before the held-out split)
    base_dtype: str = "fp32"  # lora/qlora: frozen float weights (embeddings, norms, lora's base) fp32 | bf16
    lora_rank: int = 16
    lora_alpha: float = 32.0  # the update is scaled by alpha / rank
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    qlora_dtype: str = "int4"  # int4: groups of qlora_group_size along K (herd.quantize) | int8: per channel
    qlora_group_size: int = 64  # 32 | 64 | 128 | 256


@dataclass
class ParallelSettings:
    tp: int = 1  # tensor-parallel size; data-parallel (FSDP2) size is world_size / tp


@dataclass
class RunSettings:
    run_dir: str = "runs/default"  # metrics, checkpoints/, tensorboard/, exports
    seed: int = 0  # weight init, data order
    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    log: LogSettings = field(default_factory=LogSettings)
    export: ExportSettings = field(default_factory=ExportSettings)
    parallel: ParallelSettings = field(default_factory=ParallelSettings)
    finetune: FinetuneSettings | None = None  # set by `herd finetune` configs; None: pretraining

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_from_dict(d: dict | None, cls=RunSettings, prefix: str = ""):
    """Build a settings dataclass from a plain dict; unknown keys and wrong types are SettingsErrors."""
    return from_dict(d, cls, prefix)


def load_settings(path: str | os.PathLike | None = None, overrides: list[str] = ()) -> RunSettings:
    """Settings from a YAML file (None: defaults) with `key=value` overrides; validated."""
    raw: dict = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"{path}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise SettingsError(f"{path}: expected a mapping of settings at the top level")
    s = settings_from_dict(apply_overrides(raw, list(overrides)))
    validate(s)
    return s


def validate(s: RunSettings) -> None:
    def need(ok: bool, msg: str):
        if not ok:
            raise SettingsError(msg)

    t, o, dt = s.train, s.optim, s.data
    need(t.steps > 0, f"train.steps must be positive, got {t.steps}")
    need(t.batch_size > 0 and t.micro_batch > 0, "train.batch_size and train.micro_batch must be positive")
    need(t.batch_size % t.micro_batch == 0,
         f"train.batch_size {t.batch_size} is not a multiple of micro_batch {t.micro_batch}")
    need(t.mixed_precision in ("bf16", "fp32"),
         f"train.mixed_precision must be bf16 or fp32, got {t.mixed_precision!r}")
    need(bool(dt.paths), "data.paths is empty: name text files or folders to train on")
    need(dt.seq_len >= 2, f"data.seq_len must be >= 2, got {dt.seq_len}")
    need(0.0 <= dt.val_fraction < 1.0, f"data.val_fraction must be in [0, 1), got {dt.val_fraction}")
    need(dt.encoding_errors in ("strict", "replace"), "data.encoding_errors must be strict or replace")
    need(math.isfinite(o.lr) and o.lr > 0, f"optim.lr must be a positive number, got {o.lr}")
    need(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    need(o.warmup_steps >= 0 and (o.decay_steps is None or o.decay_steps > 0),
         "optim.warmup_steps must be >= 0 and optim.decay_steps positive or null")
    need(o.grad_clip is None or o.grad_clip > 0, f"optim.grad_clip must be positive or null, got {o.grad_clip}")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1 and o.eps > 0 and o.weight_decay >= 0,
         "optim: beta1/beta2 must be in [0, 1), eps positive, weight_decay >= 0")
    need(s.eval.every >= 0 and s.eval.sequences >= 0, "eval.every and eval.sequences must be >= 0")
    need(s.checkpoint.every >= 0 and s.checkpoint.keep >= 1, "checkpoint.every must be >= 0 and checkpoint.keep >= 1")
    need(s.checkpoint.resume in ("auto", "required", "never"), "checkpoint.resume must be auto, required or never")
    need(s.export.dtype in ("bf16", "fp16", "fp32"), "export.dtype must be bf16, fp16 or fp32")
    need(s.parallel.tp >= 1, "parallel.tp must be >= 1")
    need(not (s.model.init_from and s.model.overrides), "model.overrides cannot change a model.init_from checkpoint")
    # torch 2.13: compiled TP blocks fail in DTensor's redistribute backward ('Tensor' has no '_local_tensor')
    need(not (s.train.compile and s.parallel.tp > 1), "train.compile is not supported with parallel.tp > 1 yet: "
         "set train.compile=false (FSDP-only runs compile each block)")
    if not s.model.init_from:  # unknown names or override keys fail here, before any data is read
        ctx = model_args(s).max_seq_len
        need(dt.seq_len <= ctx, f"data.seq_len {dt.seq_len} exceeds the model context {ctx} (max_seq_len)")
    if s.finetune is not None:
        from .finetune import validate_finetune

        validate_finetune(s)


def model_args(s: RunSettings) -> ModelArgs:
    args = get_config(s.model.name)
    return args.replace(**s.model.overrides) if s.model.overrides else args


# Settings that make a checkpoint a different run: resuming with other values is refused.
RUN_DEFINING = ("seed", "model", "data.paths", "data.tokenizer", "data.seq_len", "data.val_fraction",
                "data.patterns", "data.bos", "data.eos", "train.batch_size", "finetune")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def settings_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(run-defining keys that differ, other keys that differ) between two settings dicts."""
    a, b = _flat(old), _flat(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    fixed = [k for k in changed if any(k == r or k.startswith(r + ".") for r in RUN_DEFINING)]
    return fixed, [k for k in changed if k not in fixed]


# ---- learning-rate schedule ---------------------------------------------------------------------------------


def lr_at(step: int, o: OptimSettings, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (1-based): linear warmup, then cosine to lr * min_lr_ratio."""
    if o.warmup_steps and step <= o.warmup_steps:
        return o.lr * step / o.warmup_steps
    decay = o.decay_steps or total_steps
    p = min(1.0, max(0.0, (step - o.warmup_steps) / max(1, decay - o.warmup_steps)))
    return o.lr * (o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ---- building the model -------------------------------------------------------------------------------------


def build_model(s: RunSettings, mesh, device: torch.device) -> Transformer:
    """Full model initialised identically on every rank (seeded), then TP / AC / compile / FSDP applied."""
    if s.model.init_from:
        from .checkpoint import load_model

        src = load_model(s.model.init_from, dtype=torch.float32)
        model = Transformer(src.args)
        model.load_state_dict(src.state_dict())  # copies out of the memory-mapped checkpoint
        del src
    else:
        model = Transformer(model_args(s))
        model.init_weights(s.model.init_std, torch.Generator().manual_seed(s.seed))
    bf16 = s.train.mixed_precision == "bf16"
    dp = mesh["dp"].size() if mesh is not None else 1
    if mesh is not None and s.parallel.tp > 1:
        model.to(device)
        parallel.apply_tp(model, mesh["tp"])
    if s.train.activation_checkpointing:
        parallel.apply_ac(model)
    if s.train.compile and mesh is not None:  # sharded: FSDP/TP hooks sit between blocks, so compile each block
        parallel.apply_compile(model)
    if dp > 1:
        parallel.apply_fsdp(model, mesh["dp"], torch.bfloat16 if bf16 else None)
    return model.to(device)


def build_optimizer(model: Transformer, o: OptimSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (a LoRA model's frozen base is not in it)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # the fused kernel updates each tensor in one pass (CPU and CUDA): ~4x less optimizer time than foreach on CPU
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr_at(1, o, 1), betas=(o.beta1, o.beta2), eps=o.eps, fused=fused)


# ---- the loop -----------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int  # last completed step
    losses: dict[int, float]  # step -> training loss, for the steps run in this call
    val_loss: float | None
    checkpoint: Path | None
    exports: list[Path]


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


def _prepare_data(s: RunSettings, env, dp_rank: int, dp: int, say) -> tuple[Loader, PackedDataset, object]:
    tok = data_mod.load_text_tokenizer(s.data.tokenizer)
    if not s.model.init_from:  # before tokenizing anything (init_from models are checked once loaded)
        _check_vocab(tok, model_args(s))
    cache = s.data.cache_dir or os.path.join(os.environ.get("HERD_CACHE", "~/.cache/herd"), "data")
    kw = dict(patterns=s.data.patterns, bos=s.data.bos, eos=s.data.eos, encoding_errors=s.data.encoding_errors,
              workers=s.data.workers)

    def corpus(paths):
        if env.local_rank == 0:  # one tokenizer pass per machine; the other ranks then find the cache
            out = data_mod.tokenize_corpus(paths, tok, cache, progress=s.log.progress and env.is_main, **kw)
        if env.world > 1:
            dist.barrier()
        if env.local_rank != 0:
            out = data_mod.tokenize_corpus(paths, tok, cache, progress=False, **kw)
        return out

    tc = corpus(s.data.paths)
    how = "cached" if tc.reused else "tokenized"
    say(f"data: {len(tc.tokens):,} tokens in {tc.n_docs:,} documents ({how}: {tc.folder})")
    if s.data.val_paths:  # whole held-out documents (e.g. plays never seen in training)
        vc = corpus(s.data.val_paths)
        train_ds = PackedDataset(tc.tokens, s.data.seq_len, "train", 0.0)
        val_ds = PackedDataset(vc.tokens, s.data.seq_len, "train", 0.0)
    else:
        train_ds = PackedDataset(tc.tokens, s.data.seq_len, "train", s.data.val_fraction)
        val_ds = PackedDataset(tc.tokens, s.data.seq_len, "val", s.data.val_fraction)
    if (s.data.val_fraction or s.data.val_paths) and s.eval.sequences and len(val_ds) < dp:
        raise DataError(f"the held-out split has {len(val_ds)} sequences, fewer than the {dp} data-parallel ranks: "
                        "raise data.val_fraction or add data")
    loader = Loader(train_ds, s.train.micro_batch, rank=dp_rank, world=dp, seed=s.seed)
    return loader, val_ds, tok


def _check_vocab(tok, args: ModelArgs) -> None:
    if tok.n_words > args.vocab_size:
        raise SettingsError(f"the tokenizer has {tok.n_words} ids but the model's vocab_size is {args.vocab_size} "
                            "(data.tokenizer: bytes has 512, the Llama 3 vocabulary 128256)")


def causal_lm_loss(model, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None):
    """Summed next-token cross-entropy of (B, T) inputs against (B, T) labels (IGNORE_INDEX: no loss). Packed rows
    pass `positions` (restarting at 0 per document): RoPE positions + a block-diagonal causal mask."""
    if positions is None:
        logits = model(inputs)  # (B, T, V) float32
    else:
        logits = model(inputs, input_pos=positions, mask=data_mod.document_mask(positions))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_function(s: RunSettings, mesh):
    """`causal_lm_loss`, compiled as one graph with the model when train.compile and the model is not sharded
    (measured on CPU: ~5% faster than compiling each block, the same as compiling transformers' whole model)."""
    return torch.compile(causal_lm_loss) if s.train.compile and mesh is None else causal_lm_loss


def forward_backward(model, micro: list[Batch], scale: float, autocast, device, loss_fn=causal_lm_loss) -> torch.Tensor:
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
             loss_fn=causal_lm_loss) -> float | None:
    """Mean loss over the first eval.sequences held-out sequences: the same set whatever the number of ranks."""
    n = min(s.eval.sequences, len(val_ds))
    n -= n % dp  # every rank runs the same number of forwards (FSDP's collectives need it)
    if not (s.data.val_fraction or s.data.val_paths) or n == 0:
        return None
    mine = list(range(dp_rank, n, dp))
    tot = torch.zeros(2, dtype=torch.float64, device=device)
    model.eval()
    for i in range(0, len(mine), s.train.micro_batch):
        b = data_mod.collate([val_ds[j] for j in mine[i : i + s.train.micro_batch]])
        labels = b.labels.to(device)
        positions = None if b.positions is None else b.positions.to(device)
        with autocast:
            tot[0] += loss_fn(model, b.inputs.to(device), labels, *([] if positions is None else [positions]))
        tot[1] += (labels != IGNORE_INDEX).sum()
    model.train()
    _all_reduce_sum(tot, group)
    return (tot[0] / tot[1].clamp(min=1)).item()


def train(s: RunSettings) -> TrainResult:
    """Run (or resume) the training described by `s`; returns when train.steps are done.

    Raises TrainingDiverged (weights untouched since the last good step), SettingsError, DataError.
    """
    validate(s)
    env = parallel.init_distributed(s.train.device)
    try:
        return _train(s, env)
    finally:
        if env.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(s: RunSettings, env) -> TrainResult:
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

    ft = None
    if s.finetune is not None:  # herd finetune: SFT data, LoRA/QLoRA models, adapter checkpoints and exports
        from . import finetune as ft
    loader, val_ds, tok = (ft.prepare_data if ft else _prepare_data)(s, env, dp_rank, dp, say)
    model = (ft.build_model if ft else build_model)(s, mesh, env.device)
    args = model.args
    _check_vocab(tok, args)
    if s.data.seq_len > args.max_seq_len:
        raise SettingsError(f"data.seq_len {s.data.seq_len} exceeds the model context {args.max_seq_len}")
    optimizer = build_optimizer(model, s.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    trainable_only = len(params) < len(list(model.parameters()))  # adapters: checkpoint only what trains
    loss_fn = ft.loss_function(s, mesh) if ft else loss_function(s, mesh)

    # ---- resume
    start, tokens_seen, last_ckpt = 0, 0, None
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if s.checkpoint.resume == "required" and latest is None:
        raise ckpt.CheckpointLoadError(f"checkpoint.resume=required but {ckpt_dir} has no complete checkpoint")
    if s.checkpoint.resume == "never" and latest is not None:
        raise SettingsError(f"{ckpt_dir} already has checkpoints and checkpoint.resume=never: use a new run_dir")
    if latest is not None:
        state = ckpt.load_checkpoint(latest, model, optimizer, trainable_only=trainable_only)
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
    fpt = ft.flops_per_token(s, args) if ft else flops_per_token(args, s.data.seq_len)
    tokens_per_step = s.train.batch_size * s.data.seq_len
    say(f"model: {num_params(args):,} parameters ({sum(p.numel() for p in params):,} trained); {env.world} rank(s) "
        f"(dp {dp} x tp {s.parallel.tp}) on {env.device.type}; {tokens_per_step:,} tokens/step in {accum} "
        f"micro-batch(es) of {s.train.micro_batch}; "
        f"matmul peak {peak / 1e12:.2f} TFLOP/s ({compute_dtype})")

    metrics = Metrics(run_dir, env.is_main, s.log.tensorboard, start)
    bar = tqdm(total=s.train.steps, initial=start, desc="finetune" if ft else "pretrain", unit="step",
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
            dt = time.perf_counter() - t0
            tokens_seen += tokens_per_step
            tps = tokens_per_step / dt
            mfu = fpt * tps / (peak * env.world)
            losses[step] = loss_val
            metrics.log(step, loss=loss_val, lr=lr, grad_norm=gnorm, tokens=tokens_seen, tokens_per_s=tps, mfu=mfu,
                        step_time=dt, loss_tokens=int(n_tok.item()))
            bar.update(1)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{tps:,.0f}", mfu=f"{mfu:.1%}")

            last = step == s.train.steps
            if (s.eval.every and step % s.eval.every == 0) or last:
                val_loss = evaluate(model, val_ds, s, env.device, dp_rank, dp, dp_group, autocast,
                                    loss_fn if ft else causal_lm_loss)
                if val_loss is not None:
                    metrics.log(step, val_loss=val_loss, val_ppl=math.exp(min(val_loss, 80.0)))
                    say(f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(min(val_loss, 80.0)):.2f}")
            if (s.checkpoint.every and step % s.checkpoint.every == 0) or last:
                state = {"tokens_seen": tokens_seen, "loader": loader.state_dict(), "settings": s.to_dict(),
                         "loss": loss_val, "lr": lr}
                last_ckpt = ckpt.save_checkpoint(ckpt_dir, step, model, optimizer, state, keep=s.checkpoint.keep,
                                                 trainable_only=trainable_only)
    finally:
        bar.close()
        metrics.close()

    formats = [f for f in ("hf", "meta") if getattr(s.export, f)]
    if ft and trainable_only:
        exports = ft.export_adapter(model, s, run_dir, formats)
    else:
        exports = ckpt.export_weights(model, run_dir, formats, s.export.dtype, s.data.tokenizer) if formats else []
    for p in exports:
        say(f"exported {p}")
    return TrainResult(run_dir, max(start, s.train.steps), losses, val_loss, last_ckpt, exports)
