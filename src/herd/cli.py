"""The `herd` command: a thin argparse layer over typed library functions.

`COMMANDS` at the bottom is the whole command line: name -> (help, a function that declares the flags, a handler).
Handlers only parse, call the library, and print; ValueError/OSError/KeyError become a one-line message and exit
code 2 (no traceback unless HERD_DEBUG=1). The chat commands' flags and handlers are in cli_chat.py, the training
commands' in cli_train.py; library modules are imported inside handlers, so `herd --help` starts fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import cli_chat, cli_train
from .cli_chat import dtype_arg
from .config import DTYPE_ALIASES, DTYPE_NAMES


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _print_json(obj) -> None:
    print(json.dumps(obj, ensure_ascii=False))


# ---- subcommands: _<name>_args(p) declares the flags, _<name>(args) runs it --------------------------------


def _info_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint folder (HF or Meta), .gguf file, or a config name such as llama-3.1-8b")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _info(args) -> int:
    from .loading import model_info
    from .sizing import format_bytes

    info = model_info(args.model)
    if args.json:
        _print_json(info)
        return 0
    cfg = info["config"]
    print(f"format      {info['format']}")
    print(f"parameters  {info['parameters']:,}")
    print("config      " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    print(f"head_dim    {info['head_dim']}   ffn_hidden_dim {info['ffn_hidden_dim']}")
    print("weights     " + "   ".join(f"{k} {format_bytes(v)}" for k, v in info["bytes"].items())
          + f"   (int8/int4 as `herd quantize` writes them, int4 in groups of {info['int4_group_size']}; "
            "1 GB = 10^9 bytes, as `herd plan`)")
    kv = info["kv_cache_bytes_per_token_bf16"]
    print(f"kv cache    {format_bytes(kv)}/token (bf16), {format_bytes(kv * cfg['max_seq_len'])} at "
          f"{cfg['max_seq_len']:,} tokens")
    return 0


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="source checkpoint (HF folder, Meta folder or .gguf file)")
    p.add_argument("dst", help="destination folder (must not exist, or be empty), or OUT.gguf")
    p.add_argument("--to", required=True, choices=["hf", "meta", "gguf"], help="target layout")
    p.add_argument("--mp", type=_positive_int, default=1, help="model-parallel shards for --to meta (default 1)")
    p.add_argument("--dtype", type=_convert_dtype, choices=[*DTYPE_NAMES, "f32", "f16", "q8_0", "q4_0"],
                   help="hf/meta: bf16|fp16|fp32 (default: keep); gguf: f32|f16|bf16|q8_0|q4_0 (default f16)")
    p.add_argument("--tokenizer", help="--to gguf: tokenizer file or folder (default: the source folder's, "
                                       "else the Llama 3 vocabulary)")
    p.add_argument("--no-verify", action="store_true", help="skip the md5 check of Meta's checklist.chk")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty destination")


def _convert(args) -> int:
    if args.to == "gguf":
        from .convert import export_gguf

        dtype = {"fp32": "f32", "fp16": "f16"}.get(args.dtype, args.dtype or "f16")
        out = export_gguf(args.src, args.dst, dtype=dtype, tokenizer_path=args.tokenizer, progress=True)
    else:
        from .convert import convert

        if args.dtype in ("q8_0", "q4_0", "f32", "f16"):
            raise CLIError(f"--dtype {args.dtype} applies to --to gguf; use bf16, fp16 or fp32 (or `herd quantize`)")
        out = convert(args.src, args.dst, to=args.to, mp=args.mp, dtype=args.dtype, verify=not args.no_verify,
                      overwrite=args.overwrite, progress=True)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="config name, e.g. llama-3.1-405b")
    p.add_argument("--seq-len", type=_positive_int, help="context length (default: the model's, 131072)")
    p.add_argument("--batch", type=_positive_int, default=1, help="sequences in the KV cache (default 1)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp8", "int8", "int4"], help="weight dtype")
    p.add_argument("--hardware", default="h100", choices=["h100", "h200", "a100"],
                   help="the GPU assumed: memory, peak bf16 FLOP/s and bandwidth from its datasheet (default h100: "
                        "NVIDIA H100 SXM 80 GB)")
    p.add_argument("--train", action="store_true", help="also size pretraining")
    p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs (training: FSDP x TP x PP)")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel size")
    p.add_argument("--micro-batch", type=_positive_int, default=1, help="training sequences per GPU per step")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation for time estimates (default 0.4)")
    p.add_argument("--tokens", type=float, help="training tokens (for a time estimate)")
    p.add_argument("--flops", type=float, help="total training FLOPs (instead of --tokens)")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def _plan(args) -> int:
    from .sizing import format_plan, plan, plan_dict

    result = plan(args.model, seq_len=args.seq_len, batch=args.batch, dtype=args.dtype, gpus=args.gpus, tp=args.tp,
                  pp=args.pp, hardware=args.hardware, mfu=args.mfu, train=args.train, tokens=args.tokens,
                  total_flops=args.flops, micro_batch=args.micro_batch)
    if args.json:
        _print_json(plan_dict(result))
    else:
        print(format_plan(result))
    return 0


def _eval_args(p: argparse.ArgumentParser) -> None:
    ev = p.add_subparsers(dest="eval_command", metavar="{perplexity,tasks}", required=True)
    ppl = ev.add_parser("perplexity", help="sliding-window perplexity and bits per byte of a text file")
    ppl.add_argument("--model", help="checkpoint (HF/Meta folder, .gguf, or herd quantize output; default: herd's "
                                     "bundled model)")
    ppl.add_argument("--file", required=True, help="UTF-8 text file")
    ppl.add_argument("--window", type=_positive_int, help="tokens per window (default: the window the model was "
                                                          "trained on when it records one, else min(context, 2048))")
    ppl.add_argument("--stride", type=_positive_int, help="tokens between window starts (default window/2)")
    ppl.add_argument("--dtype", type=dtype_arg, default="fp32", choices=DTYPE_NAMES,
                     help="compute dtype (default fp32; long names such as float32 also accepted)")
    ppl.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    ppl.add_argument("--json", action="store_true", help="machine-readable output")
    tasks = ev.add_parser("tasks", help="lm-eval-harness with the herd model type, e.g. "
                                        "herd eval tasks --model_args model=PATH --tasks hellaswag", add_help=False)
    tasks.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments passed to lm_eval")


def _eval(args) -> int:
    return _eval_tasks(args) if args.eval_command == "tasks" else _eval_perplexity(args)


def _eval_perplexity(args) -> int:
    from .api import load
    from .default_model import resolve
    from .evaluate import text_perplexity
    from .loading import training_seq_len

    path = Path(args.file)
    if not path.is_file():
        raise CLIError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CLIError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    model = resolve(args.model)
    llm = load(model, dtype=args.dtype, device=args.device)
    window = args.window or training_seq_len(model)
    r = text_perplexity(llm, text, window=window, stride=args.stride, progress=not args.json)
    if args.json:
        _print_json(r.to_dict())
    else:
        print(f"perplexity {r.perplexity:.4f}   bits/byte {r.bits_per_byte:.4f}   "
              f"({r.tokens:,} tokens, {r.bytes:,} bytes, window {r.window}, stride {r.stride})")
    return 0


def _eval_tasks(args) -> int:
    from .evaluate import run_lm_eval

    rest = list(args.lm_eval_args)
    if "--model" not in rest:
        rest = ["--model", "herd", *rest]
    return run_lm_eval(rest)


def _merge_lora_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base checkpoint (HF folder, Meta folder or .gguf)")
    p.add_argument("adapter", help="adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("out", help="output folder (must not exist, or be empty)")
    p.add_argument("--to", choices=["hf", "meta"], default="hf", help="output layout (default hf)")
    p.add_argument("--dtype", type=dtype_arg, choices=DTYPE_NAMES, help="output dtype (default: the base's)")


def _merge_lora(args) -> int:
    from .config import torch_dtype
    from .lora import merge_adapter

    out = merge_adapter(args.base, args.adapter, args.out, to=args.to,
                        dtype=torch_dtype(args.dtype) if args.dtype else None)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", help="folder for the example checkpoints (default out/demo)")
    p.add_argument("--config", default="tiny", help="config name for the example (default tiny)")


def _demo(args) -> int:
    import shutil
    from pathlib import Path

    import torch

    from .checkpoint import save_meta
    from .config import get_config
    from .convert import convert
    from .loading import load_model, model_info
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


_TOKENIZER_HELP = "tokenizer file or folder (default: the Llama 3 vocabulary of the llama-models package)"


def _tokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("text", help='text to encode; "-" reads stdin')
    p.add_argument("--model", help=_TOKENIZER_HELP)
    p.add_argument("--bos", action="store_true", help="prepend <|begin_of_text|>")


def _tokenize(args) -> int:
    from .loading import load_tokenizer

    text = sys.stdin.read() if args.text == "-" else args.text
    _print_json(load_tokenizer(args.model).encode(text, bos=args.bos))
    return 0


def _detokenize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="+", help="token ids: integers, or one JSON list as printed by tokenize")
    p.add_argument("--model", help=_TOKENIZER_HELP)


def _detokenize(args) -> int:
    import re

    from .loading import load_tokenizer

    text = " ".join(args.ids).strip()
    if text.startswith("["):
        try:
            ids = json.loads(text)
        except json.JSONDecodeError as e:
            raise CLIError(f"ids are not a valid JSON list: {e}") from None
        bad = [i for i in ids if type(i) is not int] if isinstance(ids, list) else [ids]
    else:
        ids = re.split(r"[\s,]+", text)
        bad = [i for i in ids if not re.fullmatch(r"-?[0-9]+", i)]
    if bad:
        raise CLIError(f"not a token id: {bad[0]!r}")
    print(load_tokenizer(args.model).decode([int(i) for i in ids]))
    return 0


def _chat_template_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--messages", required=True, help='JSON file: a list of messages, or {"messages", "tools"}')
    p.add_argument("--tools", help="JSON file: a list of tools (built-in names or OpenAI-style function definitions)")
    p.add_argument("--model", help=_TOKENIZER_HELP)
    p.add_argument("--date", help='the "Today Date" when tools are given, e.g. "21 September 2024" (default: today)')
    p.add_argument("--tool-format", choices=["json", "function_tag"], default="json", help="custom tool call format")
    p.add_argument("--no-generation-prompt", action="store_true", help="do not end with an open assistant header")


def _chat_template(args) -> int:
    from .chat_format import ChatFormat
    from .loading import load_tokenizer

    messages, tools = _read_json(args.messages, "messages"), None
    if isinstance(messages, dict) and "messages" in messages:
        messages, tools = messages["messages"], messages.get("tools")
    if args.tools:
        tools = _read_json(args.tools, "tools")
    tok = load_tokenizer(args.model)
    ids = ChatFormat(tok, tool_format=args.tool_format).encode_dialog_prompt(
        messages, tools, add_generation_prompt=not args.no_generation_prompt, today=args.date
    )
    _print_json({"text": tok.decode(ids), "ids": ids})
    return 0


def _quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="source checkpoint (HF or Meta folder, or .gguf file)")
    p.add_argument("out", help="destination folder (must not exist, or be empty)")
    p.add_argument("--dtype", required=True, choices=["int8", "int4"], help="int8 per channel or int4 in groups")
    p.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256], help="int4 group (default 128)")
    p.add_argument("--eval-tokens", type=int, default=512,
                   help="tokens for the perplexity check before/after (default 512; 0 skips it)")
    p.add_argument("--eval-file", help="text file for the perplexity check (default: the held-out plays for the "
                                       "bundled model, else Python's textwrap.py source: pass text the model is "
                                       "about)")


def _quantize(args) -> int:
    from .convert import quantize_checkpoint

    if args.eval_tokens < 0:
        raise CLIError(f"--eval-tokens must be >= 0, got {args.eval_tokens}")
    text = None
    if args.eval_file:
        with open(args.eval_file, encoding="utf-8") as f:
            text = f.read()
    report = quantize_checkpoint(args.model, args.out, args.dtype, args.group_size, eval_text=text,
                                 eval_tokens=args.eval_tokens, eval_source=args.eval_file)
    if report["ppl_bf16"] is not None:
        print(f"perplexity on {report['eval_tokens']} tokens of {report['eval_text']}: bf16 {report['ppl_bf16']:.3f} "
              f"-> {args.dtype} {report['ppl_quantized']:.3f} ({report['ppl_change_pct']:+.2f}%)", file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    _print_json(report)
    return 0


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint for the decode benchmark (default: random Llama-3.2-1B weights)")
    p.add_argument("--only", help="comma-separated subset of decode,train,serve (default: all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smaller shapes, for minutes rather than the scripts' "
                                                           "defaults (whose decode run alone is ~10 min on 2 cores)")
    size.add_argument("--smoke", action="store_true", help="tiny shapes: seconds (checks that everything runs)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                   help="cuda: also fingerprint the GPU; the decode stage runs on it (train and serve stay "
                        "on the CPU)")
    p.add_argument("--threads", type=_positive_int, help="torch threads (default: torch's choice)")
    p.add_argument("--json", help="also write the fingerprint, rows and each script's results to this file")


def _bench(args) -> int:
    from .bench import format_report, run_bench

    out = Path(args.json) if args.json else None
    if out is not None and not out.parent.is_dir():  # before minutes of benchmarks, not after
        raise CLIError(f"--json {out}: folder {out.parent} does not exist")
    report = run_bench(only=args.only, preset="smoke" if args.smoke else "quick" if args.quick else "full",
                       model=args.model, device=args.device, threads=args.threads,
                       log=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_report(report))
    if out is not None:  # written whole or not at all
        tmp = out.with_name(f".{out.name}.partial")
        tmp.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, out)
    return 0 if report.ok else 1


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint: HF or Meta folder, .gguf file, or `herd quantize` output")
    p.add_argument("--random-weights", action="store_true", help="--model is a config name (e.g. tiny-llama3-vocab): "
                                                                 "serve random weights, for demos and tests")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; any other "
                                                       "needs --api-key or --insecure)")
    p.add_argument("--port", type=_port, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (default: $HERD_API_KEY)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--max-batch", type=_positive_int, default=64,
                   help="sequences decoded together at most (default 64; the KV cache also bounds how many fit)")
    p.add_argument("--kv-cache-gb", type=_positive_float,
                   help="size of the paged KV cache (default: a quarter of free memory, at most what max-batch "
                        "full-length sequences take)")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV blocks of earlier requests' identical prompt prefixes")
    p.add_argument("--no-compile", "--eager", dest="no_compile", action="store_true",
                   help="run the decode step eagerly (default: compiled, warmed up at start)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=600.0, help="seconds a request may wait (default 600)")
    p.add_argument("--max-seq-len", type=_positive_int, help="prompt + reply tokens per request "
                                                             "(default: min(model context, 8192))")
    p.add_argument("--max-body-bytes", type=_positive_int, default=8 << 20, help="request body cap (default 8 MiB)")
    p.add_argument("--allow-origin", action="append", help="browser origin allowed to call the API (repeatable)")
    p.add_argument("--served-model-name", help="the model's name in the APIs (default: the folder or config name)")
    p.add_argument("--shutdown-timeout", type=float, default=10.0, help="seconds running requests get on SIGTERM")
    p.add_argument("--max-connections", type=_positive_int, default=512,
                   help="open connections at most; above it the longest-idle one is closed, or if all are busy the "
                        "new one gets 503 (default 512)")
    p.add_argument("--read-timeout", type=_positive_float, default=30.0,
                   help="seconds for a request's headers to arrive, and again for its body (default 30)")
    p.add_argument("--timeout-keep-alive", type=_positive_float, default=5.0,
                   help="seconds an idle keep-alive connection stays open (default 5)")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the model folder's, else Llama 3's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", type=dtype_arg, choices=DTYPE_NAMES, help="weights and activations (default bf16)")


def _serve(args) -> int:
    from .serve.app import run_cli

    if args.max_queue < 0:
        raise CLIError(f"--max-queue must be >= 0, got {args.max_queue}")
    return run_cli(args)


def _port(s: str) -> int:
    v = _positive_int(s)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {v}")
    return v


def _read_json(path: str, what: str):
    from .config import read_json

    try:
        return read_json(path)
    except ValueError as e:  # JSONError: path:line: reason
        raise CLIError(f"{what} file: invalid JSON: {e}") from None


def _convert_dtype(s: str) -> str:
    return dtype_arg(s) if s.lower() in DTYPE_ALIASES else s


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return v


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}")
    return v


# ---- the command table --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "info": Command("print a model's config, parameter count and size at each dtype", _info_args, _info),
    "convert": Command("convert a checkpoint to the HF or Meta layout, or to a GGUF file", _convert_args, _convert),
    "quantize": Command("write a weight-only int8/int4 copy of a checkpoint (loads with --model)",
                       _quantize_args, _quantize),
    "merge-lora": Command("fold a PEFT LoRA adapter into its base model and write the result",
                         _merge_lora_args, _merge_lora),
    "demo": Command("build a small random Llama 3.1 checkpoint, convert it both ways, print its info",
                   _demo_args, _demo),
    "tokenize": Command("print the token ids of TEXT as a JSON list (special-token text stays text)",
                       _tokenize_args, _tokenize),
    "detokenize": Command("print the text of token ids", _detokenize_args, _detokenize),
    "chat-template": Command('render a dialog in the Llama 3.1 chat format as JSON {"text", "ids"}',
                            _chat_template_args, _chat_template),
    "generate": Command("continue a prompt (or answer it as a chat turn with --chat), streaming",
                       cli_chat.generate_args, cli_chat.run_generate),
    "chat": Command("interactive chat in the terminal (/system, /reset, /quit; Ctrl-C stops a reply)",
                   cli_chat.chat_args, cli_chat.run_chat),
    "serve": Command("serve a model: OpenAI and Ollama APIs, continuous batching, web playground", _serve_args, _serve),
    "eval": Command("evaluate a model: perplexity of a text file, or lm-eval-harness tasks", _eval_args, _eval),
    "plan": Command("memory, FLOPs and time to serve or train a model on given hardware", _plan_args, _plan),
    "bench": Command("machine fingerprint + decode, prefill, training and server benchmarks, one table",
                    _bench_args, _bench),
    "pretrain": Command(cli_train.PRETRAIN_HELP, cli_train.pretrain_args, cli_train.run_pretrain),
    "finetune": Command(cli_train.FINETUNE_HELP, cli_train.finetune_args, cli_train.run_finetune),
    "plot": Command(cli_train.PLOT_HELP, cli_train.plot_args, cli_train.run_plot),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="herd", description="Llama 3.1 end to end in plain PyTorch.")
    p.add_argument("--version", action="store_true", help="print the version and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, cmd in COMMANDS.items():
        cmd.add_arguments(sub.add_parser(name, help=cmd.help))
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from . import __version__

        print(__version__)
        return 0
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return COMMANDS[args.command].run(args) or 0
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
