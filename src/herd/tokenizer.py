"""The Llama 3 tokenizer: byte-level BPE on tiktoken, 256 special tokens after the base vocabulary.

Reads top to bottom: constants -> long-input chunking -> Tokenizer -> IncrementalDecoder -> file formats
(tiktoken `tokenizer.model`, HF `tokenizer.json`) -> load_tokenizer. `encode` treats every character of its input as
text: a user typing "<|eot_id|>" gets the ids of those ten characters. Special ids enter a sequence only through
`encode_special` (or the id attributes), which the chat format uses to build headers and turn ends.
"""

from __future__ import annotations

import base64
import codecs
import functools
import importlib.util
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import tiktoken

from .config import parse_json

# Meta's pre-tokenization regex (identical in llama3 and llama-models); needs \p{..}, which tiktoken's engine has.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
NUM_SPECIAL_TOKENS = 256
# tiktoken's Rust core can panic above ~400k characters per call, and BPE on one very long pre-token is quadratic
# (tiktoken issue #195); Meta cuts the input at these two limits and so do we, at the same places.
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000
MAX_FILE_BYTES = 256 << 20  # a tokenizer file larger than this is not a tokenizer file
# The files a checkpoint folder's tokenizer is read from, in this order (tiktoken ranks; an HF download's Meta
# copy; HF tokenizers' JSON), and the ones copied beside weights that herd writes from such a folder.
TOKENIZER_FILES = ("tokenizer.model", "original/tokenizer.model", "tokenizer.json")
TOKENIZER_COPY_FILES = (*TOKENIZER_FILES, "tokenizer_config.json")

# Llama 3.1 names (llama-models at the 3.1 release): offsets from the first special id. The rest are reserved.
_NAMED_SPECIALS = {
    0: "<|begin_of_text|>",
    1: "<|end_of_text|>",
    2: "<|reserved_special_token_0|>",
    3: "<|reserved_special_token_1|>",
    4: "<|finetune_right_pad_id|>",
    5: "<|step_id|>",
    6: "<|start_header_id|>",
    7: "<|end_header_id|>",
    8: "<|eom_id|>",
    9: "<|eot_id|>",
    10: "<|python_tag|>",
}
# Offsets that must carry these names in any file we accept (Llama 3.0 files name 8 and 10 as reserved tokens).
_REQUIRED_SPECIALS = (0, 1, 6, 7, 9)


class TokenizerError(ValueError):
    """A tokenizer file or vocabulary that herd cannot use as given."""


def llama31_special_names() -> list[str]:
    """The 256 special-token names in id order; offsets 11..255 are <|reserved_special_token_2|> ... _246."""
    return [_NAMED_SPECIALS.get(i, f"<|reserved_special_token_{i - 9}|>") for i in range(NUM_SPECIAL_TOKENS)]


# ---- long-input chunking ------------------------------------------------------------------------------------

# Python's \s is exactly str.isspace(), which Meta's splitter uses.
_WS, _NON_WS = re.compile(r"\s"), re.compile(r"\S")


def _long_runs(max_run: int) -> re.Pattern:
    # Maximal runs (the look-behind anchors each match at a run start, so the scan stays linear).
    return re.compile(rf"(?<!\s)\s{{{max_run + 1},}}|(?<!\S)\S{{{max_run + 1},}}")


_LONG_RUNS = _long_runs(MAX_RUN_CHARS)


