"""`herd pretrain`, `herd finetune` and `herd plot`: the training subcommands (listed in cli.COMMANDS).

Same contract as cli.py: flags, one library call, a one-line summary; bad settings raise ValueError, which the
`herd` entry point prints as one line with exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

PRETRAIN_HELP = "pretrain a model on text files from a YAML run config (also under torchrun)"
FINETUNE_HELP = "fine-tune on chat/Alpaca JSONL: full, LoRA or QLoRA (also under torchrun)"
PLOT_HELP = "write a PNG of a training run's loss curves"


def _training_flags(p: argparse.ArgumentParser, example: str, override_example: str) -> None:
    p.add_argument("--config", required=True, help=f"YAML run settings, e.g. {example}")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=f"override settings, e.g. {override_example}")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")


def _run(command: str, settings, print_config: bool, recipe) -> int:
    """Print the settings, or run them; a diverged run exits 3, and only rank 0 prints the summary line."""
    import yaml

    from .train import TrainingDiverged, train

    if print_config:
        print(yaml.safe_dump(settings.to_dict(), sort_keys=False), end="")
        return 0
    try:
        result = train(settings, recipe)
    except TrainingDiverged as e:
        print(f"herd {command}: stopped: {e}", file=sys.stderr)
        return 3
    if os.environ.get("RANK", "0") == "0":  # under torchrun, one summary line
        held_out = f", held-out loss {result.val_loss:.4f}" if result.val_loss is not None else ""
        print(f"done: step {result.step} in {result.run_dir}{held_out}", file=sys.stderr)
    return 0


def pretrain_args(p: argparse.ArgumentParser) -> None:
    _training_flags(p, "configs/pretrain-tiny.yaml", "optim.lr=1e-3 train.steps=200")


def run_pretrain(args) -> int:
    from .train import PRETRAINING, load_settings

    settings = load_settings(args.config, args.overrides)
    if settings.finetune is not None:
        raise ValueError(f"{args.config} has a finetune section: run it with `herd finetune`")
    return _run("pretrain", settings, args.print_config, PRETRAINING)


def finetune_args(p: argparse.ArgumentParser) -> None:
    _training_flags(p, "configs/finetune-lora.yaml", "finetune.method=qlora model.init_from=PATH data.paths=[my.jsonl]")


def run_finetune(args) -> int:
    from .train import FINETUNING, load_finetune_settings

    return _run("finetune", load_finetune_settings(args.config, args.overrides), args.print_config, FINETUNING)


def plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run folder (holds metrics.jsonl)")
    p.add_argument("--out", help="PNG path (default RUN_DIR/loss.png)")


def run_plot(args) -> int:
    from .train.metrics import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0
