"""The terminal side of generation: `herd generate` and the `herd chat` REPL (flags, output, the read loop).

cli.COMMANDS lists `generate_args` / `run_generate` and `chat_args` / `run_chat`; the REPL itself is `repl(llm, ...)`,
which takes its input and output as arguments so tests can drive it with a script.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from typing import TextIO

from .config import DTYPE_NAMES, ConfigError, dtype_name

CHAT_HELP = """commands:
  /system TEXT   set the system message (no TEXT: show it)
  /reset         forget the conversation (keeps the system message)
  /quit          leave (also /exit or Ctrl-D)
Ctrl-C stops the current reply."""


def dtype_arg(s: str) -> str:
    """argparse type of every command's --dtype: bf16 | fp16 | fp32, long names (bfloat16, float32, ...) as aliases."""
    try:
        return dtype_name(s)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True, help='prompt text; "-" reads stdin')
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the chat format")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--ids", action="store_true", help="print the generated token ids as a JSON list instead of text")
    p.add_argument("--stats", action="store_true", help="finish with one JSON line: prompt_tokens, generated_tokens, "
                                                        "prefill_tok_s, decode_tok_s")
    model_flags(p)


def chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", help="initial system message")
    model_flags(p)


def model_flags(p: argparse.ArgumentParser) -> None:
    """--model and the loading and sampling flags shared by `generate` and `chat`."""
    p.add_argument("--model", help="checkpoint: HF or Meta folder, .gguf file, or `herd quantize` output "
                                   "(default: herd's bundled Shakespeare model)")
    p.add_argument("--tokenizer", help="tokenizer file or folder (default: the model folder's, else Llama 3's)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--dtype", type=dtype_arg, choices=DTYPE_NAMES, help="weights and activations (default bf16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (slow first call)")
    p.add_argument("--max-seq-len", type=int, help="cap on prompt + new tokens (default: the model's context)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate at most (default 256; chat 1024)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    p.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (default 0 = off)")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages tokens already seen")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted once from generated tokens' logits")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="subtracted per occurrence")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(args) -> dict:
    return {
        "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k, "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
        "frequency_penalty": args.frequency_penalty, "seed": args.seed,
    }


def _max_new(args, default: int) -> int:
    n = default if args.max_new_tokens is None else args.max_new_tokens
    if n < 1:
        raise ValueError(f"--max-new-tokens must be positive, got {n}")
    return n


def load_llm(args):
    from .api import load
    from .default_model import resolve

    if args.max_seq_len is not None and args.max_seq_len < 1:
        raise ValueError(f"--max-seq-len must be positive, got {args.max_seq_len}")
    llm = load(resolve(args.model), device=args.device, dtype=args.dtype, tokenizer=args.tokenizer,
               max_seq_len=args.max_seq_len, compile=args.compile)
    if args.compile:  # before the prompt: the first reply (and --stats) must not wait for, or count, the compile
        t0 = time.perf_counter()
        print("compiling the decode step (once per process) ...", file=sys.stderr, flush=True)
        llm.engine.warmup(1)
        print(f"compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return llm


# ---- herd generate ------------------------------------------------------------------------------------------


def run_generate(args, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    sampling, max_new = _sampling(args), _max_new(args, 256)
    llm = load_llm(args)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt})
        stream = llm.chat(messages, max_new_tokens=max_new, stop=args.stop or None, stream=True, **sampling)
    else:
        if args.system:
            raise ValueError("--system needs --chat")
        stream = llm.generate(prompt, max_new_tokens=max_new, stop=args.stop or None, stream=True, **sampling)
    for delta in stream:
        if not args.ids:
            out.write(delta)
            out.flush()
    result = stream.result
    completion = result.completion if args.chat else result
    if args.ids:
        out.write(json.dumps(completion.token_ids) + "\n")
    elif completion.text and not completion.text.endswith("\n"):
        out.write("\n")
    if args.stats:
        s = completion.stats
        keys = ("prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s")
        out.write(json.dumps({k: (round(s[k], 2) if isinstance(s[k], float) else s[k]) for k in keys}) + "\n")
    return 0


# ---- herd chat ----------------------------------------------------------------------------------------------


def run_chat(args) -> int:
    sampling, max_new = _sampling(args), _max_new(args, 1024)
    llm = load_llm(args)
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    return repl(llm, system=args.system, max_new_tokens=max_new, stop=args.stop or None, **sampling)


def repl(llm, *, input_fn: Callable[[str], str] = input, out: TextIO | None = None, err: TextIO | None = None,
         system: str | None = None, max_new_tokens: int = 1024, **gen) -> int:
    """Interactive chat: read a line, stream the reply, keep the history. Returns 0 on /quit or end of input."""
    out, err = out or sys.stdout, err or sys.stderr
    history: list[dict] = []
    err.write("herd chat: type a message, /help for commands\n")
    while True:
        try:
            line = input_fn(">>> ")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            err.write("\n(/quit or Ctrl-D to leave)\n")
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, rest = text.partition(" ")
            if cmd in ("/quit", "/exit"):
                return 0
            if cmd == "/reset":
                history.clear()
                err.write("(conversation cleared)\n")
            elif cmd == "/system":
                if rest.strip():
                    system = rest.strip()
                    err.write("(system message set)\n")
                else:
                    err.write(f"(system message: {system!r})\n")
            elif cmd == "/help":
                err.write(CHAT_HELP + "\n")
            else:
                err.write(f"unknown command {cmd}; /help lists them\n")
            continue
        history.append({"role": "user", "content": line})
        messages = ([{"role": "system", "content": system}] if system else []) + history
        reply = _reply(llm, messages, out, err, max_new_tokens, gen)
        if reply is None:
            history.pop()  # the turn failed (e.g. context full): forget the question too
        else:
            history.append({"role": "assistant", "content": reply})


def _reply(llm, messages, out: TextIO, err: TextIO, max_new_tokens: int, gen: dict) -> str | None:
    """Stream one reply; Ctrl-C stops it and keeps the part already shown. None when the turn failed."""
    try:
        stream = llm.chat(messages, max_new_tokens=max_new_tokens, stream=True, **gen)
    except ValueError as e:  # context overflow, bad parameters
        err.write(f"error: {e}\n")
        return None
    t0, interrupted = time.perf_counter(), False
    try:
        for delta in stream:
            out.write(delta)
            out.flush()
    except KeyboardInterrupt:
        interrupted = True
        stream.close()
    except ValueError as e:
        stream.close()
        err.write(f"\nerror: {e}\n")
        return None
    result = stream.result
    text = result.completion.text if result is not None else ""
    out.write("\n")
    stats = result.completion.stats if result is not None else {}
    n = stats.get("generated_tokens", 0)
    rate = stats.get("decode_tok_s")
    note = " interrupted," if interrupted else ""
    speed = f", {rate:.1f} tok/s" if rate else ""
    err.write(f"[{note} {n} tokens in {time.perf_counter() - t0:.1f} s{speed}]\n".replace("[ ", "["))
    return text
