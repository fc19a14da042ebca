"""Package a trained model as herd's bundled default (src/herd/assets/default): bf16 weights, config.json, the
tokenizer, and card.json with sizes, the training window, validation perplexities and a golden greedy continuation
measured here.

    python scripts/package_default_model.py HF_DIR TOKENIZER [--pretrain-run DIR --chat-run DIR]

With --pretrain-run, the pretrained model (DIR/hf) is measured on the same held-out text as the packaged one, so the
card shows what the chat stage cost in prose (`pretrain_macbeth_ppl` against `val_ppl`).
scripts/train_default_model.sh calls it at the end; tests/test_default_model.py checks the card against the weights.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
import yaml

from herd.api import load
from herd.checkpoint import save_hf
from herd.config import num_params
from herd.default_model import DEFAULT_DIR, GOLDEN_PROMPT, GOLDEN_TOKENS, VAL_TOKENS, validation_text
from herd.evaluate import perplexity
from herd.loading import load_model, make_readable


def _last_val(run: Path) -> dict | None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in rows if "val_loss" in r]
    return vals[-1] if vals else None


def macbeth_ppl(llm, window: int) -> float:
    """Perplexity on the first VAL_TOKENS tokens of the held-out Macbeth, windows of `window`, stride window/2."""
    ids = llm.tokenizer.encode(validation_text(), bos=True)[: VAL_TOKENS + 1]
    return perplexity(llm.model, ids, window=window, stride=window // 2).perplexity


def measure(folder: Path, window: int) -> dict:
    """Golden greedy continuation and held-out perplexity of a packaged model (float32 compute)."""
    llm = load(folder, dtype="float32", device="cpu")
    out = llm.generate(GOLDEN_PROMPT, max_new_tokens=GOLDEN_TOKENS, temperature=0.0, stop_token_ids=[])
    return {"golden_prompt": GOLDEN_PROMPT, "golden_ids": out.token_ids, "golden_text": out.text,
            "val_text": "data/shakespeare/corpus.tar.xz:val/macbeth.txt", "val_tokens": VAL_TOKENS,
            "val_window": window, "val_ppl": macbeth_ppl(llm, window)}


def _train_seq_len(run: str | None, default: int = 512) -> int:
    settings = Path(run) / "settings.yaml" if run else None
    if settings and settings.is_file():
        return int(yaml.safe_load(settings.read_text())["data"]["seq_len"])
    return default


def package(hf_dir: str, tokenizer: str, *, out: Path = DEFAULT_DIR, pretrain_run: str | None = None,
            chat_run: str | None = None) -> dict:
    model = load_model(hf_dir)
    save_hf(model, None, out, dtype=torch.bfloat16, overwrite=True)
    shutil.copy(tokenizer, out / "tokenizer.model")
    window = _train_seq_len(chat_run)
    info = {"parameters": num_params(model.args), "config": model.args.to_params(),
            "tokenizer": "8192-token byte-level BPE trained by herd.bpe on the training plays + 256 special tokens",
            "train_seq_len": window}
    for key, run in (("pretrain", pretrain_run), ("chat", chat_run)):
        if run:
            last = _last_val(Path(run))
            info[f"{key}_val_loss"] = last and last["val_loss"]
            info[f"{key}_val_ppl"] = last and last["val_ppl"]
    if pretrain_run and (Path(pretrain_run) / "hf").is_dir():
        pre = load(Path(pretrain_run) / "hf", dtype="float32", device="cpu")
        info["pretrain_macbeth_ppl"] = macbeth_ppl(pre, window)
    info.update(measure(out, window))
    (out / "card.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    make_readable(out)
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/package_default_model.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf_dir", help="the trained model (the chat stage's run_dir/hf)")
    ap.add_argument("tokenizer", help="its tokenizer.model")
    ap.add_argument("--pretrain-run", help="the pretraining run_dir: its last held-out loss, and its hf/ measured")
    ap.add_argument("--chat-run", help="the chat stage's run_dir: its last held-out loss and its seq_len")
    ap.add_argument("--out", default=str(DEFAULT_DIR))
    a = ap.parse_args(argv)
    info = package(a.hf_dir, a.tokenizer, out=Path(a.out), pretrain_run=a.pretrain_run, chat_run=a.chat_run)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