def split_long_runs(s: str, max_run: int = MAX_RUN_CHARS) -> list[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace characters.

    Same cut points as Meta's character loop (`_split_whitespaces_or_nonwhitespaces`): inside a run of length L
    starting at p, cuts fall at p + k*max_run for 1 <= k <= (L-1)//max_run. Ordinary text has no such run, which a
    C-speed scan of aligned blocks proves: a run longer than max_run covers a whole aligned block of max_run//2
    characters, so if no block is uniform there is nothing to cut.
    """
    if len(s) <= max_run:
        return [s]
    block = max(max_run // 2, 1)
    ws, non_ws = _WS.search, _NON_WS.search
    for start in range(0, len(s) - block + 1, block):
        if not ws(s, start, start + block) or not non_ws(s, start, start + block):
            break  # a uniform block: there may be a run to cut
    else:
        return [s]
    runs = _LONG_RUNS if max_run == MAX_RUN_CHARS else _long_runs(max_run)
    pieces, last = [], 0
    for m in runs.finditer(s):
        for cut in range(m.start() + max_run, m.end(), max_run):
            pieces.append(s[last:cut])
            last = cut
    pieces.append(s[last:])
    return pieces


def chunk_text(s: str) -> Iterator[str]:
    """The pieces `encode` hands to tiktoken: 400k-character slices, each cut by `split_long_runs`."""
    for i in range(0, len(s), MAX_ENCODE_CHARS):
        yield from split_long_runs(s[i : i + MAX_ENCODE_CHARS])


# ---- the tokenizer ------------------------------------------------------------------------------------------


class Tokenizer:
    """Byte-level BPE over `mergeable_ranks` (token bytes -> rank == id), plus 256 special tokens after them."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_names: Sequence[str] | None = None,
        *,
        name: str = "llama3",
        pat_str: str = LLAMA3_PATTERN,
    ):
        _check_ranks(mergeable_ranks)
        n_base = len(mergeable_ranks)
        names = list(special_names) if special_names is not None else llama31_special_names()
        if len(names) != NUM_SPECIAL_TOKENS or len(set(names)) != NUM_SPECIAL_TOKENS:
            raise TokenizerError(f"need {NUM_SPECIAL_TOKENS} distinct special-token names, got {len(set(names))}")
        for i in _REQUIRED_SPECIALS:
            if names[i] != _NAMED_SPECIALS[i]:
                raise TokenizerError(f"special id {n_base + i} must be {_NAMED_SPECIALS[i]}, got {names[i]!r}")
        for nm in names:
            if nm.encode() in mergeable_ranks:
                raise TokenizerError(f"special token {nm!r} is also a base token")
        self.name = name
        self.n_base = n_base
        self.special_tokens: dict[str, int] = {nm: n_base + i for i, nm in enumerate(names)}
        self.n_words: int = n_base + NUM_SPECIAL_TOKENS
        self.bos_id: int = n_base + 0
        self.eos_id: int = n_base + 1
        self.pad_id: int = n_base + 4
        self.start_header_id: int = n_base + 6
        self.end_header_id: int = n_base + 7
        self.eom_id: int = n_base + 8
        self.eot_id: int = n_base + 9
        self.python_tag_id: int = n_base + 10
        self.stop_tokens: list[int] = [self.eos_id, self.eom_id, self.eot_id]
        self.model = tiktoken.Encoding(
            name=name,
            pat_str=pat_str,
            mergeable_ranks=mergeable_ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=self.n_words,
        )
        # tiktoken's Rust core directly (skips a Python frame per call); its public method handles lone surrogates.
        core = getattr(self.model, "_core_bpe", None)
        self._encode_core = getattr(core, "encode_ordinary", None) or self.model.encode_ordinary

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, n_words={self.n_words})"

    def encode(self, s: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `s` as plain text (special-token text included), optionally wrapped in BOS ... EOS."""
        if not isinstance(s, str):
            raise TypeError(f"encode expects str, got {type(s).__name__}")
        try:
            if len(s) <= MAX_RUN_CHARS:
                ids = self._encode_core(s)
            else:
                ids = []
                for piece in chunk_text(s):
                    ids += self._encode_core(piece)
        except UnicodeEncodeError:  # lone surrogates: tiktoken's public path turns them into U+FFFD
            ids = []
            for piece in chunk_text(s):
                ids += self.model.encode_ordinary(piece)
        if bos:
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def encode_special(self, name: str) -> int:
        """The id of a special token by name, e.g. "<|eot_id|>". The one door for control tokens."""
        try:
            return self.special_tokens[name]
        except KeyError:
            raise KeyError(f"no special token named {name!r}") from None

    def is_special(self, token_id: int) -> bool:
        return self.n_base <= token_id < self.n_words

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`; special ids become their names; invalid UTF-8 becomes U+FFFD."""
        ids = _as_list(ids)
        try:
            return self.model.decode(ids, errors="replace")
        except (KeyError, OverflowError, TypeError):
            self._check_ids(ids)
            raise

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        ids = _as_list(ids)
        try:
            return self.model.decode_bytes(ids)
        except (KeyError, OverflowError, TypeError):
            self._check_ids(ids)
            raise

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special id gives its name)."""
        try:
            return self.model.decode_single_token_bytes(token_id)
        except (KeyError, OverflowError, TypeError):
            self._check_ids([token_id])
            raise

    def _check_ids(self, ids: list) -> None:
        # Only reached when tiktoken refused the ids: turn its error into a clear one.
        for i in ids:
            if not isinstance(i, int):
                raise TypeError(f"token ids must be ints, got {type(i).__name__}")
            if not 0 <= i < self.n_words:
                raise TokenizerError(f"token id {i} is out of range [0, {self.n_words})")


def _as_list(ids) -> list | tuple:
    if isinstance(ids, (list, tuple)):
        return ids
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)  # torch / numpy / iterables


def _check_ranks(ranks: dict[bytes, int]) -> None:
    n = len(ranks)
    if n < 256:
        raise TokenizerError(f"a byte-level BPE vocabulary needs at least 256 tokens, got {n}")
    if set(ranks.values()) != set(range(n)):
        raise TokenizerError(f"ranks must be exactly 0..{n - 1}, each once (the rank is the token id)")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise TokenizerError(f"{len(missing)} single bytes have no token (first: {missing[0]:#04x})")


# ---- streaming decode ---------------------------------------------------------------------------------------


class IncrementalDecoder:
    """Turns ids into text one at a time, holding back a UTF-8 sequence until its last byte arrives.

    The concatenation of every `add` and the final `flush` equals `tokenizer.decode(ids)` (with
    `skip_special=True`: the decode of the non-special ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self.skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        if self.skip_special and self.tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self.tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Whatever is held back (an incomplete sequence becomes U+FFFD); the decoder is then reset."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---- file formats -------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes stand for themselves, the rest map to U+0100 onward."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _read_capped(path: Path) -> bytes:
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise TokenizerError(f"{path}: {size} bytes is too large for a tokenizer file")
    return path.read_bytes()


def read_tiktoken_bpe(path: str | os.PathLike) -> dict[bytes, int]:
    """Parse tiktoken's format: one `BASE64 RANK` per line (blank lines skipped). Every defect is an error."""
    path = Path(path)
    data = _read_capped(path)
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"{path}: not a tiktoken BPE file (non-ASCII byte at offset {e.start})") from None
    ranks: dict[bytes, int] = {}
    seen_ranks: dict[int, int] = {}
    b64decode = base64.b64decode
    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[1].isdigit():
            raise TokenizerError(f"{path}:{lineno}: expected 'BASE64 RANK', got {line[:60]!r}")
        try:
            token = b64decode(parts[0], validate=True)
        except ValueError:
            raise TokenizerError(f"{path}:{lineno}: invalid base64 {parts[0][:60]!r}") from None
        rank = int(parts[1])
        if not token:
            raise TokenizerError(f"{path}:{lineno}: empty token")
        if token in ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate token {token!r} (first at rank {ranks[token]})")
        if rank in seen_ranks:
            raise TokenizerError(f"{path}:{lineno}: duplicate rank {rank} (first on line {seen_ranks[rank]})")
        ranks[token] = rank
        seen_ranks[rank] = lineno
    if not ranks:
        raise TokenizerError(f"{path}: no tokens")
    if max(seen_ranks) != len(ranks) - 1:
        raise TokenizerError(f"{path}: ranks are not contiguous: must be 0..{len(ranks) - 1}, max is {max(seen_ranks)}")
    return ranks


