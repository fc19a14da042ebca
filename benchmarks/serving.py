"""Serving benchmark (issue 18): herd through what users run, `herd generate` and `herd serve`, each row against its
peer measured in the same run. Every server is a subprocess on a free port; every request has a timeout.

  1  one streaming /v1/completions over HTTP: decode tok/s (first to last token) vs `herd generate --stats`
  2  `herd generate` (default flags) vs llama.cpp (llama-cpp-python, same threads) on the same weights as GGUF:
     bf16 vs BF16, `herd quantize --dtype int8` output vs Q8_0
  3  agent workload: shared system prompt + tools, N turns each resending the history (/v1/chat/completions):
     time to first token with herd's prefix cache on vs off, and vs llama.cpp's own OpenAI server (prompt cache on)
  4  C concurrent streaming clients: aggregate tok/s vs one client alone, and the same requests on llama.cpp's server
  5  KV memory of S concurrent T-token sessions of a shape (config arithmetic, plus a live check from /metrics when
     the server exports its KV block gauges) vs a pool size

    .venv/bin/python benchmarks/serving.py                       # ~15 min on 2 cores
    .venv/bin/python benchmarks/serving.py --smoke --json out.json   # tiny shapes, about a minute
"""

from __future__ import annotations

import sys
from importlib.util import find_spec
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1] / "src")  # see benchmarks/decode.py

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import re
import signal
import socket
import statistics
import subprocess
import tempfile
import time

import httpx
import torch

ROWS = {  # id -> title; the JSON always has every row (status ok / failed / unavailable)
    "1_http_vs_generate": "1. single stream over HTTP vs herd generate (decode tok/s)",
    "2_generate_vs_llamacpp_bf16": "2. herd generate bf16 vs llama.cpp BF16 (decode tok/s)",
    "2_generate_vs_llamacpp_int8": "2. herd generate int8 vs llama.cpp Q8_0 (decode tok/s)",
    "3_agent_prefix_cache": "3. agent turns, TTFT: prefix cache on vs off (speedup)",
    "3_agent_vs_llamacpp": "3. agent turns, TTFT: herd (cache on) vs llama.cpp server (speedup)",
    "4_clients_vs_one": "4. concurrent streaming clients vs one client (aggregate tok/s)",
    "4_clients_vs_llamacpp": "4. concurrent streaming clients: herd vs llama.cpp server (aggregate tok/s)",
    "5_kv_memory": "5. KV memory of concurrent sessions vs a pool",
}
HERD = [sys.executable, "-m", "herd"]
NAME = "bench"  # the served model's name in both servers
WORDS = ["order", "shipment", "warehouse", "carrier", "invoice", "customer", "route", "delay", "refund", "address",
         "parcel", "status", "priority", "inventory", "supplier", "schedule", "dispatch", "tracking", "region"]


class PeerError(RuntimeError):
    """A side of a row failed; `log` is its stderr (printed with the row)."""
    def __init__(self, msg: str, log: str = ""):
        super().__init__(msg)
        self.log = log


PROCS: list[subprocess.Popen] = []


