"""Opening any checkpoint herd reads, and the tokenizer that belongs to it.

One module above all the formats: HF and Meta folders (herd.checkpoint), GGUF files (herd.gguf, herd.gguf_vocab)
and `herd quantize` folders (herd.quantize). Everything that takes a user's `--model PATH` comes through here, so the
format modules never import each other to dispatch.
"""

from __future__ import annotations

import json
import os
import shutil
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
from .sizing import INT4_GROUP, weight_bytes
from .tokenizer import TOKENIZER_COPY_FILES, TOKENIZER_FILES, Tokenizer, TokenizerError, write_tiktoken_bpe
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
    Llama 3 vocabulary. A tokenizer whose ids do not match the model's vocabulary is a TokenizerError that says
    where the tokenizer came from and suggests --tokenizer."""
    src = tokenizer if tokenizer is not None else tokenizer_source(path)
    tok = load_tokenizer(src)
    try:
        vocab = read_config(path).vocab_size
    except (OSError, ValueError):  # not a folder/file read_config knows (e.g. a herd-quant folder): the caller checks
        return tok
    if tok.n_words != vocab:
        where = (f"the tokenizer {src}" if src is not None else
                 f"the Llama 3 vocabulary (no {' / '.join(TOKENIZER_FILES)} in {path})")
        raise TokenizerError(f"{path}: the model's vocab_size is {vocab} but {where} has {tok.n_words} ids: pass the "
                             "tokenizer the model was trained with, --tokenizer FILE_OR_FOLDER (herd.load(path, "
                             "tokenizer=...)), or copy it into the model's folder as tokenizer.model")
    return tok


def training_seq_len(path: str | os.PathLike) -> int | None:
    """The sequence length a checkpoint was trained on, when it records one (`train_seq_len` in a card.json beside
    the weights, as herd's bundled model has); None otherwise."""
    card = Path(path) / "card.json"
    try:
        n = json.loads(card.read_text(encoding="utf-8")).get("train_seq_len")
    except (OSError, ValueError, AttributeError):
        return None
    return n if isinstance(n, int) and not isinstance(n, bool) and n >= 2 else None


def make_readable(folder: str | os.PathLike) -> Path:
    """Give every file and folder under `folder` the permissions a plain `open()` would under the current umask
    (0644 / 0755 with umask 022): safetensors writes 0600, temporary folders are 0700."""
    mask = os.umask(0)
    os.umask(mask)
    root = Path(folder)
    paths = [root] if root.is_file() else [root, *root.rglob("*")]
    for p in paths:
        if not p.is_symlink():
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
    return root


def save_tokenizer(source: str | os.PathLike | None, folder: str | os.PathLike) -> list[Path]:
    """Put the tokenizer of `source` beside the weights in `folder`, so the model written there chats at once.

    `source`: a checkpoint folder (its TOKENIZER_COPY_FILES are copied), a .gguf file (its vocabulary is written as
    tokenizer.model), or a tokenizer file (copied as tokenizer.model / tokenizer.json). None: nothing (a checkpoint
    without a tokenizer uses the Llama 3 vocabulary, which herd finds in llama-models and never copies).
    Returns the files written."""
    if source is None:
        return []
    src, folder, out = Path(source), Path(folder), []
    if src.is_dir():
        for name in TOKENIZER_COPY_FILES:
            f, dst = src / name, folder / name
            if f.is_file() and not (dst.exists() and os.path.samefile(f, dst)):
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
                out.append(dst)
        return out
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such tokenizer file or checkpoint")
    with open(src, "rb") as f:
        is_gguf = f.read(4) == b"GGUF"
    if is_gguf:  # tiktoken ranks; the 256 special tokens follow them as in every Llama 3 vocabulary
        tok = read_gguf_tokenizer(src)
        dst = folder / "tokenizer.model"
        write_tiktoken_bpe({tok.token_bytes(i): i for i in range(tok.n_base)}, dst)
    else:
        dst = folder / ("tokenizer.json" if src.suffix == ".json" else "tokenizer.model")
        if not (dst.exists() and os.path.samefile(src, dst)):
            shutil.copyfile(src, dst)
    return [dst]


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
        # int8 / int4: herd quantize's layouts (scales included; int4 in groups of sizing.INT4_GROUP), as `herd plan`
        "bytes": {"fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n, "int8": weight_bytes(args, "int8"),
                  "int4": weight_bytes(args, "int4")},
        "int4_group_size": INT4_GROUP,
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(args),
        "files": files,
    }
