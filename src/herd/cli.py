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
