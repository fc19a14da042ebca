"""Pretraining data: text files -> one uint32 token memmap -> fixed-length packed sequences -> a resumable loader.

The walk: `tokenize_corpus` reads text files and folders once (documents wrapped as <|begin_of_text|> ...
<|end_of_text|> and concatenated), writes `tokens.bin` (uint32) plus a `manifest.json` written last, and re-uses
them while the files and tokenizer are unchanged. `PackedDataset` cuts the stream into windows of seq_len + 1
tokens and splits off a held-out set; `Loader` hands each rank its share of every global batch and can say
(and restore) exactly where it is, so a resumed run sees the same batches.

Samples are `(inputs, labels)` int64 arrays with label -100 meaning "no loss here". Pretraining labels every
token; a chat/SFT dataset only has to return the same pair with the prompt positions set to -100 to use the
same `Loader` and training loop (the loop normalises by the number of labelled tokens in the global batch).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from ..config import parse_json

IGNORE_INDEX = -100  # label value that contributes no loss (F.cross_entropy's ignore_index)
MANIFEST_VERSION = 1
DEFAULT_PATTERNS = ("*.txt", "*.md", "*.rst", "*.jsonl")


class DataError(ValueError):
    """Training data that cannot be used; the message names the file (and line) at fault."""


# ---- tokenizers ---------------------------------------------------------------------------------------------


class TextTokenizer(Protocol):
    """What data preparation needs from a tokenizer (herd.tokenizer.Tokenizer has all of it)."""

    n_words: int
    bos_id: int
    eos_id: int

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]: ...


def byte_tokenizer():
    """256 byte tokens + the 256 Llama 3.1 special tokens = 512 ids: matches the `tiny` configs, needs no file."""
    from ..tokenizer import Tokenizer

    return Tokenizer({bytes([b]): b for b in range(256)}, name="bytes")


def load_text_tokenizer(spec: str | None):
    """None -> the Llama 3 vocabulary (llama-models); "bytes" -> `byte_tokenizer()`; otherwise a file or folder."""
    if spec == "bytes":
        return byte_tokenizer()
    from ..tokenizer import load_tokenizer

    return load_tokenizer(spec)


def tokenizer_fingerprint(tok: TextTokenizer) -> str:
    """A hash that changes when the ids change: vocabulary size, special ids and the ids of a probe text."""
    probe = "Hello, world! 12345 ünïcödé 日本語 \t\n  def f(x): return x**2  <|end_of_text|> 🦙"
    parts = [type(tok).__name__, tok.n_words, tok.bos_id, tok.eos_id, tok.encode(probe)]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


# ---- the token cache ----------------------------------------------------------------------------------------


def list_files(paths: Sequence[str | os.PathLike], patterns: Sequence[str] = DEFAULT_PATTERNS) -> list[Path]:
    """Files named directly, plus files matching `patterns` under named folders (sorted; hidden entries skipped)."""
    if not paths:
        raise DataError("no data paths given")
    out: list[Path] = []
    for p in map(Path, paths):
        p = p.expanduser()
        if p.is_file():
            out.append(p.resolve())
        elif p.is_dir():
            found = []
            for root, dirs, files in os.walk(p):  # followlinks=False: a symlink loop cannot recurse forever
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found += [Path(root, f).resolve() for f in files
                          if not f.startswith(".") and any(fnmatch.fnmatch(f, pat) for pat in patterns)]
            if not found:
                raise DataError(f"{p}: no files matching {list(patterns)} in this folder")
            out += sorted(found)
        else:
            raise DataError(f"{p}: no such file or folder")
    seen, unique = set(), []
    for f in out:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    return unique


def _read_documents(path: Path, errors: str) -> list[str]:
    """A text file is one document; a .jsonl file holds one {"text": ...} document per line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start} (set data.encoding_errors=replace to keep it)") from None
    text = text.removeprefix("\ufeff")
    if path.suffix != ".jsonl":
        return [text] if text else []
    docs = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = parse_json(line)
        except ValueError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f'{path}:{n}: expected an object with a "text" string')
        if obj["text"]:
            docs.append(obj["text"])
    return docs


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _unchanged(manifest: dict, files: list[Path], settings_key: dict) -> bool:
    """True when the manifest was built from these files (size + mtime, or the same sha256) with these settings."""
    if manifest.get("version") != MANIFEST_VERSION or manifest.get("settings") != settings_key:
        return False
    entries = manifest.get("files", [])
    if [e["path"] for e in entries] != [str(f) for f in files]:
        return False
    for e, f in zip(entries, files):
        now = _file_entry(f)
        if now["size"] != e["size"]:
            return False
        if now["mtime_ns"] != e["mtime_ns"] and _sha256(f) != e["sha256"]:  # touched but identical is re-used
            return False
    return True


