"""`herd serve`'s side of the one engine (herd.engine): a thread that owns it, a bounded queue in front of it, and
delivery of its events to each request's event loop.

Reads top to bottom: the errors a submit can raise -> Handle (the caller's side: events, cancel) -> BatchEngine:
submit / cancel, then the thread's loop (take submitted and cancelled requests, one engine step, deliver).

- One thread owns the model and calls herd.engine.Engine.step(); routes only submit and read events.
- Admission, the paged KV cache, prefix caching, chunked prefill, the compiled decode step and sampling are the
  engine's, the same code `herd generate` and LLM.generate run.
- Cancellation (client gone) is a flag checked before every step: the sequence is aborted (its blocks freed)
  within one step.
"""

from __future__ import annotations

import asyncio
import collections
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator

import torch

from ..engine import Engine, Event, GenRequest


class QueueFullError(RuntimeError):
    """Every row is busy and the wait queue is full (HTTP 503 with Retry-After)."""


class EngineClosedError(RuntimeError):
    """The engine is shutting down or has stopped (HTTP 503)."""


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
        self.seq = None  # its herd.engine.Sequence once the engine thread has taken it
        self.endpoint = ""  # for metrics labels

    @property
    def prompt_tokens(self) -> int:
        return len(self.req.prompt)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens whose keys/values came from the prefix cache (known once the request is admitted)."""
        return self.seq.cached_tokens if self.seq is not None else 0

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


class BatchEngine:
    """The server's engine thread over herd.engine.Engine.

    Args:
        llm: a herd.api.LLM; its engine is replaced by this one (don't call llm.generate while serving).
        max_batch: sequences decoded together at most (the KV pool also bounds how many fit).
        max_queue: requests allowed to wait; one more gets QueueFullError.
        max_seq_len: prompt + generated tokens per request (default: min(model context, 8192)).
        prefill_chunk: prompt tokens prefilled per engine step (long prompts are split, so running rows keep going).
        queue_timeout: seconds a request may wait before it fails with error_code "queue_timeout".
        metrics: optional serve.metrics.ServerMetrics to update.
        kv_cache_gb, prefix_cache, compile: herd.engine.Engine's.
    """

    def __init__(self, llm, *, max_batch: int = 64, max_queue: int = 64, max_seq_len: int | None = None,
                 prefill_chunk: int = 512, queue_timeout: float = 600.0, metrics=None, kv_cache_gb: float | None = None,
                 prefix_cache: bool = True, compile: bool = False):
        if max_queue < 0:
            raise ValueError("max_queue >= 0 is required")
        self.core = Engine(llm.model, llm.tokenizer, max_batch=max_batch, max_seq_len=max_seq_len,
                           kv_cache_gb=kv_cache_gb, prefix_cache=prefix_cache, compile=compile,
                           prefill_chunk=prefill_chunk)
        llm.engine = self.core
        self.llm, self.model, self.tokenizer = llm, llm.model, llm.tokenizer
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.max_seq_len, self.vocab, self.device = self.core.max_seq_len, self.core.vocab, self.core.device
        self.metrics = metrics
        self._cond = threading.Condition()
        self._incoming: collections.deque[Handle] = collections.deque()
        self._handles: dict[int, Handle] = {}  # sequence id -> handle, for the ones the engine holds
        self._thread: threading.Thread | None = None
        self._closing = False
        self.draining = False  # set at shutdown: new requests are refused, running ones go on
        self.error: BaseException | None = None  # set if the loop itself died (health turns 503)

    @property
    def steps(self) -> int:
        return self.core.steps

    # ---- the caller's side ----------------------------------------------------------------------------------

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        return self.core.check_length(prompt_tokens, max_tokens)

    def submit(self, req: GenRequest, loop: asyncio.AbstractEventLoop | None = None) -> Handle:
        """Queue a request. Raises QueueFullError, EngineClosedError or ContextLengthError (nothing is queued)."""
        self.core.check(req)  # the engine's own checks, in the caller's thread: a bad request is never queued
        handle = Handle(req, loop)
        handle._engine = self
        with self._cond:
            if self._closing or self.draining or self.error is not None:
                raise EngineClosedError("the server is shutting down" if not self.error else "the engine has stopped")
            if self.waiting >= self.max_queue and self.running + self.waiting >= self.max_batch:
                raise QueueFullError(f"all {self.max_batch} generation slots are busy and {self.waiting} "
                                     f"requests are waiting (limit {self.max_queue}); retry later")
            self._incoming.append(handle)
            self._cond.notify()
        self._gauge()
        return handle

    @property
    def running(self) -> int:
        return len(self.core.running)

    @property
    def waiting(self) -> int:
        return len(self._incoming) + len(self.core.waiting)

    def warmup(self, log=None) -> None:
        """Compile the decode step for every batch-size bucket up to max_batch before serving (one line on stderr)."""
        if not self.core.compiled:
            return
        log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        buckets = self.core.warmup_buckets()
        log(f"compiling the decode step for batch sizes {', '.join(map(str, buckets))} (once per start; "
            "--no-compile skips it) ...")
        t0 = time.perf_counter()
        for b in buckets:
            self.core.warmup(b)
        log(f"decode step compiled in {time.perf_counter() - t0:.0f} s")

    def start(self) -> "BatchEngine":
        if self._thread is None:
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
        if not self.alive:  # the KV pool's memory goes back; the LLM builds a fresh engine if used again
            self.model.clear_caches()
            self.llm.drop_engine(self.core)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- the loop -------------------------------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while True:
                    out: list[tuple[Handle, Event]] = []
                    with self._cond:
                        while not (self._closing or self._incoming or self.core.has_work):
                            self._cond.wait(timeout=1.0)
                        if self._closing:
                            break
                        self._take(out)
                    self._reap(out)
                    try:
                        events = self.core.step()
                    except Exception as e:  # a failed step fails the sequences in it, never the server
                        events = []
                        for seq in list(self.core.running) + list(self.core.waiting):
                            self.core.abort(seq)
                            events.append((seq, Event(finish="error", error=f"generation failed: {e}",
                                                      error_code="engine_error")))
                    self._collect(events, out)
                    self._deliver(out)
                    self._gauge()
        except BaseException as e:  # pragma: no cover - the thread must not die silently
            self.error = e
            raise
        finally:
            out = []
            with self._cond:
                pending = list(self._incoming) + list(self._handles.values())
                self._incoming.clear()
            for seq in list(self.core.running) + list(self.core.waiting):
                self.core.abort(seq)
            self._handles.clear()
            for h in pending:
                out.append((h, Event(finish="abort", error="the server is shutting down", error_code="shutdown")))
            self._deliver(out)
            self._gauge()

    def _take(self, out: list) -> None:
        """Hand submitted requests to the engine (under the lock)."""
        while self._incoming:
            h = self._incoming.popleft()
            if h.cancelled:
                out.append((h, Event(finish="abort")))
                continue
            try:
                h.seq = self.core.add(h.req, tag=h)
            except ValueError as e:  # GenerationError; check() already ran at submit
                out.append((h, Event(finish="error", error=str(e), error_code="engine_error")))
                continue
            self._handles[h.seq.id] = h

    def _reap(self, out: list) -> None:
        """Abort cancelled requests and waiting ones past the queue timeout."""
        now = time.perf_counter()
        for sid, h in list(self._handles.items()):
            seq = h.seq
            if h.cancelled:
                self.core.abort(seq)
                del self._handles[sid]
                out.append((h, Event(finish="abort")))
            elif not seq.admitted and now - h.submitted_at > self.queue_timeout:
                self.core.abort(seq)
                del self._handles[sid]
                out.append((h, Event(finish="error", error=f"no generation slot became free within "
                                     f"{self.queue_timeout:g} s", error_code="queue_timeout")))

    def _collect(self, events: list, out: list) -> None:
        now = time.perf_counter()
        n_tokens = 0
        for seq, ev in events:
            h = self._handles.get(seq.id)
            if h is None:
                continue
            if ev.token is not None:
                n_tokens += 1
                h.n_generated += 1
                if h.first_token_at is None:
                    h.first_token_at = now
                    if self.metrics is not None:
                        self.metrics.ttft.observe(now - h.submitted_at)
                        self.metrics.cached_prompt_tokens.inc(seq.cached_tokens)
            if ev.finish is not None:
                del self._handles[seq.id]
            out.append((h, ev))
        if self.metrics is not None and n_tokens:
            self.metrics.generation_tokens.inc(n_tokens)

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
            pool = self.core.pool
            self.metrics.kv_blocks_used.set(pool.usable - pool.n_free)
            self.metrics.kv_blocks_cached.set(pool.n_cached)


def _push_all(per_handle: dict[Handle, list[Event]]) -> None:
    for h, evs in per_handle.items():
        h._push(evs)