def stop(p: subprocess.Popen) -> None:
    """SIGTERM the process group this script started for `p` (its own session), SIGKILL after 15 s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, subprocess.TimeoutExpired):
            if p.poll() is None:
                os.killpg(p.pid, sig)
                p.wait(15)


class Server:
    """A server subprocess on a free port (retried if another process took the port first); a context manager."""

    def __init__(self, ctx, name: str, argv, ready: str):
        self.ctx, self.name, self.argv, self.ready = ctx, name, argv, ready

    def __enter__(self):
        out = ""
        for _ in range(3):
            with socket.socket() as s:  # a free port; the child binds it a moment later (retried if taken since)
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            self.url, self.log = f"http://127.0.0.1:{self.port}", self.ctx.tmp / f"{self.name}-{self.port}.log"
            with open(self.log, "wb") as f:
                self.p = subprocess.Popen(self.argv(self.port), stdout=f, stderr=subprocess.STDOUT, env=self.ctx.env,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            PROCS.append(self.p)
            deadline = time.time() + self.ctx.a.start_timeout
            while time.time() < deadline and self.p.poll() is None:
                try:
                    if httpx.get(self.url + self.ready, timeout=5).status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            out = self.log.read_text(errors="replace")[-3000:]
            stop(self.p)
            if "address already in use" not in out.lower():
                break
        raise PeerError(f"{self.name} did not start", out)

    def __exit__(self, exc_type, exc, tb):
        stop(self.p)
        if isinstance(exc, PeerError):  # an HTTP error: the server's own account of it
            exc.log += f"\n--- {self.name} output ---\n" + self.log.read_text(errors="replace")[-3000:]


def herd_server(ctx, model: Path, *extra: str) -> Server:
    a = ctx.a
    if "--kv-cache-gb" in ctx.serve_help:  # the paged engine: a pool of this size (else: max_batch x max_seq_len)
        extra += ("--kv-cache-gb", str(a.kv_cache_gb))
    return Server(ctx, "herd-serve", lambda port: HERD + [
        "serve", "--model", str(model), "--port", str(port), "--device", a.device, "--served-model-name", NAME,
        "--max-batch", str(a.max_batch), "--max-seq-len", str(a.max_seq_len), *extra], "/health")


def llama_server(ctx, gguf: Path) -> Server:
    t = str(ctx.a.threads)
    return Server(ctx, "llama-cpp-server", lambda port: [
        sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", NAME, "--host", "127.0.0.1",
        "--port", str(port), "--n_ctx", str(ctx.a.max_seq_len), "--n_threads", t, "--n_threads_batch", t,
        "--cache", "True", "--interrupt_requests", "False", "--verbose", "False"], "/v1/models")


def run_cmd(ctx, argv: list[str], what: str) -> str:
    try:
        p = subprocess.run(argv, capture_output=True, text=True, env=ctx.env, timeout=ctx.a.request_timeout,
                           check=False)
    except subprocess.TimeoutExpired as e:
        raise PeerError(f"{what}: no answer in {ctx.a.request_timeout} s", str(e.stderr or "")[-3000:]) from None
    if p.returncode:
        raise PeerError(f"{what} exited with {p.returncode}", p.stderr[-3000:])
    return p.stdout


def herd_generate(ctx, model: Path, prompt: str) -> dict:
    out = run_cmd(ctx, HERD + ["generate", "--model", str(model), "--prompt", prompt, "--max-new-tokens",
                               str(ctx.a.tokens), "--temperature", "0", "--stats", "--device", ctx.a.device],
                  "herd generate")
    return json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])


def client(ctx, url: str, conns: int = 8) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=ctx.a.request_timeout,
                             limits=httpx.Limits(max_connections=conns + 8))


async def stream(c: httpx.AsyncClient, route: str, body: dict) -> dict:
    """One streaming request: seconds to the first token (text or tool call), first/last token times, tokens."""
    body = {"model": NAME, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, **body}
    t0 = time.perf_counter()
    first = last = finish = usage = None
    chunks = 0
    async with c.stream("POST", route, json=body) as r:
        if r.status_code != 200:
            raise PeerError(f"{route}: HTTP {r.status_code}", (await r.aread()).decode(errors="replace")[:3000])
        async for line in r.aiter_lines():
            if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                continue
            ev, now = json.loads(line[5:]), time.perf_counter()
            if "error" in ev:
                raise PeerError(f"{route}: error in the stream", line[:3000])
            usage = ev.get("usage") or usage
            for ch in ev.get("choices") or []:
                d = ch.get("delta") or {}
                if ch.get("text") or d.get("content") or d.get("tool_calls"):
                    chunks, first, last = chunks + 1, first or now, now
                elif ch.get("finish_reason"):
                    first, last = first or now, now
                finish = ch.get("finish_reason") or finish
    end = time.perf_counter()
    # tokens: the server's count; else (llama.cpp streams no usage) max_tokens when it stopped on the length
    n = usage["completion_tokens"] if usage else body["max_tokens"] if finish == "length" else chunks
    cached = ((usage or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft": (first or end) - t0, "first": first or end, "last": last or end, "wall": end - t0, "tokens": n,
            "prompt_tokens": (usage or {}).get("prompt_tokens"), "cached_tokens": cached}


async def completion(c, prompt: str, tokens: int) -> dict:
    return await stream(c, "/v1/completions", {"prompt": prompt, "max_tokens": tokens})


def shape(args, name: str) -> str:
    return (f"{name}: {args.n_layers} layers, dim {args.dim}, {args.n_heads}/{args.n_kv_heads} heads, "
            f"vocab {args.vocab_size}, bf16 random weights")


def write_model(ctx, args, name: str, gguf_types: tuple[str, ...]) -> dict:
    """Random bf16 weights of `args` as an HF folder (what herd opens) and GGUF files (what llama.cpp opens)."""
    from herd.chat_format import LLAMA31_CHAT_TEMPLATE
    from herd.checkpoint import save_hf
    from herd.gguf import write_gguf
    from herd.model import Transformer

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of a 1B model on the way
    model = Transformer(args)
    torch.set_default_dtype(prev)
    with torch.no_grad():
        model.init_weights()
        # Random weights pick random tokens: byte fragments (held back by streaming detokenizers until their
        # character completes, which hides the tokens' timing), stop tokens, tool-call starts. Zero the head rows of
        # all but printable ASCII tokens so every reply streams token by token for max_tokens (same cost per token).
        keep = torch.zeros(args.vocab_size, dtype=torch.bool)
        special = set(ctx.tok.special_tokens.values())
        for i in range(args.vocab_size):
            b = ctx.tok.token_bytes(i) if i not in special else b""
            keep[i] = b.isascii() and b.strip() != b"" and b.decode().isprintable() and b.lstrip()[:1] not in b"{<"
        model.output.weight[~keep] = 0  # the tied head (Llama 3.2) is the embedding table: its rows too
    out = {"hf": save_hf(model, args, ctx.tmp / f"{name}-hf")}
    for t in gguf_types:
        out[t] = write_gguf(model.state_dict(), args, ctx.tok, ctx.tmp / f"{name}-{t}.gguf", dtype=t,
                            chat_template=LLAMA31_CHAT_TEMPLATE)
    return out


def text_of(tok, n_tokens: int, seed: int, head: str = "") -> str:
    """Deterministic prose of about n_tokens tokens."""
    rng, out = random.Random(seed), head
    while len(tok.encode(out)) < n_tokens:
        w = rng.sample(WORDS, 6)
        out += f" When the {w[0]} {w[1]} is {w[2]}, {w[3]} the {w[4]} before the {w[5]}."
    return out


TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {  # an agent's tools list
    "type": "object", "required": [ps.split()[0]],
    "properties": {p: {"type": "string", "description": f"the {p.replace('_', ' ')}"} for p in ps.split()}}}}
    for n, d, ps in (("get_order", "Look up one order by id.", "order_id fields"),
                     ("search_orders", "Search orders by customer and status.", "customer status limit"),
                     ("update_order", "Change an order's status or address.", "order_id status address"),
                     ("track_shipment", "Carrier tracking events of a shipment.", "tracking_number carrier"),
                     ("issue_refund", "Refund part or all of an order.", "order_id amount reason"),
                     ("send_email", "Email a customer.", "to subject body"))]


def row(rows: dict, rid: str, herd: str, peer: str, ratio: float | None, goal: str, met: bool | None,
        note: str = "", **detail) -> None:
    rows[rid] = {"id": rid, "title": ROWS[rid], "status": "ok", "herd": herd, "peer": peer, "ratio": ratio,
                 "goal": goal, "met": met, "note": note, "detail": detail}


def mark(rows: dict, rid: str, status: str, note: str) -> None:
    """A row without numbers: "failed" (what failed is in the note and on stderr) or "unavailable" (why)."""
    rows[rid] = {"id": rid, "title": ROWS[rid], "status": status, "note": note}


def guarded(rows: dict, ids: tuple[str, ...], fn, *args) -> None:
    """Run a group of rows; on failure print the failing side's stderr and mark its unrecorded rows failed."""
    try:
        fn(rows, *args)
    except Exception as e:  # noqa: BLE001 (one failing peer must not lose the rest of the table)
        log = getattr(e, "log", "")
        print(f"FAILED {', '.join(i for i in ids if i not in rows)}: {type(e).__name__}: {e}"
              + (f"\n--- its output ---\n{log}\n---" if log else ""), file=sys.stderr, flush=True)
        for rid in ids:
            if rid not in rows:
                mark(rows, rid, "failed", f"{type(e).__name__}: {e}")


