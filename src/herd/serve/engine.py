"""Continuous batching: one thread owns the model and a KV cache of `max_batch` rows; every request is a row.

Reads top to bottom: what a route submits (GenRequest) and gets back (Event, Handle) -> the per-row state (_Seq)
-> BatchEngine: submit / cancel, then the loop (admit, prefill chunks, one decode step, deliver).

How rows share the model (model.py's design, nothing added to it):
- Cache slots are absolute positions, so each row runs at its own position. A request gets a free row, its prompt is
  prefilled into that row in chunks (only that row is passed to the model: every layer's KVCache buffers are pointed
  at a view of the row), and from the next step on it joins the decode batch, which covers rows 0..hi-1.
- Rows inside that window with nothing to decode (free, or still prefilling) are fed a dummy token at the
  scratch slot L (the cache has L + 1 slots); real queries sit at positions < L and attend slots 0..kv_len-1 <= L-1,
  so the scratch slot is never read.
- Each row samples with its own SamplingParams and its own torch.Generator (a seeded request gives the same tokens
  whatever else is in the batch); greedy rows without penalties are one argmax for the batch.
- Cancellation (client gone) is a flag checked before every step: the row is freed and stops within one step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..generate import ContextLengthError, StopStrings
from ..sampling import SamplingParams, apply_penalties, chosen_logprobs, sample
from ..model import KVCache
from ..tokenizer import IncrementalDecoder


class QueueFullError(RuntimeError):
    """Every row is busy and the wait queue is full (HTTP 503 with Retry-After)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


