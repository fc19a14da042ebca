"""herd's bundled default model: a small Llama 3.1-architecture model trained by herd itself on Shakespeare.

The weights (bf16 safetensors), config.json, tokenizer.model (an 8192-token BPE + the 256 Llama 3.1 special tokens)
and card.json (sizes, validation perplexities, a golden greedy continuation recorded at packaging time) live in
herd/assets/default/. `herd generate`, `herd chat` and `herd serve` use it when no --model is given.

    python -m herd.default_model package HF_DIR TOKENIZER [--pretrain-run DIR --chat-run DIR]
re-packages it (scripts/train_default_model.sh calls this at the end).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
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


def _last_val(run: Path) -> dict | None:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    vals = [r for r in rows if "val_loss" in r]
    return vals[-1] if vals else None


def validation_text() -> str:
    """Held-out text for the recorded perplexity: Macbeth from the committed corpus (never trained on)."""
    import tarfile

    corpus = Path(__file__).resolve().parents[2] / "data" / "shakespeare" / "corpus.tar.xz"
    with tarfile.open(corpus) as tar:
        return tar.extractfile("val/macbeth.txt").read().decode("utf-8")


def measure(folder: Path) -> dict:
    """Golden greedy continuation and held-out perplexity of a packaged model (float32 compute)."""
    from .api import load
    from .evaluate import perplexity

    llm = load(folder, dtype="float32", device="cpu")
    out = llm.generate(GOLDEN_PROMPT, max_new_tokens=GOLDEN_TOKENS, temperature=0.0, stop_token_ids=[])
    ids = llm.tokenizer.encode(validation_text(), bos=True)[: VAL_TOKENS + 1]
    ppl = perplexity(llm.model, ids, window=512, stride=256)
    return {"golden_prompt": GOLDEN_PROMPT, "golden_ids": out.token_ids, "golden_text": out.text,
            "val_text": "data/shakespeare/corpus.tar.xz:val/macbeth.txt", "val_tokens": VAL_TOKENS,
            "val_window": 512, "val_ppl": ppl.perplexity}


def package(hf_dir: str, tokenizer: str, *, out: Path = DEFAULT_DIR, pretrain_run: str | None = None,
            chat_run: str | None = None) -> dict:
    import torch

    from .checkpoint import load_model, save_hf
    from .config import num_params

    model = load_model(hf_dir)
    save_hf(model, None, out, dtype=torch.bfloat16, overwrite=True)
    shutil.copy(tokenizer, out / "tokenizer.model")
    info = {"parameters": num_params(model.args), "config": model.args.to_params(),
            "tokenizer": "8192-token byte-level BPE trained by herd.bpe on the training plays + 256 special tokens"}
    for key, run in (("pretrain", pretrain_run), ("chat", chat_run)):
        if run:
            last = _last_val(Path(run))
            info[f"{key}_val_loss"] = last and last["val_loss"]
            info[f"{key}_val_ppl"] = last and last["val_ppl"]
    info.update(measure(out))
    (out / "card.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m herd.default_model", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("package", help="write HF_DIR's weights (bf16) + TOKENIZER into herd/assets/default")
    p.add_argument("hf_dir")
    p.add_argument("tokenizer")
    p.add_argument("--pretrain-run")
    p.add_argument("--chat-run")
    p.add_argument("--out", default=str(DEFAULT_DIR))
    a = ap.parse_args(argv)
    info = package(a.hf_dir, a.tokenizer, out=Path(a.out), pretrain_run=a.pretrain_run, chat_run=a.chat_run)
    print(json.dumps({k: v for k, v in info.items() if k != "config"}, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
