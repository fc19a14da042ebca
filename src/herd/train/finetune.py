"""The fine-tuning recipe's pieces (`herd finetune`): full, LoRA and QLoRA fine-tuning on chat/Alpaca JSONL.

The loop, checkpoints, resume, metrics, NaN guard and distributed support are herd.train.loop's; herd.train.recipes
puts these pieces together as FINETUNING:

- `prepare_data`: records -> herd.train.sft (Llama 3.1 chat format, loss on assistant turns only, bad-data policy)
  -> `SFTDataset` rows, packed (several dialogs per row; the loss turns their positions into a block-diagonal
  causal mask) or padded, in the same `Loader` as pretraining. Plain `.txt` files in data.paths train as text
  (`text_samples`: the loss on every token, as in pretraining), so a chat stage can keep the model writing prose;
  the held-out split is drawn from the dialogs.
- `build_model`: full fine-tuning is the pretraining model; LoRA freezes the base (float, `finetune.base_dtype`)
  and wraps the target linears (herd.lora); QLoRA first quantizes every base linear to herd.quantize's int4/int8
  modules, reading the checkpoint one tensor at a time. Frozen base linears keep no weight copy for the backward
  pass: the gradient w.r.t. the input re-makes the (dequantized or cast) weight there.
- checkpoints of adapter runs hold only the parameters that train and their AdamW state (the base is
  `model.init_from`, which is a run-defining setting); `export` writes a PEFT adapter folder and, with
  `export.merged`, the base + adapter merged in the HF / Meta layouts (herd.lora.merge_adapter).
"""

from __future__ import annotations

import functools
import math
from contextlib import ExitStack
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import sizing
from ..chat_format import ChatFormat
from ..config import ModelArgs, torch_dtype
from ..loading import read_checkpoint
from ..lora import LoRALinear, apply_lora, merge_adapter, save_peft
from ..model import Transformer
from ..quantize import (Int4Linear, Int8Linear, QuantizeError, dequantize_int4, dequantize_int8, quantize_int4,
                        quantize_int8)
from . import parallel, pretrain
from .data import IGNORE_INDEX, DataError, Loader, document_mask, list_files
from .dcp import export_tokenizer
from .settings import RunSettings, SettingsError, check_vocab, lora_config, model_args
from .sft import SFTDataset, load_sft, split_samples

SFT_PATTERNS = ("*.jsonl", "*.json", "*.txt")  # what a folder in data.paths contributes (.txt: plain text)
TEXT_SUFFIXES = (".txt",)


def text_samples(files: list[Path], tok, seq_len: int) -> tuple[list[tuple[list[int], list[bool]]], int]:
    """Plain-text files as (ids, mask) samples of at most seq_len + 1 ids with the loss on every token: each file is
    <|begin_of_text|> ... <|end_of_text|> cut into consecutive windows (a window's first id is the previous one's
    last, so every token after the first is a target once). Returns (samples, tokens)."""
    samples, total = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f}: not UTF-8 at byte {e.start}") from None
        ids = tok.encode(text, bos=True, eos=True)
        total += len(ids) - 1
        for at in range(0, len(ids) - 1, seq_len):
            chunk = ids[at : at + seq_len + 1]
            samples.append((chunk, [True] * len(chunk)))
    return samples, total


# ---- data ---------------------------------------------------------------------------------------------------


