"""The `herd` command: a thin argparse layer over typed library functions.

Each subcommand is one `add_<name>(sub)` function that declares its flags and binds a handler `_<name>(args)`.
Handlers only parse, call the library, and print; errors derived from HerdError/ValueError/OSError become a one-line
message and exit code 2 (no traceback unless HERD_DEBUG=1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# ---- subcommands --------------------------------------------------------------------------------------------
# (each add_* registers one subcommand; keep handlers thin)


def add_info(sub) -> None:
    p = sub.add_parser("info", help="print a model's config, parameter count and size at each dtype")
    p.add_argument("model", help="checkpoint folder (HF or Meta), .gguf file, or a config name such as llama-3.1-8b")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_info)


def _info(args) -> int:
    from .checkpoint import model_info

    info = model_info(args.model)
    if args.json:
        _print_json(info)
        return 0
    cfg = info["config"]
    print(f"format      {info['format']}")
    print(f"parameters  {info['parameters']:,}")
    print("config      " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"head_dim    {info['head_dim']}   ffn_hidden_dim {info['ffn_hidden_dim']}")
    print("weights     " + "   ".join(f"{k} {_size(v)}" for k, v in info["bytes"].items()))
    kv = info["kv_cache_bytes_per_token_bf16"]
    print(f"kv cache    {_size(kv)}/token (bf16), {_size(kv * cfg['max_seq_len'])} at {cfg['max_seq_len']:,} tokens")
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint between the HF and Meta layouts")
    p.add_argument("src", help="source checkpoint (HF folder, Meta folder or .gguf file)")
    p.add_argument("dst", help="destination folder (must not exist, or be empty)")
    p.add_argument("--to", required=True, choices=["hf", "meta"], help="target layout")
    p.add_argument("--mp", type=_positive_int, default=1, help="model-parallel shards for --to meta (default 1)")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], help="cast weights (default: keep)")
    p.add_argument("--no-verify", action="store_true", help="skip the md5 check of Meta's checklist.chk")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")
    p.set_defaults(func=_convert)


def _convert(args) -> int:
    from .checkpoint import convert

    out = convert(args.src, args.dst, to=args.to, mp=args.mp, dtype=args.dtype, verify=not args.no_verify,
                  overwrite=args.overwrite, progress=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="build a small random Llama 3.1 checkpoint, convert it both ways, print its info")
    p.add_argument("--out", default="out/demo", help="folder for the example checkpoints (default out/demo)")
    p.add_argument("--config", default="tiny", help="config name for the example (default tiny)")
    p.set_defaults(func=_demo)


def _demo(args) -> int:
    import shutil
    from pathlib import Path

    import torch

    from .checkpoint import convert, load_model, model_info, save_meta
    from .config import get_config
    from .model import Transformer

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(0)
    model = Transformer(get_config(args.config))
    model.init_weights()
    save_meta(model, None, out / "meta-mp2", mp=2)
    convert(out / "meta-mp2", out / "hf", to="hf")
    convert(out / "hf", out / "meta-mp1", to="meta")
    tokens = torch.randint(0, model.args.vocab_size, (1, 16))
    with torch.no_grad():
        diffs = [(load_model(out / d)(tokens) - model(tokens)).abs().max().item() for d in ("meta-mp2", "hf", "meta-mp1")]
    info = model_info(str(out / "hf"))
    print(f"example checkpoints in {out}: meta-mp2/ (2 shards) -> hf/ -> meta-mp1/")
    print(f"parameters {info['parameters']:,}; max |logit difference| after each conversion: {max(diffs):.1e}")
    return _info(argparse.Namespace(model=str(out / "hf"), json=False))


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="Llama 3.1 end to end in plain PyTorch.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, fn in sorted(globals().items()):
        if name.startswith("add_") and callable(fn):
            fn(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (CLIError, ValueError, OSError, KeyError) as e:
        if os.environ.get("HERD_DEBUG"):
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"herd {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
