"""Fine-tuning data: chat JSONL and Alpaca JSON rendered in herd's Llama 3.1 chat format, with loss masks.

A sample is the token ids of a whole dialog (BOS, every message, no open assistant header) and a mask that is
True exactly on the tokens of assistant messages after their header: the reply text, any tool call (with its
<|python_tag|>) and the closing <|eot_id|>/<|eom_id|>, so the model learns when to stop and when to wait for a
tool. System, user and ipython turns, headers and BOS carry no loss; every assistant turn of a multi-turn dialog
does. Content goes through Tokenizer.encode, so special-token text in the data is trained as literal text.

Bad data follows an explicit policy: "error" (default) stops at the first bad record with its line number;
"skip" drops bad records, counts them by reason and logs the first few. Samples longer than seq_len are truncated
(counted); samples left with no trainable token are skipped (counted), so a batch never averages over zero tokens.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from ..chat_format import ChatFormat, DialogError
from ..config import JSONError, parse_json, read_json
from .data import IGNORE_INDEX, DataError

log = logging.getLogger("herd.train.sft")

MAX_LINE_BYTES = 16 << 20  # one JSONL record; a 100 MB line is a broken file, not a conversation
POLICIES = ("error", "skip")
FORMATS = ("auto", "chat", "alpaca")


@dataclass
class SFTStats:
    samples: int = 0
    truncated: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count
    trainable_tokens: int = 0
    tokens: int = 0

    def summary(self) -> str:
        skipped = ", ".join(f"{n} {why}" for why, n in self.skipped.items()) or "none"
        return (f"{self.samples} samples, {self.tokens:,} tokens ({self.trainable_tokens:,} trained), "
                f"{self.truncated} truncated, skipped: {skipped}")


def read_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed record) for a .jsonl file, or (index, item) for a .json file holding a list."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix == ".json":
        if path.stat().st_size > 1 << 30:
            raise DataError(f"{path}: a .json file over 1 GiB; use JSONL")
        try:
            data = read_json(path)  # nesting, number and strictness limits; errors say path:line
        except JSONError as e:
            raise DataError(str(e)) from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from enumerate(data, 1)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                yield lineno, DataError(f"line longer than {MAX_LINE_BYTES >> 20} MiB")
                while raw and not raw.endswith(b"\n"):  # skip the rest of the oversized line
                    raw = f.readline(MAX_LINE_BYTES + 1)
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM
            if not raw.strip():
                continue
            try:
                yield lineno, parse_json(raw.decode("utf-8"))  # a 100k-deep record is a DataError, not a crash
            except UnicodeDecodeError as e:
                yield lineno, DataError(f"invalid UTF-8 at byte {e.start}")
            except JSONError as e:
                why = e.reason if e.reason.startswith(("invalid JSON", "too deeply")) else f"invalid JSON ({e.reason})"
                yield lineno, DataError(why)


def record_to_messages(rec: object, fmt: str = "auto") -> tuple[list[dict], list | None]:
    """A chat record {"messages": [...], "tools": [...]?} or an Alpaca record {"instruction", "input"?, "output"};
    `fmt` "chat" or "alpaca" accepts only that kind."""
    if not isinstance(rec, dict):
        raise DialogError(f"expected a JSON object, got {type(rec).__name__}")
    if fmt == "alpaca" and "messages" in rec:
        raise DialogError("a chat record ('messages') where the format is alpaca")
    if fmt == "chat" and "messages" not in rec:
        raise DialogError("a chat record needs 'messages' (the format is chat)")
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise DialogError("'messages' must be a list")
        tools = rec.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DialogError("'tools' must be a list")
        return msgs, tools
    if "instruction" in rec and "output" in rec:
        instruction, inp, out = rec["instruction"], rec.get("input") or "", rec["output"]
        if not all(isinstance(x, str) for x in (instruction, inp, out)):
            raise DialogError("instruction, input and output must be strings")
        user = f"{instruction}\n\n{inp}" if inp.strip() else instruction
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": out}]
        if isinstance(rec.get("system"), str) and rec["system"].strip():
            msgs.insert(0, {"role": "system", "content": rec["system"]})
        return msgs, None
    raise DialogError("a record needs 'messages' (chat) or 'instruction' and 'output' (Alpaca)")


def tokenize_dialog(chat: ChatFormat, messages: list, tools: list | None = None) -> tuple[list[int], list[bool]]:
    """Ids of the whole dialog and the loss mask (True on assistant reply tokens, see module docstring)."""
    msgs = chat.dialog_messages(messages, tools, add_generation_prompt=False)
    tok = chat.tokenizer
    ids, mask = [tok.bos_id], [False]
    for m in msgs:
        header = chat.encode_header(m.role)
        full = chat.encode_message(m)
        if full[: len(header)] != header:  # the chat format's own invariant
            raise DialogError("message encoding does not start with its header")
        trained = m.role == "assistant"
        ids += full
        mask += [False] * len(header) + [trained] * (len(full) - len(header))
    return ids, mask


class SFTDataset:
    """Dialogs as fixed-length training rows for data.Loader: (inputs, labels[, positions]) numpy arrays.

    mode "pad": one dialog per row, padded with the pad id (labels IGNORE_INDEX).
    mode "pack": dialogs concatenated into rows of seq_len; `positions` restart at 0 for each dialog, and the
    training step turns them into a block-diagonal causal mask, so packed dialogs never attend to each other.
    """

    def __init__(self, samples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, mode: str = "pack"):
        if mode not in ("pad", "pack"):
            raise DataError(f"packing mode must be 'pad' or 'pack', got {mode!r}")
        self.seq_len, self.pad_id, self.mode = seq_len, pad_id, mode
        self.rows = self._pack(samples) if mode == "pack" else [[s] for s in samples]

    def _pack(self, samples):
        rows, cur, used = [], [], 0
        for ids, mask in samples:
            n = len(ids) - 1  # a dialog of n+1 ids gives n (input, label) pairs
            if cur and used + n > self.seq_len:
                rows.append(cur)
                cur, used = [], 0
            cur.append((ids, mask))
            used += n
        if cur:
            rows.append(cur)
        return rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        L = self.seq_len
        inputs = np.full(L, self.pad_id, dtype=np.int64)
        labels = np.full(L, IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros(L, dtype=np.int64)
        at = 0
        for ids, mask in self.rows[j]:
            n = len(ids) - 1
            inputs[at : at + n] = ids[:-1]
            target = np.asarray(ids[1:], dtype=np.int64)
            labels[at : at + n] = np.where(np.asarray(mask[1:]), target, IGNORE_INDEX)
            positions[at : at + n] = np.arange(n)
            at += n
        # padding continues the last dialog's positions: it is masked from the loss and attends only backwards
        if at < L:
            start = positions[at - 1] + 1 if at else 0
            positions[at:] = start + np.arange(L - at)
        if self.mode == "pad":
            return inputs, labels
        return inputs, labels, positions


def load_sft(
    paths: list[str | os.PathLike], chat: ChatFormat, seq_len: int, *, policy: str = "error",
    max_logged: int = 5, fmt: str = "auto",
) -> tuple[list[tuple[list[int], list[bool]]], SFTStats]:
    """Tokenized (ids, mask) samples from JSONL/JSON files, under the bad-data policy; `fmt`: auto | chat | alpaca."""
    if policy not in POLICIES:
        raise DataError(f"bad-data policy must be one of {POLICIES}, got {policy!r}")
    if fmt not in FORMATS:
        raise DataError(f"data format must be one of {FORMATS}, got {fmt!r}")
    stats, samples, logged = SFTStats(), [], 0

    def bad(where: str, reason: str, kind: str):
        nonlocal logged
        if policy == "error":
            raise DataError(f"{where}: {reason}")
        stats.skipped[kind] += 1
        if logged < max_logged:
            log.warning("skipping %s: %s", where, reason)
            logged += 1

    for path in paths:
        for lineno, rec in read_records(path):
            where = f"{path}:{lineno}"
            if isinstance(rec, DataError):
                bad(where, str(rec), "malformed")
                continue
            try:
                ids, mask = tokenize_dialog(chat, *record_to_messages(rec, fmt))
            except DialogError as e:
                bad(where, str(e), "invalid dialog")
                continue
            if len(ids) > seq_len + 1:
                ids, mask = ids[: seq_len + 1], mask[: seq_len + 1]
                stats.truncated += 1
            n_train = sum(mask[1:])
            if n_train == 0:
                stats.skipped["no trainable tokens"] += 1  # skipped under every policy: it would be 0/0 loss
                continue
            samples.append((ids, mask))
            stats.samples += 1
            stats.tokens += len(ids) - 1
            stats.trainable_tokens += n_train
    if not samples:
        raise DataError(f"no usable samples in {', '.join(map(str, paths))} ({stats.summary()})")
    return samples, stats


def split_samples(samples: list, val_fraction: float, seed: int = 0) -> tuple[list, list]:
    """A seeded held-out split of whole dialogs."""
    if not 0 <= val_fraction < 1:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(len(samples))
    n_val = int(math.floor(len(samples) * val_fraction))
    if val_fraction > 0 and n_val == 0 and len(samples) > 1:
        n_val = 1
    val = [samples[i] for i in sorted(order[:n_val])]
    train = [samples[i] for i in sorted(order[n_val:])]
    return train, val