def llama_cpp_decode(path: Path, prompt: list[int], new: int, threads: int) -> float:
    """llama.cpp's greedy decode tok/s through llama_cpp.Llama, as benchmarks/decode.py measures it: tokens after the
    first / time, its argmax over the logits included; the first of two runs pages the file in and is not counted."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new, n_batch=len(prompt), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    n_vocab = llm.n_vocab()

    def greedy() -> int:  # the last position's logits, read in place
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    try:
        for _ in range(2):
            llm.reset()
            llm.eval(prompt)
            tok, t = greedy(), time.perf_counter()
            for _ in range(new - 1):
                llm.eval([tok])
                tok = greedy()
            rate = (new - 1) / (time.perf_counter() - t)
    finally:
        llm.close()
    return rate


def rows_1_2(rows: dict, ctx) -> None:
    a, tok, m = ctx.a, ctx.tok, ctx.big
    prompt = text_of(tok, a.prompt_tokens, seed=1, head="Shipping notes.")
    ids = tok.encode(prompt, bos=True)
    lc = None if ctx.llama_why else llama_cpp_decode
    paths, runs, errors = {"bf16": m["hf"], "int8": ctx.tmp / "big-int8"}, {}, {}
    try:
        run_cmd(ctx, HERD + ["quantize", str(m["hf"]), str(paths["int8"]), "--dtype", "int8", "--eval-tokens", "0"],
                "herd quantize")
    except PeerError as e:
        errors["herd", "int8"] = e
    sides = {("herd", w): (lambda w=w: herd_generate(ctx, paths[w], prompt)["decode_tok_s"]) for w in paths}
    if lc:
        sides.update({("llama", g): (lambda g=g: lc(m[g], ids, a.tokens, a.threads)) for g in ("bf16", "q8_0")})
    for _ in range(a.repeats):  # alternate herd and llama.cpp, so a slower stretch of the machine hits both
        for side in sorted(sides, key=lambda s: (s[1] != "bf16", s[0])):
            if side not in errors:
                try:
                    runs.setdefault(side, []).append(sides[side]())
                except Exception as e:  # noqa: BLE001 (the row says what failed)
                    errors[side] = e
    print(f"decode tok/s per run: {runs}" + "".join(f"\n{s[0]} {s[1]} FAILED: {e}\n{getattr(e, 'log', '')}"
                                                    for s, e in errors.items()), file=sys.stderr, flush=True)
    for width, gtype, rid in (("bf16", "bf16", "2_generate_vs_llamacpp_bf16"),
                              ("int8", "q8_0", "2_generate_vs_llamacpp_int8")):
        bad = errors.get(("herd", width)) or errors.get(("llama", gtype))
        if ("herd", width) in errors or (lc and bad):
            mark(rows, rid, "failed", f"{type(bad).__name__}: {bad}")
        elif not lc:
            mark(rows, rid, "unavailable", f"llama.cpp: {ctx.llama_why}")
        else:
            h, p = max(runs["herd", width]), max(runs["llama", gtype])
            row(rows, rid, f"{h:.2f} tok/s", f"{p:.2f} tok/s (llama.cpp {gtype.upper()})", h / p, ">= 1.0x",
                h / p >= 1.0, herd_tok_s=h, peer_tok_s=p, runs=runs["herd", width], peer_runs=runs["llama", gtype])
    if ("herd", "bf16") in errors:
        raise errors["herd", "bf16"]
    base = max(runs["herd", "bf16"])

    async def http(url):
        async with client(ctx, url) as c:
            await completion(c, "warm up", 4)
            rs = [await completion(c, prompt, a.tokens) for _ in range(a.repeats)]
            return [(r["tokens"] - 1) / max(r["last"] - r["first"], 1e-9) for r in rs]  # first to last token

    with herd_server(ctx, m["hf"]) as srv:
        rates = asyncio.run(http(srv.url))
    h = max(rates)
    row(rows, "1_http_vs_generate", f"{h:.2f} tok/s (HTTP stream)", f"{base:.2f} tok/s (herd generate)", h / base,
        ">= 0.9x", h / base >= 0.9, "herd serve defaults (" + ("decode step compiled; " if "--no-compile" in
        ctx.serve_help else "") + "herd generate eager)", herd_tok_s=h, peer_tok_s=base, runs=rates,
        peer_runs=runs["herd", "bf16"])


async def agent(ctx, url: str | None, fresh=None) -> list[dict]:
    """The agent's turns: each resends the whole history (system, tools, every earlier turn) plus a new user
    message; the assistant's replies in the history are scripted, so every server sees the same prompts.
    fresh: a function giving a new server per turn (prefix cache off, approximated by a cold server)."""
    system = text_of(ctx.tok, ctx.a.system_tokens, seed=2, head="You are Atlas, the operations agent of a "
                                                                 "logistics company. Follow these rules.")
    msgs, out = [{"role": "system", "content": system}], []
    for k in range(ctx.a.turns):
        msgs.append({"role": "user", "content": f"Turn {k}: check order #{1000 + k} and give its status in one line."})
        body = {"messages": msgs, "tools": TOOLS, "max_tokens": ctx.a.reply_tokens}
        with fresh() if fresh else contextlib.nullcontext() as srv:
            async with client(ctx, srv.url if srv else url) as c:
                if srv or k == 0:  # warm-up with no shared prefix
                    await stream(c, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                             "max_tokens": 2})
                out.append(await stream(c, "/v1/chat/completions", body))
        msgs.append({"role": "assistant", "content": f"Order #{1000 + k} is in transit, due in {k % 5 + 1} days."})
    return out


def ttft_summary(turns: list[dict]) -> dict:
    t = [r["ttft"] for r in turns]
    return {"median_ms": statistics.median(t) * 1e3, "total_s": sum(t), "ttft_ms": [x * 1e3 for x in t],
            "prompt_tokens": [r["prompt_tokens"] for r in turns], "cached_tokens": [r["cached_tokens"] for r in turns]}


def rows_3_5(rows: dict, ctx) -> None:
    a, m = ctx.a, ctx.small
    has_flag = "--no-prefix-cache" in ctx.serve_help
    res = {}
    with herd_server(ctx, m["hf"]) as srv:
        res["on"] = ttft_summary(asyncio.run(agent(ctx, srv.url)))
        guarded(rows, ("4_clients_vs_one",), lambda rows: clients_row(rows, ctx, srv.url, res))
        kv_row(rows, ctx, srv.url)
    if has_flag:
        off_label = "prefix cache off (--no-prefix-cache)"
        with herd_server(ctx, m["hf"], "--no-prefix-cache") as srv:
            res["off"] = ttft_summary(asyncio.run(agent(ctx, srv.url)))
    else:
        off_label = "off: approximated by a fresh server per turn (no --no-prefix-cache yet)"
        res["off"] = ttft_summary(asyncio.run(agent(ctx, None, fresh=lambda: herd_server(ctx, m["hf"]))))
    on, off = res["on"], res["off"]
    cached = [c for c in on["cached_tokens"] if c is not None]
    note = (f"{a.turns} turns, system {a.system_tokens} tok + {len(TOOLS)} tools, prompts "
            f"{on['prompt_tokens'][0]}..{on['prompt_tokens'][-1]} tok, replies {a.reply_tokens} tok; {off_label}; "
            + (f"cached_tokens per turn {cached}" if cached else "usage.prompt_tokens_details.cached_tokens absent"))
    sp = off["median_ms"] / on["median_ms"]
    row(rows, "3_agent_prefix_cache", f"on: median {on['median_ms']:.0f} ms, total {on['total_s']:.2f} s",
        f"off: median {off['median_ms']:.0f} ms, total {off['total_s']:.2f} s", sp, ">= 5x (median TTFT)", sp >= 5,
        note, on=on, off=off, no_prefix_cache_flag=has_flag)
    if ctx.server_why:
        for rid in ("3_agent_vs_llamacpp", "4_clients_vs_llamacpp"):
            mark(rows, rid, "unavailable", f"llama.cpp server: {ctx.server_why}")
        return
    with llama_server(ctx, m["bf16"]) as srv:
        lc = ttft_summary(asyncio.run(agent(ctx, srv.url)))
        sp = lc["median_ms"] / on["median_ms"]
        row(rows, "3_agent_vs_llamacpp", f"herd on: median {on['median_ms']:.0f} ms, total {on['total_s']:.2f} s",
            f"llama.cpp: median {lc['median_ms']:.0f} ms, total {lc['total_s']:.2f} s", sp, "(none set)", None,
            "llama_cpp.server --cache True, same BF16 weights as GGUF", herd_side=on, peer_side=lc)
        if "clients" in res:
            lcc = asyncio.run(clients(ctx, srv.url))
            h = res["clients"]["aggregate_tok_s"]
            row(rows, "4_clients_vs_llamacpp", f"{h:.1f} tok/s ({a.clients} clients)",
                f"{lcc['aggregate_tok_s']:.1f} tok/s (llama.cpp server)", h / lcc["aggregate_tok_s"], "(none set)",
                None, "llama-cpp-python's server runs one request at a time", herd_side=res["clients"], peer_side=lcc)
        else:
            mark(rows, "4_clients_vs_llamacpp", "failed", "herd's side of row 4 failed")


def clients_row(rows: dict, ctx, url: str, res: dict) -> None:
    r = res["clients"] = asyncio.run(clients(ctx, url))
    sp = r["aggregate_tok_s"] / r["one_tok_s"]
    row(rows, "4_clients_vs_one", f"{r['aggregate_tok_s']:.1f} tok/s ({ctx.a.clients} clients)",
        f"{r['one_tok_s']:.1f} tok/s (1 client)", sp, ">= 6x", sp >= 6,
        f"{ctx.a.client_tokens} tokens each, median TTFT {r['median_ttft_ms']:.0f} ms", **r)


async def clients(ctx, url: str) -> dict:
    a = ctx.a
    prompts = [f"{k}: " + text_of(ctx.tok, 24, seed=100 + k) for k in range(a.clients)]
    async with client(ctx, url, a.clients) as c:
        await completion(c, "warm up", 4)
        one = await completion(c, prompts[0], a.client_tokens)
        t0 = time.perf_counter()
        rs = await asyncio.gather(*(completion(c, p, a.client_tokens) for p in prompts))
        wall = time.perf_counter() - t0
    n = sum(r["tokens"] for r in rs)
    return {"one_tok_s": one["tokens"] / one["wall"], "aggregate_tok_s": n / wall, "tokens": n, "wall_s": wall,
            "median_ttft_ms": statistics.median(r["ttft"] for r in rs) * 1e3}


KV_GAUGE = re.compile(r"^(herd[:_]kv_\w+)(?:\{[^}]*\})?\s+(\S+)$", re.MULTILINE)


def kv_gauges(text: str) -> dict[str, float]:
    return {k.split(":", 1)[-1].removeprefix("herd_"): float(v) for k, v in KV_GAUGE.findall(text)}


def kv_used_bytes(g: dict[str, float]) -> float | None:
    """Bytes of KV in use, from whichever of the engine's gauges are there (names announced by the lead)."""
    for k, v in g.items():
        if "bytes" in k and "used" in k:
            return v
    used = next((v for k, v in g.items() if "blocks_used" in k), None)
    per = next((v for k, v in g.items() if "block_bytes" in k or "bytes_per_block" in k), None)
    return used * per if used is not None and per is not None else None


