"""Server throughput: 1..64 concurrent streaming clients against `herd serve`, with the single-client baseline.

The server runs in its own process (this script, with --serve), so the clients' Python does not compete with it for
the GIL. Each client streams `--requests` greedy /v1/completions requests of `--tokens` tokens back to back. For
each level: aggregate tok/s (all clients), per-client tok/s, speedup over one client, and the median time to first
token. Reference rows, in the same run: herd.api LLM.generate of one prompt (no HTTP: the server's overhead at one
client) and of 32 prompts as one static batch (what batching can give without a server).

    .venv/bin/python benchmarks/serve.py                        # tiny-llama3-vocab widened to dim 256, fp32
    .venv/bin/python benchmarks/serve.py --dim 64 --levels 1 8 32   # the unwidened tiny model
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1] / "src")  # see benchmarks/decode.py

import argparse  # noqa: E402
import asyncio  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

MODEL = "tiny-llama3-vocab"


def build_llm(args):
    from herd.api import LLM
    from herd.config import get_config
    from herd.model import Transformer
    from herd.tokenizer import load_tokenizer

    cfg = dataclasses.replace(get_config(MODEL), dim=args.dim, n_layers=args.layers)
    torch.manual_seed(0)
    model = Transformer(cfg)
    model.init_weights()
    return LLM(model.float().eval(), load_tokenizer(None, n_words=cfg.vocab_size))


def serve_main(args) -> None:
    from herd.serve import run

    torch.set_num_threads(args.threads)
    run(build_llm(args), port=args.port, model_name=MODEL, max_batch=args.max_batch, max_queue=1024,
        max_seq_len=args.max_seq_len, log_level="warning")


async def stream_one(client, prompt: str, tokens: int) -> tuple[int, float]:
    """-> (completion tokens, seconds to the first text)."""
    body = {"model": MODEL, "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0, first, n = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            ev = json.loads(line[6:])
            if ev["choices"] and ev["choices"][0]["text"] and first is None:
                first = time.perf_counter() - t0
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    return n, first or 0.0


async def level(url: str, clients: int, requests: int, tokens: int) -> dict:
    import httpx

    async def one_client(c, k):
        out = []
        for j in range(requests):
            out.append(await stream_one(c, f"Client {k}, request {j}: tell me about the number {k * 31 + j}.", tokens))
        return out

    limits = httpx.Limits(max_connections=clients + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        await stream_one(c, "warm up", 4)
        t0 = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(one_client(c, k) for k in range(clients))) for r in rs]
        wall = time.perf_counter() - t0
    n = sum(k for k, _ in results)
    return {"clients": clients, "tokens": n, "wall_s": wall, "tok_s": n / wall, "per_client": n / wall / clients,
            "ttft_ms": statistics.median(t for _, t in results) * 1e3}


def reference(args) -> list[tuple[str, float]]:
    """herd.api without a server: one prompt, and 32 prompts as one static batch."""
    torch.set_num_threads(args.threads)
    llm = build_llm(args)
    prompts = [f"Client {k}, request 0: tell me about the number {k * 31}." for k in range(32)]
    out = []
    for name, p in (("LLM.generate, 1 prompt (no HTTP)", prompts[0]), ("LLM.generate, 32 prompts batched", prompts)):
        llm.generate(p, max_new_tokens=4, temperature=0)
        best = float("inf")
        for _ in range(2):
            t = time.perf_counter()
            res = llm.generate(p, max_new_tokens=args.tokens, temperature=0)
            best = min(best, time.perf_counter() - t)
        n = sum(len(r.token_ids) + (r.stop is not None) for r in (res if isinstance(res, list) else [res]))
        out.append((name, n / best))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    ap.add_argument("--requests", type=int, default=2, help="requests per client, back to back (default 2)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per request (default 32)")
    ap.add_argument("--dim", type=int, default=256, help="model width (default 256; tiny-llama3-vocab is 64)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server (default 1)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-seq-len", type=int, default=512)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--json", help="also write the results (levels, speedups, reference rows) to this file")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        return serve_main(args)

    import httpx

    cmd = [sys.executable, __file__, "--serve", "--port", str(args.port), "--dim", str(args.dim), "--layers",
           str(args.layers), "--threads", str(args.threads), "--max-batch", str(args.max_batch), "--max-seq-len",
           str(args.max_seq_len)]
    server = subprocess.Popen(cmd, stderr=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        rows = [asyncio.run(level(url, c, args.requests, args.tokens)) for c in args.levels]
    finally:
        server.terminate()
        server.wait(30)
    refs = reference(args)

    print(f"# herd serve throughput: {MODEL} widened to dim {args.dim}, {args.layers} layers, fp32, random weights; "
          f"{args.tokens} tokens x {args.requests} requests per client; server max_batch {args.max_batch}, "
          f"{args.threads} torch thread(s); {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print("| clients | tokens | wall s | aggregate tok/s | per client tok/s | vs 1 client | median TTFT ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    base = rows[0]["tok_s"] if rows[0]["clients"] == 1 else None
    for r in rows:
        speed = f"{r['tok_s'] / base:.1f}x" if base else "-"
        print(f"| {r['clients']} | {r['tokens']} | {r['wall_s']:.2f} | {r['tok_s']:.0f} | {r['per_client']:.1f} | "
              f"{speed} | {r['ttft_ms']:.0f} |")
    for name, tps in refs:
        print(f"| {name} | | | {tps:.0f} | | {tps / base:.1f}x |  |" if base else f"| {name} | | | {tps:.0f} | | | |")
    if args.json:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}"
        res = {"machine": machine, "model": MODEL, "dim": args.dim, "layers": args.layers, "tokens": args.tokens,
               "requests": args.requests, "server_threads": args.threads, "max_batch": args.max_batch,
               "levels": [{**r, "vs_one_client": r["tok_s"] / base if base else None} for r in rows],
               "references": [{"name": n, "tok_s": t, "vs_one_client": t / base if base else None} for n, t in refs]}
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
