"""Tokenizer speed: herd's encode against raw tiktoken on the same text, the cost of the long-input chunking,
pathological inputs, streaming decode, and the BPE trainer (8k merges on 5 MB).

    .venv/bin/python benchmarks/tokenize_speed.py [--text FILE] [--mb 4] [--repeats 5] [--no-train]

Default text: CPython standard-library source (every machine has it). Times are the best of --repeats runs,
herd and tiktoken interleaved so that load from other processes hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import sysconfig
import time
from pathlib import Path

from herd.bpe import iter_corpus, train_bpe
from herd.tokenizer import IncrementalDecoder, chunk_text, load_tokenizer


def stdlib_text(n_bytes: int) -> tuple[str, list[Path]]:
    files, out, size = [], [], 0
    for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        files.append(p)
        out.append(t)
        size += len(t.encode())
        if size >= n_bytes:
            break
    return "".join(out), files


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def paired(fa, fb, repeats: int) -> tuple[float, float]:
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(best(fa, 1))
        tb.append(best(fb, 1))
    return min(ta), min(tb)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--text", help="UTF-8 text file (default: stdlib source)")
    ap.add_argument("--mb", type=float, default=4.0, help="MB of default text")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-train", action="store_true", help="skip the trainer benchmark")
    args = ap.parse_args()

    tok = load_tokenizer()
    text = Path(args.text).read_text(encoding="utf-8") if args.text else stdlib_text(int(args.mb * 1e6))[0]
    mb = len(text.encode()) / 1e6
    raw = tok.model.encode_ordinary
    rows = []

    th, tt = paired(lambda: tok.encode(text), lambda: raw(text), args.repeats)
    n_ids = len(tok.encode(text))
    rows.append((f"encode {mb:.1f} MB (code)", f"{mb / th:.1f} MB/s", f"{mb / tt:.1f} MB/s", f"{tt / th:.2f}x"))

    lines = [ln for ln in text.splitlines() if ln.strip()][:20000]
    th, tt = paired(lambda: [tok.encode(s) for s in lines], lambda: [raw(s) for s in lines], args.repeats)
    rows.append((f"encode {len(lines)} short lines", f"{th / len(lines) * 1e6:.2f} us/line",
                 f"{tt / len(lines) * 1e6:.2f} us/line", f"{tt / th:.2f}x"))

    t_chunk = best(lambda: list(chunk_text(text)), args.repeats)
    t_enc = best(lambda: tok.encode(text), args.repeats)
    rows.append(("chunking scan (ordinary text)", f"{t_chunk * 1e3:.2f} ms", "-", f"{t_chunk / t_enc:.2%} of encode"))

    for label, ch in (("a", "a"), ("spaces", " "), ("digits", "7")):
        s = ch * 10_000_000
        t = best(lambda: tok.encode(s), 1)
        rows.append((f'encode 10 MB of {label}', f"{10 / t:.1f} MB/s", "-", f"{t:.2f} s"))

    ids = tok.encode(text)
    td, tr = paired(lambda: tok.decode(ids), lambda: tok.model.decode(ids), args.repeats)
    rows.append((f"decode {len(ids)} ids", f"{mb / td:.1f} MB/s", f"{mb / tr:.1f} MB/s", f"{tr / td:.2f}x"))

    def stream():
        dec = IncrementalDecoder(tok)
        for i in ids[:200_000]:
            dec.add(i)
        dec.flush()

    ts = best(stream, max(1, args.repeats // 2))
    rows.append(("stream-decode (IncrementalDecoder)", f"{ts / min(len(ids), 200_000) * 1e6:.2f} us/token", "-", "-"))

    if not args.no_train:
        corpus, files = stdlib_text(5_000_000)
        t0 = time.perf_counter()
        ranks = train_bpe(iter_corpus(files), 256 + 8000)
        t = time.perf_counter() - t0
        label = f"train BPE: {len(ranks) - 256} merges on {len(corpus.encode()) / 1e6:.1f} MB"
        rows.append((label, f"{t:.1f} s", "-", "-"))

    print(f"herd tokenizer benchmark ({platform.machine()}, {os.cpu_count()} cpus, python {platform.python_version()}, "
          f"{n_ids} ids for {mb:.1f} MB)")
    widths = [max(len(r[i]) for r in rows + [("case", "herd", "tiktoken", "herd vs tiktoken")]) for i in range(4)]
    head = ("case", "herd", "tiktoken", "herd vs tiktoken")
    print(" | ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))


if __name__ == "__main__":
    main()
