"""herd's bundled default model: a small Llama 3.1-architecture model trained by herd itself on Shakespeare.

The weights (bf16 safetensors), config.json, tokenizer.model (an 8192-token BPE + the 256 Llama 3.1 special tokens)
and card.json (sizes, validation perplexities, a golden greedy continuation recorded at packaging time) live in
herd/assets/default/. `herd generate`, `herd chat` and `herd serve` use it when no --model is given.

    python scripts/package_default_model.py HF_DIR TOKENIZER [--pretrain-run DIR --chat-run DIR]
re-packages it (scripts/train_default_model.sh calls it at the end).
"""

from __future__ import annotations

import json
import os
import sys
import tarfile
from pathlib import Path

DEFAULT_DIR = Path(__file__).parent / "assets" / "default"
GOLDEN_PROMPT = "ROMEO:\nBut, soft! what light through yonder window breaks?\n"
GOLDEN_TOKENS = 32
VAL_TOKENS = 4096  # the first tokens of the held-out Macbeth, for the recorded validation perplexity


def default_model_path() -> Path:
    if not (DEFAULT_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"herd's bundled default model is missing from {DEFAULT_DIR}; pass --model PATH "
                                "or re-create it with scripts/train_default_model.sh")
    return DEFAULT_DIR


def card() -> dict:
    return json.loads((default_model_path() / "card.json").read_text(encoding="utf-8"))


def describe() -> str:
    c = card()
    return (f"herd's bundled default model ({c['parameters'] / 1e6:.1f}M-parameter Llama 3.1 architecture trained on "
            "Shakespeare by herd; see docs/default-model.md)")


def resolve(model: str | None, *, quiet: bool = False) -> str:
    """The --model to use: the given one, or the bundled default (announced in one line on stderr)."""
    if model:
        return model
    path = default_model_path()
    if not quiet:
        print(f"no --model given: using {describe()}", file=sys.stderr)
    return str(path)


def is_default_model(path: str | os.PathLike | None) -> bool:
    """Whether `path` is the bundled model's folder."""
    try:
        return path is not None and Path(path).resolve() == DEFAULT_DIR.resolve()
    except OSError:
        return False


def validation_text() -> str:
    """Held-out text for the recorded perplexity: Macbeth from the committed corpus (never trained on). Needs the
    repository's data/ folder (FileNotFoundError in an installed package without it)."""
    corpus = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "corpus.tar.xz"
    if not corpus.is_file():
        raise FileNotFoundError(f"{corpus}: the held-out plays come with a clone of herd's repository")
    with tarfile.open(corpus) as tar:
        return tar.extractfile("val/macbeth.txt").read().decode("utf-8")