@dataclass(frozen=True)
class TokenCache:
    """A tokenized corpus on disk: `tokens` is a read-only uint32 memmap of the whole stream."""

    folder: Path
    tokens: np.ndarray
    n_docs: int
    reused: bool


def tokenize_corpus(
    paths: Sequence[str | os.PathLike],
    tokenizer: TextTokenizer,
    cache_dir: str | os.PathLike,
    *,
    patterns: Sequence[str] = DEFAULT_PATTERNS,
    bos: bool = True,
    eos: bool = True,
    encoding_errors: str = "strict",
    workers: int = 4,
    progress: bool = True,
) -> TokenCache:
    """Tokenize files/folders once into `cache_dir/<name>/tokens.bin`; re-use it while nothing changed.

    Every document becomes [bos] + ids + [eos] (Llama 3 pretraining layout, as torchtitan does), concatenated in
    file order. The cache folder name is a hash of the path list, patterns and tokenizer; its `manifest.json`
    records each file's size, mtime and sha256 and is written last, so an interrupted build is never re-used.
    """
    if encoding_errors not in ("strict", "replace"):
        raise DataError(f"encoding_errors must be strict or replace, got {encoding_errors!r}")
    files = list_files(paths, patterns)
    settings_key = {"tokenizer": tokenizer_fingerprint(tokenizer), "bos": bos, "eos": eos, "errors": encoding_errors}
    name = hashlib.sha256(json.dumps([[str(f) for f in files], settings_key]).encode()).hexdigest()[:16]
    folder = Path(cache_dir).expanduser() / f"tokens-{name}"
    manifest_path, bin_path = folder / "manifest.json", folder / "tokens.bin"
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            ok = _unchanged(manifest, files, settings_key) and bin_path.stat().st_size == 4 * manifest["n_tokens"]
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if ok:
            return TokenCache(folder, _open_tokens(bin_path, manifest["n_tokens"]), manifest["n_docs"], reused=True)
    if tokenizer.n_words >= 2**32:
        raise DataError(f"a vocabulary of {tokenizer.n_words} ids does not fit uint32")

    folder.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)  # invalidate first: a crash below leaves no manifest, so no re-use
    tmp = folder / f".tokens.bin.partial-{os.getpid()}"
    entries, n_tokens, n_docs = [], 0, 0
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="tokenize", disable=not progress)
    encode = lambda d: tokenizer.encode(d, bos=bos, eos=eos)  # noqa: E731
    try:
        # tiktoken releases the GIL, so threads tokenize documents in parallel; map() keeps their order.
        with open(tmp, "wb") as out, ThreadPoolExecutor(max(1, workers)) as pool:
            for f in files:
                entry = _file_entry(f)
                entry["sha256"] = _sha256(f)
                docs = _read_documents(f, encoding_errors)
                for ids in pool.map(encode, docs):
                    out.write(np.asarray(ids, dtype=np.uint32).tobytes())
                    n_tokens += len(ids)
                n_docs += len(docs)
                entries.append(entry)
                bar.update(entry["size"])
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, bin_path)
    finally:
        bar.close()
        tmp.unlink(missing_ok=True)
    if n_tokens == 0:
        raise DataError(f"no text in {[str(p) for p in paths]}")
    manifest = {"version": MANIFEST_VERSION, "settings": settings_key, "files": entries,
                "n_tokens": n_tokens, "n_docs": n_docs}
    tmp_manifest = folder / f".manifest.json.partial-{os.getpid()}"
    tmp_manifest.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_manifest, manifest_path)
    return TokenCache(folder, _open_tokens(bin_path, n_tokens), n_docs, reused=False)


def _open_tokens(path: Path, n: int) -> np.ndarray:
    return np.memmap(path, dtype=np.uint32, mode="r", shape=(n,))