@dataclass
class GenRequest:
    """One generation job. `prompt` is token ids (BOS and chat headers already in place)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] | None = None  # None: the tokenizer's (end_of_text, eom, eot)
    logprobs: bool = False  # log-softmax of the raw logits of each chosen token
    top_logprobs: int = 0  # and of the n most likely tokens
    logit_bias: dict[int, float] | None = None
    skip_special: bool = True  # chat replies hide special tokens; raw completions show their names


@dataclass
class Event:
    """One generated token (or a terminal event with token None). A stop token ends the request
    (finish "stop", stop == token) and adds no text."""

    token: int | None = None
    text: str = ""  # text delta, after stop strings
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish: str | None = None  # "stop" | "length" | "abort" (cancelled, shut down) | "error"
    stop: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None
    error_code: str | None = None  # "queue_timeout" | "engine_error" | "shutdown"


class Handle:
    """The caller's side of a request: iterate events (async with a loop, else `iter_sync`), or cancel."""

    def __init__(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None):
        self.req = req
        self.loop = loop
        self.cancelled = False
        self.finished = False
        self.submitted_at = time.perf_counter()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.n_generated = 0
        self._buf: collections.deque[Event] = collections.deque()
        self._ready = asyncio.Event() if loop is not None else threading.Event()
        self._engine: BatchEngine | None = None
        self.endpoint = ""  # for metrics labels

    @property
    def prompt_tokens(self) -> int:
        return len(self.req.prompt)

    def _push(self, events: list[Event]) -> None:  # on the loop's thread (async) or the engine thread (sync)
        self._buf.extend(events)
        self._ready.set()

    def cancel(self) -> None:
        """Stop generating (the engine frees the row before its next step). Idempotent."""
        if self.cancelled or self.finished:
            return
        self.cancelled = True
        if self._engine is not None:
            self._engine._wake()

    async def batches(self) -> AsyncIterator[list[Event]]:
        """Yield the events that arrived since the last yield (one or more), until the finishing event."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            out = list(self._buf)
            self._buf.clear()
            if out:
                yield out
                if out[-1].finish is not None:
                    return

    def iter_sync(self, timeout: float | None = None) -> Iterator[Event]:
        """Events one by one, blocking (for handles submitted without an event loop)."""
        while True:
            if not self._ready.wait(timeout):
                raise TimeoutError("no event from the engine")
            self._ready.clear()
            while self._buf:
                ev = self._buf.popleft()
                yield ev
                if ev.finish is not None:
                    return


class _Seq:
    """Engine-side state of one request in a row."""

    def __init__(self, handle: Handle, slot: int, tokenizer, vocab: int, device):
        req = handle.req
        self.handle, self.req, self.slot = handle, req, slot
        self.prefilled = 0  # prompt tokens already in the cache
        self.pos = 0  # position of `cur` once decoding
        self.cur: int | None = None  # last sampled token, fed at the next decode step
        self.n_out = 0
        self.stop_ids = set(tokenizer.stop_tokens if req.stop_token_ids is None else req.stop_token_ids)
        self.decoder = IncrementalDecoder(tokenizer, skip_special=req.skip_special)
        self.cutter = StopStrings(list(req.stop))
        p = req.params
        self.gen = None
        if not p.greedy:
            self.gen = torch.Generator(device=device)
            self.gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, (1,)).item()))
        self.counts = self.in_prompt = None
        if p.penalized:  # (1, V): times generated, and "seen in the prompt"
            self.counts = torch.zeros(1, vocab, dtype=torch.int32, device=device)
            self.in_prompt = torch.zeros(1, vocab, dtype=torch.bool, device=device)
            self.in_prompt[0, torch.tensor(req.prompt, device=device)] = True
        self.bias = None
        if req.logit_bias:
            ids = torch.tensor(list(req.logit_bias), dtype=torch.long, device=device)
            self.bias = (ids, torch.tensor(list(req.logit_bias.values()), dtype=torch.float32, device=device))

    @property
    def simple_greedy(self) -> bool:
        return self.gen is None and self.counts is None and self.bias is None

    def process(self, logits: torch.Tensor) -> int:
        """Penalties, bias and sampling for this row: logits (1, V) raw -> token id."""
        if self.bias is not None:
            logits = logits.clone()
            logits[0, self.bias[0]] += self.bias[1]
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts, self.in_prompt, self.req.params)
        return int(sample(logits, self.req.params, self.gen)[0])

    def emit(self, tok: int, lp: float | None, top: dict | None) -> Event:
        """Turn a sampled token into an Event (text, stop handling); the request finishes on a stop or the limit."""
        self.n_out += 1
        if self.counts is not None:
            self.counts[0, tok] += 1
        ev = Event(token=tok, logprob=lp, top_logprobs=top)
        if tok in self.stop_ids:
            text, _ = self.cutter.feed(self.decoder.flush())
            ev.text, ev.finish, ev.stop = text + self.cutter.flush(), "stop", tok
            return ev
        ev.text, hit = self.cutter.feed(self.decoder.add(tok))
        if hit:
            ev.finish, ev.stop = "stop", self.cutter.hit
        elif self.n_out >= self.req.max_tokens:  # check_length made prompt + max_tokens fit the cache
            more, hit = self.cutter.feed(self.decoder.flush())
            ev.text += more + ("" if hit else self.cutter.flush())
            ev.finish, ev.stop = ("stop", self.cutter.hit) if hit else ("length", None)
        return ev


class BatchEngine:
    """Continuous-batching generation over one model.

    Args:
        llm: a herd.api.LLM; the engine takes over its model's KV caches (don't call llm.generate meanwhile).
        max_batch: rows in the KV cache = requests generating at once.
        max_queue: requests allowed to wait for a row; one more gets QueueFullError.
        max_seq_len: prompt + generated tokens per request (default: min(model context, 8192)).
        prefill_chunk: prompt tokens prefilled per engine step (long prompts are split, so running rows keep going).
        queue_timeout: seconds a request may wait for a row before it fails with error_code "queue_timeout".
        metrics: optional serve.metrics.ServerMetrics to update.
    """

    def __init__(self, llm, *, max_batch: int = 8, max_queue: int = 64, max_seq_len: int | None = None,
                 prefill_chunk: int = 512, queue_timeout: float = 600.0, metrics=None):
        model = llm.model
        ctx = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or min(ctx, 8192), ctx)
        if max_batch < 1 or max_queue < 0 or self.max_seq_len < 2 or prefill_chunk < 1:
            raise ValueError("max_batch >= 1, max_queue >= 0, max_seq_len >= 2 and prefill_chunk >= 1 are required")
        self.llm, self.model, self.tokenizer = llm, model, llm.tokenizer
        self.max_batch, self.max_queue = max_batch, max_queue
        self.prefill_chunk, self.queue_timeout = prefill_chunk, queue_timeout
        self.metrics = metrics
        self.vocab = model.args.vocab_size
        w = model.tok_embeddings.weight
        self.device, self.dtype = w.device, w.dtype
        self._scratch = self.max_seq_len  # the dummy rows' position / cache slot
        self._caches: list[tuple[KVCache, torch.Tensor, torch.Tensor]] = []
        self._window_rows: tuple[int, int] | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Handle] = collections.deque()
        self._rows: list[_Seq | None] = [None] * max_batch
        self._thread: threading.Thread | None = None
        self._closing = False
        self.draining = False  # set at shutdown: new requests are refused, running ones go on
        self.steps = 0
        self.error: BaseException | None = None  # set if the loop itself died (health turns 503)

    # ---- the caller's side ----------------------------------------------------------------------------------

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The context policy -> max_tokens to use. Unset max_tokens means "the rest of the context"; an explicit
        one that does not fit, or a prompt that leaves no room, is a ContextLengthError carrying the counts."""
        limit = self.max_seq_len
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens but this server's context limit is {limit} tokens "
                f"(prompt + generated); shorten the prompt")
        if max_tokens is None:
            return limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
                f"tokens exceed this server's context limit of {limit} tokens; shorten the prompt or lower max_tokens")
        return max_tokens

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request. Raises QueueFullError, EngineClosedError or ContextLengthError (nothing is queued)."""
        if not req.prompt:
            raise ValueError("empty prompt")
        if min(req.prompt) < 0 or max(req.prompt) >= self.vocab:
            raise ValueError(f"prompt has a token id outside the vocabulary [0, {self.vocab})")
        self.check_length(len(req.prompt), req.max_tokens)
        handle = Handle(req, loop)
        handle._engine = self
        with self._cond:
            if self._closing or self.draining or self.error is not None:
                raise EngineClosedError("the server is shutting down" if not self.error else "the engine has stopped")
            free = sum(r is None for r in self._rows) - len(self._waiting)
            if free <= 0 and len(self._waiting) >= self.max_queue:
                raise QueueFullError(f"all {self.max_batch} generation slots are busy and {len(self._waiting)} "
                                     f"requests are waiting (limit {self.max_queue}); retry later")
            self._waiting.append(handle)
            self._cond.notify()
        self._gauge()
        return handle

    @property
    def running(self) -> int:
        return sum(r is not None for r in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def start(self) -> "BatchEngine":
        if self._thread is None:
            self._alloc_cache()
            self._thread = threading.Thread(target=self._loop, name="herd-engine", daemon=True)
            self._thread.start()
        return self

    def close(self, timeout: float = 10.0) -> None:
        """Abort everything still waiting or running (finish "abort") and stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self.model.clear_caches()
        self._caches.clear()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- cache rows -----------------------------------------------------------------------------------------

    def _alloc_cache(self) -> None:
        self._caches.clear()
        for layer in self.model.layers:
            attn = layer.attention
            cache = KVCache(self.max_batch, self.max_seq_len + 1, attn.n_kv_heads, attn.head_dim, self.dtype,
                            self.device)
            attn.cache = cache
            self._caches.append((cache, cache.k, cache.v))
        self._window_rows = None

    def _window(self, start: int, stop: int) -> None:
        """Point every layer's cache at rows start..stop-1 (views: writes land in the full cache)."""
        if self._window_rows == (start, stop):
            return
        for cache, k, v in self._caches:
            cache.k, cache.v = k[start:stop], v[start:stop]
        self._window_rows = (start, stop)

    # ---- the loop -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    out: list[tuple[Handle, Event]] = []
                    with self._cond:
                        while not (self._closing or self._waiting or any(self._rows)):
                            self._cond.wait(timeout=1.0)
                        if self._closing:
                            break
                        self._reap(out)
                        self._admit()
                    try:
                        self._prefill(out)
                        self._decode(out)
                    except Exception as e:  # a failed step fails the rows in it, never the server
                        for i, seq in enumerate(self._rows):
                            if seq is not None:
                                out.append((seq.handle, Event(finish="error", error=f"generation failed: {e}",
                                                              error_code="engine_error")))
                                self._rows[i] = None
                    self._deliver(out)
                    self._gauge()
        except BaseException as e:  # pragma: no cover - the thread must not die silently
            self.error = e
            raise
        finally:
            out = []
            with self._cond:
                for h in list(self._waiting) + [s.handle for s in self._rows if s is not None]:
                    out.append((h, Event(finish="abort", error="the server is shutting down", error_code="shutdown")))
                self._waiting.clear()
                self._rows = [None] * self.max_batch
            self._deliver(out)
            self._gauge()

    def _reap(self, out: list) -> None:
        """Drop cancelled requests (waiting or running) and waiting ones past the queue timeout."""
        now = time.perf_counter()
        for h in list(self._waiting):
            if h.cancelled:
                self._waiting.remove(h)
                out.append((h, Event(finish="abort")))
            elif now - h.submitted_at > self.queue_timeout:
                self._waiting.remove(h)
                out.append((h, Event(finish="error", error=f"no generation slot became free within "
                                     f"{self.queue_timeout:g} s", error_code="queue_timeout")))
        for i, seq in enumerate(self._rows):
            if seq is not None and seq.handle.cancelled:
                self._rows[i] = None
                out.append((seq.handle, Event(finish="abort")))

    def _admit(self) -> None:
        for i in range(self.max_batch):
            if not self._waiting:
                return
            if self._rows[i] is None:  # lowest free row first keeps the decode window short
                self._rows[i] = _Seq(self._waiting.popleft(), i, self.tokenizer, self.vocab, self.device)

    def _prefill(self, out: list) -> None:
        """Up to prefill_chunk prompt tokens this step, oldest request first, in one model call when padding costs
        little (else one call per request). A finished prompt samples its first token here, and the row joins the
        decode batch in this same step."""
        budget, plan = self.prefill_chunk, []
        pending = [s for s in self._rows if s is not None and s.cur is None]
        for seq in sorted(pending, key=lambda s: s.handle.submitted_at):
            if budget <= 0:
                break
            a = seq.prefilled
            b = min(len(seq.req.prompt), a + budget)
            plan.append((seq, a, b))
            budget -= b - a
        if not plan:
            return
        lo, hi = min(s.slot for s, _, _ in plan), max(s.slot for s, _, _ in plan) + 1
        real = sum(b - a for _, a, b in plan)
        if (hi - lo) * max(b - a for _, a, b in plan) <= 2 * real:
            logits = self._prefill_rows(plan, lo, hi)
        else:
            logits = torch.cat([self._prefill_rows([p], p[0].slot, p[0].slot + 1) for p in plan])
        done = [(i, seq) for i, (seq, a, b) in enumerate(plan) if b == len(seq.req.prompt)]
        for seq, a, b in plan:
            seq.prefilled = b
        if done:
            firsts = [seq for _, seq in done]
            self._sample(firsts, logits[[i for i, _ in done]], out)
            for seq in firsts:
                seq.pos = len(seq.req.prompt)

    def _prefill_rows(self, plan: list, lo: int, hi: int) -> torch.Tensor:
        """One forward over rows lo..hi-1 -> (len(plan), V) logits at each planned chunk's last token.

        Row r of `plan` writes its chunk at positions a..b-1; everything else (padding, rows not in the plan) goes
        to the scratch slot, which no real query reads."""
        t = max(b - a for _, a, b in plan)
        toks = torch.zeros(hi - lo, t, dtype=torch.long)
        pos = torch.full((hi - lo, t), self._scratch, dtype=torch.long)
        last = torch.zeros(hi - lo, 1, dtype=torch.long)
        for seq, a, b in plan:
            r = seq.slot - lo
            toks[r, : b - a] = torch.tensor(seq.req.prompt[a:b])
            pos[r, : b - a] = torch.arange(a, b)
            last[r, 0] = b - a - 1
        self._window(lo, hi)
        kv_len = max(b for _, _, b in plan)
        dev = self.device
        logits = self.model(toks.to(dev), pos.to(dev), kv_len=kv_len, logits_idx=last.to(dev))[:, 0]
        return logits[torch.tensor([seq.slot - lo for seq, _, _ in plan], device=dev)]

    def _decode(self, out: list) -> None:
        rows = [s for s in self._rows if s is not None and s.cur is not None and s.n_out > 0]
        # rows that got their first token in _prefill this step have n_out 1 and cur set: they decode too
        if not rows:
            return
        hi = max(s.slot for s in rows) + 1
        self._window(0, hi)
        toks = torch.zeros(hi, 1, dtype=torch.long)
        pos = torch.full((hi, 1), self._scratch, dtype=torch.long)
        for s in rows:
            toks[s.slot, 0], pos[s.slot, 0] = s.cur, s.pos
        kv_len = max(s.pos for s in rows) + 1
        logits = self.model(toks.to(self.device), pos.to(self.device), kv_len=kv_len)[:, 0]  # (hi, V)
        idx = torch.tensor([s.slot for s in rows], device=self.device)
        self._sample(rows, logits.index_select(0, idx) if len(rows) < hi else logits, out)
        for s in rows:
            s.pos += 1
        self.steps += 1

    def _sample(self, seqs: list[_Seq], logits: torch.Tensor, out: list) -> None:
        """logits (len(seqs), V) raw -> one Event per row; finished rows are freed."""
        nxt = torch.empty(len(seqs), dtype=torch.long)
        simple = [i for i, s in enumerate(seqs) if s.simple_greedy]
        if simple:
            sel = logits if len(simple) == len(seqs) else logits[simple]
            nxt[simple] = sel.argmax(dim=-1).cpu()
        for i, s in enumerate(seqs):
            if not s.simple_greedy:
                nxt[i] = s.process(logits[i : i + 1])
        want_lp = [i for i, s in enumerate(seqs) if s.req.logprobs or s.req.top_logprobs]
        lps: dict[int, tuple[float, dict | None]] = {}
        if want_lp:
            k_max = max(seqs[i].req.top_logprobs for i in want_lp)
            chosen, tops = chosen_logprobs(logits[want_lp], nxt[want_lp], k_max)
            chosen = chosen.tolist()
            if tops is not None:
                top_ids, top_lps = tops.indices.tolist(), tops.values.tolist()
            for j, i in enumerate(want_lp):
                k = seqs[i].req.top_logprobs
                lps[i] = (chosen[j], dict(zip(top_ids[j][:k], top_lps[j][:k])) if k else None)
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, nxt.tolist())):
            lp, top = lps.get(i, (None, None))
            ev = s.emit(tok, lp, top)
            h = s.handle
            if h.first_token_at is None:
                h.first_token_at = now
                if self.metrics is not None:
                    self.metrics.ttft.observe(now - h.submitted_at)
            h.n_generated += 1
            out.append((h, ev))
            if ev.finish is not None:
                self._rows[s.slot] = None
                s.cur = None
            else:
                s.cur = tok
        if self.metrics is not None:
            self.metrics.generation_tokens.inc(len(seqs))

    def _deliver(self, out: list[tuple[Handle, Event]]) -> None:
        """Hand events over: one call into each event loop per step, not one per token."""
        by_loop: dict = {}
        now = time.perf_counter()
        for h, ev in out:
            if ev.finish is not None:
                h.finished, h.finished_at = True, now
                if self.metrics is not None:
                    self.metrics.requests.inc(endpoint=h.endpoint, finish=ev.finish)
                    self.metrics.e2e.observe(now - h.submitted_at)
            if h.loop is None:
                h._push([ev])
            else:
                by_loop.setdefault(h.loop, {}).setdefault(h, []).append(ev)
        for loop, per_handle in by_loop.items():
            try:
                loop.call_soon_threadsafe(_push_all, per_handle)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.running.set(self.running)
            self.metrics.waiting.set(self.waiting)


def _push_all(per_handle: dict[Handle, list[Event]]) -> None:
    for h, evs in per_handle.items():
        h._push(evs)
