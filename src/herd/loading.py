"""Opening any checkpoint herd reads, and the tokenizer that belongs to it.

One module above all the formats: HF and Meta folders (herd.checkpoint), GGUF files (herd.gguf, herd.gguf_vocab)
and `herd quantize` folders (herd.quantize). Everything that takes a user's `--model PATH` comes through here, so the
format modules never import each other to dispatch.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from pathlib import Path

import torch

from . import gguf
from .checkpoint import detect_format, folder_config, read_folder
from .config import CONFIGS, ModelArgs, get_config, kv_cache_bytes_per_token, num_params, torch_dtype
from .gguf_vocab import read_gguf_tokenizer
from .kernels import use_cpu_kernels
from .model import Transformer
from .quantize import is_quantized_checkpoint, load_quantized
from .tokenizer import TOKENIZER_FILES, Tokenizer
from .tokenizer import load_tokenizer as load_tokenizer_file


def read_checkpoint(path: str | os.PathLike, stack: ExitStack) -> tuple[ModelArgs, dict[str, torch.Tensor]]:
    """Config and validated Meta-named state dict of an HF folder, Meta folder or GGUF file (lazy where the format
    allows: memory-mapped until used; GGUF's quantized tensors are dequantized to float32)."""
    if detect_format(path) == "gguf":
        return gguf.read_gguf(path)
    return read_folder(path, stack)


def read_config(path: str | os.PathLike) -> ModelArgs:
    """The config of a checkpoint, without reading its weights."""
    if detect_format(path) == "gguf":
        return gguf.read_gguf_config(path)
    return folder_config(path)


def load_model(
    path: str | os.PathLike, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """A Transformer with the weights of an HF folder, Meta folder or GGUF file (strict keys and shapes)."""
    with ExitStack() as stack:
        args, sd = read_checkpoint(path, stack)
        with torch.device("meta"):
            model = Transformer(args)
        sd = {k: (v.to(dtype) if dtype is not None else v) for k, v in sd.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        if args.tie_embeddings:
            model.output.weight = model.tok_embeddings.weight
    return model.to(device)


def open_model(path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype=None) -> Transformer:
    """A model ready for inference from any checkpoint, `herd quantize` output included; on the CPU its decode runs
    through herd's kernels. `dtype` (name or torch.dtype; default bf16) sets float weights and activations;
    quantized checkpoints keep their own format and cast only their float tensors when a dtype is given."""
    device = torch.device(device)
    if is_quantized_checkpoint(path):
        model = load_quantized(path, device=device, dtype=None if dtype is None else torch_dtype(dtype))
    else:
        model = load_model(path, dtype=torch_dtype(dtype), device=device)
    if device.type == "cpu":
        use_cpu_kernels(model)
    return model


def tokenizer_source(path: str | os.PathLike) -> Path | None:
    """Where a checkpoint's own tokenizer is: a .gguf file carries its vocabulary; a folder may hold one of
    TOKENIZER_FILES. None: it has none (callers then use the Llama 3 vocabulary)."""
    p = Path(path)
    if p.is_file():
        return p if p.suffix == ".gguf" else None
    return p if any((p / name).is_file() for name in TOKENIZER_FILES) else None


def load_tokenizer(path: str | os.PathLike | None = None, *, n_words: int | None = None) -> Tokenizer:
    """herd.tokenizer.load_tokenizer, plus the vocabulary inside a .gguf model file."""
    return load_tokenizer_file(path, n_words=n_words, readers=((b"GGUF", read_gguf_tokenizer),))


def checkpoint_tokenizer(path: str | os.PathLike, tokenizer: str | os.PathLike | None = None) -> Tokenizer:
    """The tokenizer that belongs to a checkpoint: `tokenizer` when given, else the checkpoint's own, else the
    Llama 3 vocabulary."""
    return load_tokenizer(tokenizer if tokenizer is not None else tokenizer_source(path))


def model_info(path_or_name: str) -> dict:
    """Config, parameter count and weight bytes at each dtype, for a checkpoint path or a named config."""
    if path_or_name.lower() in CONFIGS and not Path(path_or_name).exists():
        args, fmt, files = get_config(path_or_name), "name", []
    else:
        fmt = detect_format(path_or_name)
        args = read_config(path_or_name)
        p = Path(path_or_name)
        if fmt == "meta" and not (p / "params.json").exists():
            p = p / "original"
        files = sorted(f.name for f in (p.iterdir() if p.is_dir() else [p]))
    n = num_params(args)
    return {
        "format": fmt,
        "config": args.to_params(),
        "head_dim": args.head_dim,
        "ffn_hidden_dim": args.ffn_hidden_dim,
        "parameters": n,
        "bytes": {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "int8": n, "int4": n // 2},
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(args),
        "files": files,
    }
