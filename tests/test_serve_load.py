"""Load: 32 concurrent streaming clients all get the right (greedy) text, and together they get at least 4x the
tokens per second of a single client, because the engine decodes them as one batch.

The model is tiny-llama3-vocab widened to dim 256. At dim 64 a decode step is so cheap that per-row work (writing
a 128,256-wide logits row, streaming the token) dominates and a batch of 32 gains only ~3x on a 2-core CPU; at dim
256 the step is bound by reading the weights, which a batch shares, as it is for real models. One torch thread:
two threads on a shared 2-core machine make single-row timings erratic. Single and batched rounds alternate and the
best of each counts, so both see the same machine load."""

import asyncio
import json
import time

import httpx
import pytest
import torch

from serve_utils import MODEL, make_llm, serve

N_CLIENTS, N_TOKENS, ROUNDS = 32, 24, 2
PROMPTS = [f"Client {i}: tell me something about the number {i * 7 + 3}." for i in range(N_CLIENTS)]


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


async def stream_one(client: httpx.AsyncClient, prompt: str) -> tuple[str, int, str]:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": N_TOKENS, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    text, usage, finish = [], None, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ev = json.loads(line[6:])
                if ev["choices"]:
                    text.append(ev["choices"][0]["text"])
                    finish = ev["choices"][0]["finish_reason"] or finish
                usage = ev.get("usage") or usage
    return "".join(text), usage["completion_tokens"], finish


def test_32_concurrent_streaming_clients(one_thread):
    oracle = make_llm(dim=256)
    want = oracle.generate(PROMPTS, max_new_tokens=N_TOKENS, temperature=0)

    async def run(url):
        limits = httpx.Limits(max_connections=N_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            await stream_one(c, "warm up")
            single, batched = [], []
            for _ in range(ROUNDS):
                t0, n = time.perf_counter(), 0
                for i in range(3):  # one client, requests back to back
                    text, k, _ = await stream_one(c, PROMPTS[i])
                    assert text == want[i].text
                    n += k
                single.append(n / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                results = await asyncio.gather(*(stream_one(c, p) for p in PROMPTS))
                batched.append(sum(k for _, k, _ in results) / (time.perf_counter() - t0))
                for (text, k, finish), w in zip(results, want):
                    assert text == w.text and finish == w.finish_reason
            return max(single), max(batched)

    with serve(make_llm(dim=256), max_batch=N_CLIENTS, max_seq_len=256) as srv:
        single, batched = asyncio.run(run(srv.url))
        assert srv.ctx.engine.running == 0 and srv.ctx.engine.waiting == 0
    print(f"\n1 client: {single:.0f} tok/s; {N_CLIENTS} clients: {batched:.0f} tok/s ({batched / single:.1f}x)")
    assert batched >= 4 * single, f"{N_CLIENTS} clients got {batched:.0f} tok/s, one client {single:.0f} tok/s"