def prepare_data(s: RunSettings, env: parallel.DistEnv, dp_rank: int, dp: int, say
                 ) -> tuple[Loader, SFTDataset, object]:
    """(Loader over the training rows, held-out SFTDataset, tokenizer), as pretrain.prepare_data returns."""
    f = s.finetune
    if f is None:
        raise SettingsError("fine-tuning needs a finetune section (herd.train.load_finetune_settings fills in the "
                            "defaults: LoRA)")
    tok = pretrain.run_tokenizer(s.data.tokenizer)
    if not s.model.init_from:
        check_vocab(tok, model_args(s))
    chat = ChatFormat(tok)

    def read(paths, what):
        files = list_files(paths, SFT_PATTERNS)
        texts = [p for p in files if p.suffix in TEXT_SUFFIXES]
        records = [p for p in files if p.suffix not in TEXT_SUFFIXES]
        samples = []
        if records:
            samples, stats = load_sft(records, chat, s.data.seq_len, policy=f.bad_data, fmt=f.format)
            say(f"{what}: {stats.summary()}")
        text = []
        if texts:
            text, n = text_samples(texts, tok, s.data.seq_len)
            say(f"{what}: {len(texts)} text file(s), {n:,} tokens in {len(text)} windows (loss on every token)")
        return samples, text

    samples, text = read(s.data.paths, "data")
    if f.max_samples and len(samples) > f.max_samples:
        samples = samples[: f.max_samples]
        say(f"data: using the first {len(samples)} dialogs (finetune.max_samples)")
    if s.data.val_paths:
        val_s, val_text = read(s.data.val_paths, "held-out data")
        train_s, val_s = samples + text, val_s + val_text
    elif samples:  # the held-out split is drawn from the dialogs; text windows all train
        train_s, val_s = split_samples(samples, s.data.val_fraction, s.seed)
        train_s = train_s + text
    else:
        train_s, val_s = split_samples(text, s.data.val_fraction, s.seed)
    train_ds = SFTDataset(train_s, s.data.seq_len, tok.pad_id, f.packing)
    val_ds = SFTDataset(val_s, s.data.seq_len, tok.pad_id, f.packing)
    say(f"data: {len(train_s)} training samples in {len(train_ds)} rows of {s.data.seq_len} ({f.packing}), "
        f"{len(val_s)} held out")
    if len(train_ds) < s.train.micro_batch * dp:
        raise pretrain.too_small(len(train_ds), f"{len(train_s)} training samples", s, dp, len(val_s))
    if (s.data.val_fraction or s.data.val_paths) and s.eval.sequences and len(val_ds) < dp:
        raise DataError(f"the held-out split has {len(val_ds)} rows, fewer than the {dp} data-parallel ranks: "
                        "raise data.val_fraction or add data")
    return Loader(train_ds, s.train.micro_batch, rank=dp_rank, world=dp, seed=s.seed), val_ds, tok


# ---- the frozen base ----------------------------------------------------------------------------------------


CHUNK_ELEMENTS = 1 << 22  # a frozen linear makes at most this much of its dense weight at a time (8 MB in bf16)
QUANT_CHUNK_ELEMENTS = 1 << 21  # weights quantized at a time while the base is read (8 MB in float32)