def write_tiktoken_bpe(ranks: dict[bytes, int], path: str | os.PathLike) -> None:
    """Write `ranks` in tiktoken format, by rank; atomic (temp file in the same folder, then rename)."""
    path = Path(path)
    lines = [f"{base64.b64encode(tok).decode()} {rank}\n" for tok, rank in sorted(ranks.items(), key=lambda kv: kv[1])]
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w", encoding="ascii", newline="\n") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_hf_tokenizer_json(path: str | os.PathLike) -> tuple[dict[bytes, int], list[str]]:
    """An HF `tokenizer.json` holding a Llama-3-style byte-level BPE -> (mergeable ranks, special names).

    Requires: model type BPE whose ids are 0..n-1, the Llama 3 split regex, no normalizer, merges whose results
    appear in id order (so "lowest merge first" equals tiktoken's "lowest rank first"), every multi-byte token
    reachable by a merge, and exactly 256 added tokens at ids n..n+255.
    """
    path = Path(path)
    try:
        doc = parse_json(_read_capped(path).decode("utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE":
        raise TokenizerError(f"{path}: not a BPE tokenizer.json (model.type must be 'BPE')")
    if model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        raise TokenizerError(f"{path}: byte_fallback / subword prefixes are not byte-level BPE")
    if doc.get("normalizer") is not None:
        raise TokenizerError(f"{path}: a normalizer is not supported (Llama 3 has none)")
    patterns = _split_patterns(doc.get("pre_tokenizer"))
    if patterns != [LLAMA3_PATTERN]:
        raise TokenizerError(f"{path}: pre-tokenizer is not the Llama 3 split regex (found {patterns!r})")

    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{path}: model.vocab must be a non-empty object")
    n = len(vocab)
    added = doc.get("added_tokens") or []
    specials = {}
    for t in added:
        if not (isinstance(t, dict) and type(t.get("id")) is int and isinstance(t.get("content"), str)):
            raise TokenizerError(f"{path}: malformed added token {t!r}")
        if t["id"] < n:
            raise TokenizerError(f"{path}: added token {t['content']!r} has id {t['id']} inside the base vocab")
        specials[t["id"]] = t["content"]
    if sorted(specials) != list(range(n, n + NUM_SPECIAL_TOKENS)):
        raise TokenizerError(
            f"{path}: expected {NUM_SPECIAL_TOKENS} special tokens at ids {n}..{n + NUM_SPECIAL_TOKENS - 1}, "
            f"found {len(specials)}"
        )

    u2b = {c: b for b, c in byte_to_unicode().items()}
    ranks: dict[bytes, int] = {}
    by_string: dict[str, int] = {}
    for s, i in vocab.items():
        if type(i) is not int:
            raise TokenizerError(f"{path}: vocab id for {s!r} is not an integer")
        try:
            tok = bytes(u2b[c] for c in s)
        except KeyError:
            raise TokenizerError(f"{path}: vocab entry {s!r} is not in the byte-level alphabet") from None
        ranks[tok] = i
        by_string[s] = i
    if set(by_string.values()) != set(range(len(by_string))):
        raise TokenizerError(f"{path}: vocab ids must be exactly 0..{len(by_string) - 1}, each once")

    made: set[int] = set()
    last = -1
    for k, m in enumerate(model.get("merges") or []):
        pair = m.split(" ") if isinstance(m, str) else m
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise TokenizerError(f"{path}: merge {k} is malformed: {m!r}")
        a, b = pair
        out = by_string.get(a + b)
        if a not in by_string or b not in by_string or out is None:
            raise TokenizerError(f"{path}: merge {k} ({a!r}, {b!r}) uses or makes a token not in the vocab")
        if out < last:
            raise TokenizerError(f"{path}: merges are not in id order at merge {k}; ranks would differ from ids")
        last = out
        made.add(out)
    unreachable = [s for s, i in by_string.items() if len(s) > 1 and i not in made]
    if unreachable:
        raise TokenizerError(f"{path}: {len(unreachable)} tokens have no merge (e.g. {unreachable[0]!r})")
    return ranks, [specials[i] for i in range(n, n + NUM_SPECIAL_TOKENS)]


def _split_patterns(pre) -> list[str]:
    if not isinstance(pre, dict):
        return []
    if pre.get("type") == "Sequence":
        return [p for sub in pre.get("pretokenizers") or [] for p in _split_patterns(sub)]
    if pre.get("type") == "Split":
        pattern = pre.get("pattern") or {}
        return [pattern.get("Regex") or pattern.get("String")]
    return []


# ---- loading ------------------------------------------------------------------------------------------------


def default_tokenizer_path() -> Path:
    """Meta's Llama 3 `tokenizer.model` inside the installed `llama-models` package (found, never copied)."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Llama 3 vocabulary comes from the llama-models package: pip install llama-models")
    path = Path(next(iter(spec.submodule_search_locations))) / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(f"llama-models is installed but has no {path}")
    return path


def resolve_tokenizer_path(path: str | os.PathLike | None) -> Path:
    """None -> the llama-models vocabulary; a folder -> its first TOKENIZER_FILES entry; a file -> that file
    (tiktoken ranks or tokenizer.json; a .gguf model's vocabulary is read by herd.loading.load_tokenizer)."""
    if path is None:
        return default_tokenizer_path()
    p = Path(path)
    if p.is_dir():
        for name in TOKENIZER_FILES:
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no {', '.join(TOKENIZER_FILES)} in this folder")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such tokenizer file or folder")
    return p


def load_tokenizer(path: str | os.PathLike | None = None, *, n_words: int | None = None,
                   readers: tuple[tuple[bytes, Callable[[Path], Tokenizer]], ...] = ()) -> Tokenizer:
    """Load a tokenizer file (format sniffed from its first bytes); `n_words` checks the id space against a model.

    `readers`: (magic prefix, reader) pairs for vocabularies inside other files (herd.loading adds GGUF's)."""
    p = resolve_tokenizer_path(path).resolve()
    st = p.stat()
    tok = _load_cached(str(p), st.st_mtime_ns, st.st_size, readers)
    if n_words is not None and tok.n_words != n_words:
        raise TokenizerError(f"{p}: tokenizer has {tok.n_words} ids but the model expects {n_words}")
    return tok


@functools.lru_cache(maxsize=4)
def _load_cached(path: str, mtime_ns: int, size: int, readers: tuple) -> Tokenizer:
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(64).lstrip()
    for magic, read in readers:
        if head.startswith(magic):
            return read(p)
    if head.startswith(b"GGUF"):
        raise TokenizerError(f"{p}: a GGUF model file; its vocabulary is read by herd.loading.load_tokenizer")
    if head.startswith(b"{"):
        ranks, names = read_hf_tokenizer_json(p)
        return Tokenizer(ranks, names, name=p.parent.name or p.name)
    return Tokenizer(read_tiktoken_bpe(p), name=p.parent.name or p.name)
