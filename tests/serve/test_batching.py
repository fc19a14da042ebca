"""Load: 32 concurrent streaming clients all get the right (greedy) text, and the engine decodes them as one batch:
all 32 rows at once, in about as many decode steps as one client's request takes alone, where one row at a time
would take 32 times as many.

The step counter (BatchEngine.steps) makes this a count, not a clock; the speed that batching buys (tokens per second
of 1 vs 32 clients) is measured by benchmarks/serve.py."""

import asyncio
import json

import httpx

from serve_utils import MODEL, gated_steps, make_llm, serve

N_CLIENTS, N_TOKENS = 32, 24
PROMPTS = [f"Client {i}: tell me something about the number {i * 7 + 3}." for i in range(N_CLIENTS)]


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


async def until(cond, timeout: float = 60.0) -> None:
    """Wait for `cond` without blocking the event loop (the deadline is a failure guard)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.005)


def test_32_concurrent_streaming_clients(oracle):
    want = oracle.generate(PROMPTS, max_new_tokens=N_TOKENS, temperature=0)

    async def run(url, eng):
        limits = httpx.Limits(max_connections=N_CLIENTS + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            single = []
            for i in range(3):  # one client, requests back to back
                steps = eng.steps
                text, k, _ = await stream_one(c, PROMPTS[i])
                assert text == want[i].text
                single.append(eng.steps - steps)
            # all clients at once; the gate holds the engine until every request has reached it
            with gated_steps(eng) as gate:
                tasks = [asyncio.create_task(stream_one(c, p)) for p in PROMPTS]
                await until(lambda: eng.running + eng.waiting == N_CLIENTS)
                steps = eng.steps
                gate.open()
                results = await asyncio.gather(*tasks)
            for (text, k, finish), w in zip(results, want):
                assert text == w.text and finish == w.finish_reason
                assert k == len(w.token_ids) + (w.stop is not None)
            return single, eng.steps - steps, gate.max_running

    with serve(make_llm(), max_batch=N_CLIENTS, max_seq_len=256) as srv:
        eng = srv.ctx.engine
        single, batched, rows = asyncio.run(run(srv.url, eng))
        assert eng.running == 0 and eng.waiting == 0
    assert rows == N_CLIENTS, f"the batch never held all {N_CLIENTS} requests at once (at most {rows})"
    assert all(0 < s <= N_TOKENS for s in single), single
    # one row at a time, 32 requests would take ~32 x max(single) decode steps; batched, they share each step (a
    # step or two more than one request: the first one starts before the others are prefilled)
    assert batched < 2 * max(single), f"{N_CLIENTS} clients took {batched} decode steps, one client {single}"