def dense_weight(module: nn.Module, dtype: torch.dtype, rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` of the (out, in) weight of a float, int8 or int4 linear as a dense tensor of `dtype` (quantized
    weights are dequantized in float32 first, as their own forward does, then cast)."""
    if isinstance(module, Int4Linear):
        w = dequantize_int4(module.weight[rows], module.scales[rows], module.mins[rows], module.group_size)
    elif isinstance(module, Int8Linear):
        w = dequantize_int8(module.weight[rows], module.scales[rows])
    else:
        w = module.weight[rows]
    return w.to(dtype)


def _row_chunks(module: nn.Module, dtype: torch.dtype) -> list[slice]:
    if isinstance(module, nn.Linear) and module.weight.dtype == dtype:
        return [slice(None)]  # used as it is: nothing is made
    step = max(1, CHUNK_ELEMENTS // module.in_features)
    return [slice(r, min(r + step, module.out_features)) for r in range(0, module.out_features, step)]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def _dense_matmul(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x W^T in the compute dtype (autocast's, else x's), the weight made a block of rows at a time."""
    dtype = _compute_dtype(x)
    x = x.to(dtype)
    chunks = _row_chunks(module, dtype)
    if len(chunks) == 1:
        return F.linear(x, dense_weight(module, dtype))
    out = x.new_empty(*x.shape[:-1], module.out_features)
    for rows in chunks:
        out[..., rows] = F.linear(x, dense_weight(module, dtype, rows))
    return out


class _FrozenLinear(torch.autograd.Function):
    """y = x W^T for a frozen W that is not saved for backward: grad_x = grad_y W re-makes W from the module
    (QLoRA: dequantizes again), so a step holds no dense copy of every layer's weight between the two passes,
    and a large weight (the output head) is only ever dense a block of rows at a time."""

    @staticmethod
    def forward(ctx, x, module):
        ctx.module, ctx.x_dtype = module, x.dtype
        return _dense_matmul(module, x)

    @staticmethod
    def backward(ctx, grad):
        module, chunks = ctx.module, _row_chunks(ctx.module, grad.dtype)
        if len(chunks) == 1:
            return (grad @ dense_weight(module, grad.dtype)).to(ctx.x_dtype), None
        gx = torch.zeros(*grad.shape[:-1], module.in_features, dtype=torch.float32, device=grad.device)
        for rows in chunks:  # partial products summed in float32
            gx += grad[..., rows] @ dense_weight(module, grad.dtype, rows)
        return gx.to(ctx.x_dtype), None


def frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _FrozenLinear.apply(x, module)
    return _dense_matmul(module, x)


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _set_param(model: nn.Module, name: str, t: torch.Tensor) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, nn.Parameter(t, requires_grad=False))


def _base_linear(name: str, w: torch.Tensor, device, dtype, quant) -> nn.Module:
    out_f, in_f = w.shape
    if quant is None:
        lin = nn.Linear(in_f, out_f, bias=False, device="meta")
        lin.weight = nn.Parameter(w.to(device=device, dtype=dtype), requires_grad=False)
        return lin
    kind, group_size = quant
    try:
        m = Int4Linear(in_f, out_f, group_size, device="meta") if kind == "int4" else Int8Linear(in_f, out_f, "meta")
    except QuantizeError as e:
        raise QuantizeError(f"{name}: {e} (finetune.qlora_group_size, or finetune.qlora_dtype=int8)") from None
    # rows are quantized independently: a block at a time bounds the float32 temporaries (the 128k-row head)
    step = max(1, QUANT_CHUNK_ELEMENTS // in_f)
    parts = [(quantize_int4(w[r : r + step].to(device, torch.float32), group_size) if kind == "int4" else
              quantize_int8(w[r : r + step].to(device, torch.float32))) for r in range(0, out_f, step)]
    for attr, tensors in zip(("weight", "scales", "mins"), zip(*parts)):
        setattr(m, attr, torch.cat(tensors))
    return m


@torch.no_grad()
def load_base(s: RunSettings, device: torch.device, dtype: torch.dtype, quant: tuple[str, int] | None
              ) -> Transformer:
    """The frozen base of a LoRA/QLoRA run: model.init_from, or pretraining's seeded random init. Checkpoints are
    read lazily and converted one tensor at a time on `device` (QLoRA never holds the whole float model there)."""
    with ExitStack() as stack:
        if s.model.init_from:
            args, sd = read_checkpoint(s.model.init_from, stack)
        else:
            args = model_args(s)
            src = Transformer(args)
            src.init_weights(s.model.init_std, torch.Generator().manual_seed(s.seed))
            sd = src.state_dict()
        with torch.device("meta"):
            model = Transformer(args)
        tie = args.tie_embeddings and quant is None  # a float head stays the embedding matrix itself
        for name, mod in list(model.named_modules()):
            if isinstance(mod, nn.Linear) and not (tie and name == "output"):
                _set_module(model, name, _base_linear(name, sd[name + ".weight"], device, dtype, quant))
        for name, p in list(model.named_parameters()):
            if p.is_meta and not (tie and name == "output.weight"):
                # QLoRA copies the few float tensors, so that the checkpoint's file mapping is let go
                _set_param(model, name, sd[name].to(device=device, dtype=dtype, copy=quant is not None))
        if tie:
            model.output.weight = model.tok_embeddings.weight
    if quant is not None:
        model.quantization = {"dtype": quant[0], "group_size": quant[1] if quant[0] == "int4" else None}
    return model


def build_model(s: RunSettings, mesh, device: torch.device) -> Transformer:
    """Full: pretrain.build_model. LoRA/QLoRA: frozen (quantized) base + seeded adapters, then AC / compile /
    FSDP2 as pretraining applies them (tensor parallelism is refused for adapters by validate_finetune)."""
    f = s.finetune
    if f.method == "full":
        return pretrain.build_model(s, mesh, device)
    dtype = torch.bfloat16 if f.base_dtype == "bf16" else torch.float32
    quant = (f.qlora_dtype, f.qlora_group_size) if f.method == "qlora" else None
    model = load_base(s, device, dtype, quant)
    apply_lora(model, lora_config(f))
    g = torch.Generator().manual_seed(s.seed)  # the same adapters on every rank and in every run of this seed
    for m in model.modules():
        if isinstance(m, LoRALinear):
            a = torch.empty(m.lora_a.weight.shape)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=g)
            m.lora_a.weight = nn.Parameter(a.to(device))
            m.lora_b.weight = nn.Parameter(torch.zeros(m.lora_b.weight.shape, device=device))
    for m in model.modules():  # every frozen linear (adapted or not, the output head too) saves no weight copy
        if isinstance(m, (nn.Linear, Int4Linear, Int8Linear)) and not any(p.requires_grad for p in m.parameters()):
            m.forward = functools.partial(frozen_forward, m)
    dp = mesh["dp"].size() if mesh is not None else 1
    if s.train.activation_checkpointing:
        parallel.apply_ac(model)
    if s.train.compile and mesh is not None:
        parallel.apply_compile(model)
    if dp > 1:
        parallel.apply_fsdp(model, mesh["dp"], torch.bfloat16 if s.train.mixed_precision == "bf16" else None)
    return model.to(device)


def sft_loss(model, inputs: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None):
    """pretrain.causal_lm_loss, with the output head and the cross-entropy computed only at the labelled
    positions (each row's, padded to the longest with unlabelled ones): prompts take no logits memory."""
    keep = labels != IGNORE_INDEX
    k = int(keep.sum(-1).max())
    if k == labels.shape[-1]:
        return pretrain.causal_lm_loss(model, inputs, labels, positions)
    idx = torch.sort(keep.to(torch.uint8), dim=-1, descending=True, stable=True).indices[:, : max(k, 1)]
    mask = None if positions is None else document_mask(positions)
    logits = model(inputs, input_pos=positions, mask=mask, logits_idx=idx)
    return F.cross_entropy(logits.flatten(0, 1), labels.gather(1, idx).flatten(), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def loss_function(s: RunSettings, mesh):
    """The training and held-out loss: `sft_loss`, or pretraining's when compiled or tensor-parallel
    (whole-sequence logits)."""
    if s.train.compile or s.parallel.tp > 1:
        return pretrain.loss_function(s, mesh)
    return sft_loss


def flops_per_token(s: RunSettings, args: ModelArgs) -> float:
    """Training FLOPs per token for MFU (herd.sizing.flops_per_token): 6N + attention for full fine-tuning; a frozen
    base computes no weight gradients, so 4N + attention for LoRA/QLoRA."""
    return sizing.flops_per_token(args, s.data.seq_len, frozen_base=s.finetune.method != "full")


# ---- export -------------------------------------------------------------------------------------------------


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full float32 CPU copies of the adapter weights (collective under FSDP: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    out = {}
    for name, p in model.named_parameters():
        if ".lora_a." in name or ".lora_b." in name:
            t = p.detach()
            if isinstance(t, DTensor):
                t = t.full_tensor()
            out[name] = t.float().cpu()
    return out


def export(model: nn.Module, s: RunSettings, run_dir: Path, formats: list[str]) -> list[Path]:
    """Full fine-tuning: pretraining's export (run_dir/hf, run_dir/meta). LoRA/QLoRA: `export_adapter`."""
    if s.finetune.method == "full":
        return pretrain.export(model, s, run_dir, formats)
    return export_adapter(model, s, run_dir, formats)


def export_adapter(model: nn.Module, s: RunSettings, run_dir: Path, formats: list[str]) -> list[Path]:
    """run_dir/adapter (PEFT); with export.merged, run_dir/hf and/or run_dir/meta: the adapter merged onto the
    full-precision model.init_from in export.dtype. Rank 0 writes; returns the folders written."""
    sd = adapter_state_dict(model)
    if dist.is_initialized() and dist.get_rank() != 0:
        return []
    out = [save_peft(model, run_dir / "adapter", base_model=s.model.init_from, state_dict=sd)]
    if s.export.merged:
        for fmt in formats:
            folder = merge_adapter(s.model.init_from, out[0], run_dir / fmt, to=fmt,
                                   dtype=torch_dtype(s.export.dtype), overwrite=True)
            export_tokenizer(s.data.tokenizer, folder)
            out.append(folder)
    return out