# ---- packing and the held-out split -------------------------------------------------------------------------


def split_of(n_windows: int, val_fraction: float) -> np.ndarray:
    """Boolean (n_windows,): True for held-out windows, spread evenly through the stream (every ~1/f-th window).

    Interleaving keeps the held-out text in-distribution even when files are sorted by topic; window i is
    held out when floor((i + 1) f) > floor(i f), which holds out exactly floor(n f) windows.
    """
    i = np.arange(n_windows, dtype=np.float64)
    return np.floor((i + 1) * val_fraction) > np.floor(i * val_fraction)


class PackedDataset:
    """Fixed-length windows of the token stream: sample j is (tokens[s : s+L], tokens[s+1 : s+L+1]), s = i*L.

    Windows overlap by one token so that every token is a target exactly once; documents run across window
    edges (separated by their <|end_of_text|> / <|begin_of_text|> tokens), as in Llama and GPT pretraining.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, split: str = "train", val_fraction: float = 0.0):
        if split not in ("train", "val"):
            raise ValueError(f"split must be train or val, got {split!r}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.tokens, self.seq_len = tokens, seq_len
        n_windows = (len(tokens) - 1) // seq_len
        held_out = split_of(n_windows, val_fraction)
        self.windows = np.flatnonzero(held_out if split == "val" else ~held_out)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, j: int) -> tuple[np.ndarray, np.ndarray]:
        s = int(self.windows[j]) * self.seq_len
        chunk = self.tokens[s : s + self.seq_len + 1].astype(np.int64)
        return chunk[:-1], chunk[1:]


# ---- the loader ---------------------------------------------------------------------------------------------


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) int64 token ids
    labels: torch.Tensor  # (B, T) int64 next-token ids, IGNORE_INDEX where no loss is taken
    positions: torch.Tensor | None = None  # (B, T) RoPE positions of packed rows (0 where a document starts)


def collate(samples: Sequence[tuple]) -> Batch:
    """(inputs, labels) or (inputs, labels, positions) numpy samples -> one Batch of stacked tensors."""
    stack = lambda i: torch.from_numpy(np.stack([s[i] for s in samples]))  # noqa: E731
    return Batch(stack(0), stack(1), stack(2) if len(samples[0]) > 2 else None)


def document_mask(positions: torch.Tensor) -> torch.Tensor:
    """Block-diagonal causal attention mask of packed rows: (B, T) positions -> bool (B, 1, T, T), True = may
    attend. A document starts where its position is 0; a token sees the earlier tokens of its own document only."""
    doc = (positions == 0).cumsum(-1)
    t = positions.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=positions.device).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


class Loader:
    """Each call to `next()` takes the next `batch_size * world` samples of a seeded per-epoch permutation;
    rank r keeps samples [r*batch_size, (r+1)*batch_size) of them.

    The position (epoch, offset) is global, identical on every rank, and is all `state_dict()` holds, so a
    resumed run continues with the same samples; with another number of ranks at the same global batch it does
    too, up to the end of the epoch. An epoch's tail that does not fill a whole global micro-batch is skipped.
    """

    def __init__(self, dataset, batch_size: int, *, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or not 0 <= rank < world:
            raise ValueError(f"bad loader shape: batch_size={batch_size}, rank={rank}, world={world}")
        if len(dataset) < batch_size * world:
            raise DataError(f"{len(dataset)} sequences cannot fill one batch of {batch_size} x {world} ranks; "
                            "add data or lower the batch size / seq_len")
        self.dataset, self.batch_size, self.rank, self.world = dataset, batch_size, rank, world
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, epoch]).permutation(n)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next()

    def next(self) -> Batch:
        step = self.batch_size * self.world
        if self.offset + step > len(self._order):
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        start = self.offset + self.rank * self.batch_size
        samples = [self.dataset[int(j)] for j in self._order[start : start + self.batch_size]]
        self.offset += step
        return collate(samples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed, "n_samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_samples") != len(self.dataset) or state.get("seed") != self.seed:
            raise DataError(f"loader state is for {state.get('n_samples')} samples with seed {state.get('seed')}; "
                            f"this data has {len(self.dataset)} samples with seed {self.seed} (data or seed changed)")
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation(self.epoch)
