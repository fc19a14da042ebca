"""Whole-checkpoint operations behind `herd convert` and `herd quantize`: any checkpoint to the HF or Meta layout,
to one GGUF file, or to a weight-only int8/int4 folder with a perplexity report.

These sit above every format module (they read through herd.loading and write with herd.checkpoint, herd.gguf
and herd.quantize), so no format module needs to import another to offer them. Every folder written here carries
the source's tokenizer (a GGUF's vocabulary becomes tokenizer.model), so the result chats at once, and its files
are readable as a plain `open()` makes them (0644 under umask 022).
"""

from __future__ import annotations

import os
import string
import textwrap
from contextlib import ExitStack
from pathlib import Path

import torch

from .chat_format import LLAMA31_CHAT_TEMPLATE
from .checkpoint import CheckpointError, detect_format, save_hf, save_meta, verify_checklist
from .config import torch_dtype
from .evaluate import perplexity as strided_perplexity
from .gguf import GGUFError, write_gguf
from .default_model import is_default_model, validation_text
from .loading import (checkpoint_tokenizer, load_model, make_readable, read_checkpoint, save_tokenizer,
                      tokenizer_source, training_seq_len)
from .model import Transformer
from .quantize import (GROUP_SIZES, QUANT_DTYPES, QuantizeError, quantize_model, save_quantized,
                       weight_bytes_per_token)
from .tokenizer import TokenizerError


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    mp: int = 1,
    dtype: str | None = None,
    verify: bool = True,
    overwrite: bool = False,
    progress: bool = False,
    tokenizer: str | os.PathLike | None = None,
) -> Path:
    """Convert any supported checkpoint to the HF or Meta layout (`dtype`: bf16 | fp16 | fp32, default: keep), with
    its tokenizer (`tokenizer`: a file or folder instead of the source's own)."""
    if to not in ("hf", "meta"):
        raise CheckpointError(f"unknown target layout {to!r} (hf or meta)")
    torch_type = torch_dtype(dtype) if dtype else None
    if verify and detect_format(src) == "meta":
        verify_checklist(Path(src), progress)
    with ExitStack() as stack:
        args, sd = read_checkpoint(src, stack)
        if to == "hf":
            if mp != 1:
                raise CheckpointError("--mp applies to the Meta layout only")
            out = save_hf(sd, args, dst, dtype=torch_type, overwrite=overwrite, progress=progress)
        else:
            out = save_meta(sd, args, dst, mp=mp, dtype=torch_type, overwrite=overwrite, progress=progress)
    save_tokenizer(tokenizer if tokenizer is not None else tokenizer_source(src), out)
    return make_readable(out)


def export_gguf(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "f16", tokenizer_path=None,
                progress: bool = False) -> Path:
    """`herd convert M OUT.gguf --to gguf`: any checkpoint herd reads, with its tokenizer, as one GGUF file."""
    out = Path(out)
    if out.exists():
        raise GGUFError(f"{out}: already exists")
    with ExitStack() as stack:
        args, sd = read_checkpoint(src, stack)
        tokenizer = checkpoint_tokenizer(src, tokenizer_path)
        written = write_gguf(sd, args, tokenizer, out, dtype=dtype, name=Path(src).name,
                             chat_template=LLAMA31_CHAT_TEMPLATE, progress=progress)
    return make_readable(written)


# ---- herd quantize ------------------------------------------------------------------------------------------


def perplexity(model: Transformer, ids: list[int], window: int = 512) -> float:
    """Perplexity of `ids` in windows of `window` tokens that score fresh tokens only (evaluate.perplexity)."""
    model.clear_caches()
    window = max(2, min(window, len(ids), model.args.max_seq_len))
    return strided_perplexity(model, ids, window=window, stride=window - 1).perplexity


def default_eval_text() -> str:
    """Text that exists on every machine: the source of Python's textwrap and string modules (PSF licence)."""
    return "".join(Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, string))


DEFAULT_EVAL_TEXT = "Python's textwrap.py and string.py source (pass --eval-file for text your model is about)"


def eval_text_for(src: str | os.PathLike) -> tuple[str, str]:
    """(text, what it is) for a quantization check: the held-out plays for herd's bundled model (text it is about,
    never trained on), else `default_eval_text`."""
    if is_default_model(src):
        try:
            return validation_text(), "held-out Macbeth (data/shakespeare/corpus.tar.xz:val/macbeth.txt)"
        except OSError:
            pass  # an installed package without the repository's data folder
    return default_eval_text(), DEFAULT_EVAL_TEXT


def eval_ids(src: str | os.PathLike, vocab_size: int, text: str, n_tokens: int) -> list[int]:
    """Tokenize with the checkpoint's tokenizer (or the default Llama 3 one); byte ids when the vocab doesn't fit."""
    try:
        tok = checkpoint_tokenizer(src)
        if tok.n_words == vocab_size:
            return tok.encode(text, bos=True)[: n_tokens + 1]
    except (OSError, TokenizerError, ValueError):
        pass
    return [b % vocab_size for b in text.encode()][: n_tokens + 1]


def quantize_checkpoint(src: str | os.PathLike, out: str | os.PathLike, dtype: str, group_size: int = 128, *,
                        eval_text: str | None = None, eval_tokens: int = 512, eval_source: str | None = None) -> dict:
    """Load `src`, measure perplexity, quantize, measure again, write `out` (with the source's tokenizer). Returns
    the report; its `eval_text` says what the perplexity was measured on (`eval_source`, or `eval_text_for`)."""
    if dtype not in QUANT_DTYPES:
        raise QuantizeError(f"quantization dtype must be one of {QUANT_DTYPES}, got {dtype!r}")
    if dtype == "int4" and group_size not in GROUP_SIZES:
        raise QuantizeError(f"int4 group size must be one of {GROUP_SIZES}, got {group_size}")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise QuantizeError(f"{out} exists and is not empty")
    model = load_model(src, dtype=torch.bfloat16).eval()
    if eval_text is None:
        eval_text, eval_source = eval_text_for(src)
    ids = eval_ids(src, model.args.vocab_size, eval_text, eval_tokens)
    window = training_seq_len(src) or 512
    before = perplexity(model, ids, window) if eval_tokens > 0 else None
    quantize_model(model, dtype, group_size)
    after = perplexity(model, ids, window) if eval_tokens > 0 else None
    report = {"dtype": dtype, "group_size": group_size if dtype == "int4" else None, "eval_tokens": len(ids) - 1,
              "eval_text": eval_source or "the text given", "ppl_bf16": before, "ppl_quantized": after,
              "ppl_change_pct": None if before is None else 100 * (after - before) / before,
              "weight_bytes_per_token": weight_bytes_per_token(model)}
    written = save_quantized(model, out, source=str(src), tokenizer_from=src, report=report)
    if not Path(src).is_dir():  # a .gguf source: its vocabulary as tokenizer.model
        save_tokenizer(tokenizer_source(src), written)
    make_readable(written)
    return report