async def kv_peak(ctx, url: str, k: int, p: int) -> tuple[float, int]:
    """Peak KV bytes in use (the gauges, read every 50 ms) while k sessions of p prompt tokens run; and their tokens."""
    peak = 0.0
    async with client(ctx, url, k) as c:
        run = asyncio.gather(*(completion(c, f"{i}: " + text_of(ctx.tok, p, seed=200 + i), 16) for i in range(k)))
        while not run.done():
            peak = max(peak, kv_used_bytes(kv_gauges((await c.get("/metrics")).text)) or 0.0)
            await asyncio.sleep(0.05)
        rs = await run
    return peak, sum((r["prompt_tokens"] or p) + r["tokens"] for r in rs)


def kv_row(rows: dict, ctx, url: str | None) -> None:
    """Config arithmetic for the named shape; with a server (url), a live check of bytes per token from /metrics."""
    from herd.config import get_config, kv_cache_bytes_per_token

    a, small = ctx.a, kv_cache_bytes_per_token(ctx.small_args)
    need = kv_cache_bytes_per_token(get_config(a.kv_config)) * a.kv_sessions * a.kv_tokens
    pool, live = a.kv_pool_gib * 2**30, None
    how = "computed: 2 (k, v) x layers x kv heads x head dim x 2 bytes x tokens"
    try:
        g0 = kv_gauges(httpx.get(url + "/metrics", timeout=10).text) if url else {}
        if kv_used_bytes(g0) is None:
            how += f"; no live check: the server exports no KV block gauges (has: {sorted(g0) or 'none'})"
        else:  # K sessions of P tokens on the rows 3-4 server: peak reading of the gauges while they run
            k, p = 4, a.kv_live_tokens
            peak, tokens = asyncio.run(kv_peak(ctx, url, k, p))
            per_tok = (peak - kv_used_bytes(g0)) / tokens
            live = {"sessions": k, "tokens": tokens, "peak_bytes": peak, "bytes_per_token": per_tok,
                    "config_bytes_per_token": small, "overhead": per_tok / small, "gauges": g0}
            need *= max(per_tok / small, 1.0)
            how = (f"computed x live overhead {per_tok / small:.3f} ({k} sessions, {tokens} tokens on the rows 3-4 "
                   f"model: {per_tok:.0f} B/token from /metrics, config {small} B/token)")
    except Exception as e:  # noqa: BLE001 (the computed row stands; the note says what failed)
        how += f"; live check failed: {type(e).__name__}: {e}"
    row(rows, "5_kv_memory", f"{a.kv_sessions} x {a.kv_tokens} tok of {a.kv_config}: {need / 2**30:.3f} GiB",
        f"{a.kv_pool_gib:g} GiB pool", pool / need, "fits", need <= pool, how, need_bytes=need, pool_bytes=pool,
        live=live, computed=live is None)


