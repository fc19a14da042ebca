"""The pretraining recipe's pieces: text files -> packed token windows, a random (or `model.init_from`) model, the
causal language-model loss, and the HF + Meta export. herd.train.recipes puts them together as PRETRAINING;
fine-tuning (herd.train.finetune) re-uses the model, the loss and the export for its `full` method.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import sizing
from ..config import ModelArgs
from ..loading import load_model, load_tokenizer
from ..model import Transformer
from . import dcp, parallel
from .data import (IGNORE_INDEX, DataError, Loader, PackedDataset, document_mask, load_text_tokenizer,
                   tokenize_corpus)
from .settings import RunSettings, check_vocab, model_args


def run_tokenizer(spec: str | None):
    """The tokenizer of data.tokenizer: "bytes", a tokenizer file or folder, a .gguf model's vocabulary, or None
    (the Llama 3 vocabulary). With model.init_from, settings have already put the checkpoint's own there."""
    return load_text_tokenizer(spec) if spec == "bytes" else load_tokenizer(spec)


def prepare_data(s: RunSettings, env: parallel.DistEnv, dp_rank: int, dp: int, say
                 ) -> tuple[Loader, PackedDataset, object]:
    """(Loader over this rank's training windows, held-out PackedDataset, tokenizer). Rank 0 of each machine
    tokenizes (into the token cache); the other ranks wait, then find the cache."""
    tok = run_tokenizer(s.data.tokenizer)
    if not s.model.init_from:  # before tokenizing anything (init_from models are checked once loaded)
        check_vocab(tok, model_args(s))
    cache = s.data.cache_dir or os.path.join(os.environ.get("HERD_CACHE", "~/.cache/herd"), "data")
    kw = dict(patterns=s.data.patterns, bos=s.data.bos, eos=s.data.eos, encoding_errors=s.data.encoding_errors,
              workers=s.data.workers)

    def corpus(paths):
        if env.local_rank == 0:  # one tokenizer pass per machine; the other ranks then find the cache
            out = tokenize_corpus(paths, tok, cache, progress=s.log.progress and env.is_main, **kw)
        if env.world > 1:
            dist.barrier()
        if env.local_rank != 0:
            out = tokenize_corpus(paths, tok, cache, progress=False, **kw)
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
    if len(train_ds) < s.train.micro_batch * dp:
        raise too_small(len(train_ds), f"{len(tc.tokens):,} tokens", s, dp, 0 if s.data.val_paths else len(val_ds))
    loader = Loader(train_ds, s.train.micro_batch, rank=dp_rank, world=dp, seed=s.seed)
    return loader, val_ds, tok


def too_small(rows: int, what: str, s: RunSettings, dp: int, n_val: int) -> DataError:
    """The error for a training set that cannot fill one micro-batch, naming each setting that would make it fit."""
    fit = max(1, rows // dp)
    hints = [f"set train.batch_size={fit} train.micro_batch={fit}",
             f"lower data.seq_len (now {s.data.seq_len}: more, shorter rows)"]
    if n_val and not s.data.val_paths:
        hints.append(f"set data.val_fraction=0 (now {s.data.val_fraction}, holding out {n_val})")
    return DataError(f"{what} make {rows} training row(s) of {s.data.seq_len} tokens, too few for one micro-batch of "
                     f"{s.train.micro_batch} x {dp} rank(s): " + ", ".join(hints) + ", or add data")


def build_model(s: RunSettings, mesh, device: torch.device) -> Transformer:
    """Full model initialised identically on every rank (seeded), then TP / AC / compile / FSDP applied."""
    if s.model.init_from:
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


def causal_lm_loss(model, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None):
    """Summed next-token cross-entropy of (B, T) inputs against (B, T) labels (IGNORE_INDEX: no loss). Packed rows
    pass `positions` (restarting at 0 per document): RoPE positions + a block-diagonal causal mask."""
    if positions is None:
        logits = model(inputs)  # (B, T, V) float32
    else:
        logits = model(inputs, input_pos=positions, mask=document_mask(positions))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")


def loss_function(s: RunSettings, mesh):
    """`causal_lm_loss`, compiled as one graph with the model when train.compile and the model is not sharded
    (measured on CPU: ~5% faster than compiling each block, the same as compiling transformers' whole model)."""
    return torch.compile(causal_lm_loss) if s.train.compile and mesh is None else causal_lm_loss


def eval_loss_function(s: RunSettings, mesh):
    """The held-out loss: `causal_lm_loss`, never compiled."""
    return causal_lm_loss


def flops_per_token(s: RunSettings, args: ModelArgs) -> float:
    """Training FLOPs per token for MFU: every weight trains (herd.sizing.flops_per_token)."""
    return sizing.flops_per_token(args, s.data.seq_len)


def export(model: nn.Module, s: RunSettings, run_dir: Path, formats: list[str]) -> list[Path]:
    """run_dir/hf and/or run_dir/meta in export.dtype, with the run's tokenizer when herd may copy it."""
    return dcp.export_weights(model, run_dir, formats, s.export.dtype, s.data.tokenizer) if formats else []
