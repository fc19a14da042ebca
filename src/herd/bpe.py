"""Training a byte-level BPE vocabulary in herd's format, and a slow reference encoder to check it against.

`train_bpe` runs HF `tokenizers`' BPE trainer with the Llama 3 split regex over raw bytes, then exports the result
as tiktoken ranks (rank = id = order of creation). A file written by `train_tokenizer` loads with
`load_tokenizer`, which places the 256 Llama 3.1 special tokens right after the base vocabulary, so a small model
trained on it uses the same chat format. `vocab_size` counts the base vocabulary (256 bytes + merges); the model's
vocabulary is `vocab_size + 256`.

    python -m herd.bpe --vocab-size 8448 --out tokenizer.model corpus/*.txt
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import regex

from .tokenizer import LLAMA3_PATTERN, Tokenizer, TokenizerError, byte_to_unicode, load_tokenizer, write_tiktoken_bpe

_BLOCK_CHARS = 1 << 16  # lines are fed to the trainer in blocks of about this many characters


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, max_token_bytes: int = 128
) -> dict[bytes, int]:
    """Learn up to `vocab_size - 256` merges from `texts`; returns tiktoken ranks {token bytes: rank}.

    Fewer tokens come back when the corpus runs out of pairs seen `min_frequency` times.
    """
    hf = train_hf_bpe(texts, vocab_size, min_frequency=min_frequency, max_token_bytes=max_token_bytes)
    u2b = {c: b for b, c in byte_to_unicode().items()}
    ranks = {bytes(u2b[c] for c in s): i for s, i in hf.get_vocab().items()}
    # The trainer numbers the 256-byte alphabet first, then each new token as it is created.
    if sorted(ranks.values()) != list(range(len(ranks))) or any(bytes([b]) not in ranks for b in range(256)):
        raise TokenizerError("the trainer produced a vocabulary that is not contiguous byte-level BPE")
    return ranks


def train_hf_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, max_token_bytes: int = 128):
    """The HF `tokenizers` model behind `train_bpe` (Llama 3 split regex, byte-level, no special tokens)."""
    if not isinstance(vocab_size, int) or vocab_size < 256:
        raise ValueError(f"vocab_size counts the 256 byte tokens plus merges; got {vocab_size!r}")
    from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        max_token_length=max_token_bytes,
        show_progress=False,
        special_tokens=[],
    )
    hf.train_from_iterator(texts, trainer)
    return hf


def iter_corpus(paths: Sequence[str | os.PathLike]) -> Iterator[str]:
    """Text of each file (UTF-8; bad bytes become U+FFFD) in blocks of whole lines."""
    for path in paths:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            block, size = [], 0
            for line in f:
                block.append(line)
                size += len(line)
                if size >= _BLOCK_CHARS:
                    yield "".join(block)
                    block, size = [], 0
            if block:
                yield "".join(block)


def train_tokenizer(
    paths: Sequence[str | os.PathLike], vocab_size: int, out: str | os.PathLike, *, min_frequency: int = 2
) -> Tokenizer:
    """Train on the files at `paths`, write tiktoken format to `out`, and return the loaded Tokenizer."""
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"{p}: no such corpus file")
    ranks = train_bpe(iter_corpus(paths), vocab_size, min_frequency=min_frequency)
    write_tiktoken_bpe(ranks, out)
    return load_tokenizer(out)


# ---- reference encoder: tiktoken's semantics in plain Python (slow; for tests) ------------------------------

_pattern = regex.compile(LLAMA3_PATTERN)


def pretokenize(text: str) -> list[str]:
    return _pattern.findall(text)


def bpe_merge(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """Ids of one pre-token: a whole-piece hit, else repeatedly merge the adjacent pair of lowest rank (leftmost)."""
    if piece in ranks:
        return [ranks[piece]]
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[p] for p in parts]


def reference_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    return [i for piece in pretokenize(text) for i in bpe_merge(piece.encode("utf-8"), ranks)]


# ---- command line -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m herd.bpe", description="Train a Llama-3-style byte-level BPE.")
    p.add_argument("files", nargs="+", help="UTF-8 text files")
    p.add_argument("--vocab-size", type=int, required=True, help="base vocabulary: 256 bytes + merges")
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--out", required=True, help="output tiktoken-format file")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    try:
        tok = train_tokenizer(args.files, args.vocab_size, args.out, min_frequency=args.min_frequency)
    except (ValueError, OSError) as e:
        print(f"herd.bpe: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {tok.n_base} base tokens + 256 special = {tok.n_words} ids "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