class Ctx:
    def __init__(self, a, tmp: Path):
        from herd.config import get_config
        from herd.tokenizer import load_tokenizer

        self.a, self.tmp, self.tok = a, tmp, load_tokenizer(None)
        self.big_args, self.small_args = (get_config(c).replace(**({"n_layers": n} if n else {}))
                                          for c, n in ((a.config, a.layers), (a.agent_config, a.agent_layers)))
        src = str(Path(__file__).resolve().parents[1] / "src")
        self.env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        self.llama_why = ("--no-llama-cpp" if a.no_llama_cpp else "llama-cpp-python is not installed"
                          if find_spec("llama_cpp") is None else None if a.device == "cpu"
                          else "llama-cpp-python is built for the CPU here")
        # llama_cpp.server needs llama-cpp-python's [server] extra; herd has uvicorn, fastapi and PyYAML already
        missing = [m for m in ("sse_starlette", "starlette_context", "pydantic_settings") if not find_spec(m)]
        self.server_why = self.llama_why or (f"needs {', '.join(missing)} (pip install sse-starlette "
                                             "'starlette-context>=0.3.6,<0.4' pydantic-settings)" if missing else None)

    def prepare(self) -> None:
        a = self.a
        self.serve_help = run_cmd(self, HERD + ["serve", "--help"], "herd serve --help")
        types = () if self.llama_why else ("bf16", "q8_0")
        t = time.perf_counter()
        self.big = write_model(self, self.big_args, "big", types)
        same = (a.agent_config, a.agent_layers) == (a.config, a.layers)
        self.small = self.big if same else write_model(self, self.small_args, "small", types[:1])
        print(f"# models written in {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)


def print_table(ctx, rows: list[dict]) -> None:
    a = ctx.a
    print(f"# herd serving benchmark{' (smoke)' if a.smoke else ''}: {platform.processor() or platform.machine()}, "
          f"{a.threads} threads (herd: OMP_NUM_THREADS; llama.cpp: n_threads), torch {torch.__version__}, {a.device}")
    print(f"# rows 1-2: {shape(ctx.big_args, a.config)}; prompt {a.prompt_tokens} tok, {a.tokens} new (greedy), "
          f"best of {a.repeats}")
    kv = f" --kv-cache-gb {a.kv_cache_gb:g}" if "--kv-cache-gb" in getattr(ctx, "serve_help", "") else ""
    print(f"# rows 3-4: {shape(ctx.small_args, a.agent_config)}; herd serve (its defaults +) --max-batch {a.max_batch}"
          f" --max-seq-len {a.max_seq_len}{kv}; {a.turns} agent turns, {a.clients} clients x {a.client_tokens} tok")
    print("| row | herd | peer | ratio | goal | met | notes |")
    print("|---|---|---|---:|---|---|---|")
    for r in rows:
        met = "-" if r.get("met") is None else "yes" if r["met"] else "no"
        cells = [r["herd"], r["peer"], f"{r['ratio']:.2f}x", r["goal"], met] if r["status"] == "ok" else [r["status"]]
        print("| " + " | ".join([r["title"], *cells, *[""] * (5 - len(cells)), r["note"]]) + " |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-3.2-1b", help="rows 1-2 shape (default llama-3.2-1b)")
    ap.add_argument("--layers", type=int, help="rows 1-2: override n_layers (default: the config's)")
    ap.add_argument("--agent-config", default="llama-3.2-1b", help="rows 3-4 shape (default llama-3.2-1b)")
    ap.add_argument("--agent-layers", type=int, default=4, help="rows 3-4: n_layers (default 4)")
    for flag, default, what in (
            ("--threads", 2, "herd (OMP_NUM_THREADS) and llama.cpp threads"), ("--device", "cpu", "herd's device"),
            ("--prompt-tokens", 128, "rows 1-2 prompt tokens"), ("--tokens", 64, "rows 1-2 new tokens"),
            ("--repeats", 2, "rows 1-2: best of"), ("--system-tokens", 2000, "row 3 system prompt tokens"),
            ("--turns", 16, "row 3 turns"), ("--reply-tokens", 16, "row 3 max_tokens per turn"),
            ("--clients", 32, "row 4 concurrent clients"), ("--client-tokens", 32, "row 4 tokens per request"),
            ("--max-batch", 32, "herd serve --max-batch"), ("--max-seq-len", 4096, "herd --max-seq-len, llama n_ctx"),
            ("--kv-cache-gb", 1.0, "herd serve --kv-cache-gb (where it has it)"),
            ("--kv-config", "llama-3.2-1b", "row 5 shape"), ("--kv-sessions", 64, "row 5 sessions"),
            ("--kv-tokens", 2000, "row 5 tokens per session"), ("--kv-pool-gib", 4.0, "row 5 pool GiB"),
            ("--kv-live-tokens", 500, "row 5 live check: prompt tokens of each of 4 sessions"),
            ("--start-timeout", 300.0, "seconds a server may take to start"),
            ("--request-timeout", 600.0, "seconds per request or command")):
        ap.add_argument(flag, type=type(default), default=default, help=f"{what} (default {default})")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny-llama3-vocab, 32 tokens, 2 turns, 4 clients")
    ap.add_argument("--json", help="also write the rows and settings to this file")
    a = ap.parse_args(argv)
    if a.smoke:
        a.config = a.agent_config = "tiny-llama3-vocab"
        a.layers = a.agent_layers = None
        a.prompt_tokens, a.tokens, a.repeats, a.system_tokens, a.turns, a.reply_tokens = 16, 32, 1, 200, 2, 4
        a.clients, a.client_tokens, a.max_batch, a.max_seq_len, a.kv_live_tokens = 4, 16, 8, 2048, 64
    torch.set_num_threads(a.threads)
    rows: dict = {}
    tmp = tempfile.TemporaryDirectory(prefix="herd-serving-")
    ctx = Ctx(a, Path(tmp.name))
    try:
        guarded(rows, tuple(ROWS), lambda rows: ctx.prepare())
        if not rows:
            guarded(rows, tuple(r for r in ROWS if r[0] in "12"), rows_1_2, ctx)
            guarded(rows, tuple(r for r in ROWS if r[0] in "345"), rows_3_5, ctx)
            if rows["5_kv_memory"]["status"] == "failed":  # its server failed: the arithmetic still stands
                kv_row(rows, ctx, None)
    finally:
        for p in PROCS:
            stop(p)
        tmp.cleanup()
    out = [rows.get(rid) or {"id": rid, "title": ROWS[rid], "status": "failed", "note": "not reached"} for rid in ROWS]
    print_table(ctx, out)
    if a.json:
        Path(a.json).write_text(json.dumps({"settings": vars(a), "machine": platform.processor() or platform.machine(),
                                            "torch": torch.__version__, "rows": out}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
