"""Shared by the server tests: a server on 127.0.0.1 in a thread, a gate that holds a running engine's model calls
until the test lets them through (so a test acts while a request is surely still running, without racing a sleep),
and a model that is made to emit a scripted reply (for tool calls). The tiny random LLMs and the `oracle` / `server`
/ `client` fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import threading
import time

from conftest import TINY_LLAMA3 as MODEL
from conftest import make_llm  # noqa: F401  (imported from here by the server tests)

from herd.model import Transformer
from herd.serve import ServerThread, create_app


@contextlib.contextmanager
def serve(llm, **kw):
    """create_app + ServerThread on 127.0.0.1 and a free port; yields the running ServerThread (`.url`, `.ctx`)."""
    kw.setdefault("model_name", MODEL)
    kw.setdefault("max_seq_len", 512)
    app = create_app(llm, **kw)
    with ServerThread(app) as srv:
        srv.ctx = app.app.state.ctx
        yield srv


def wait_until(cond, timeout: float = 30.0) -> bool:
    """Poll `cond` until it holds -> True, or False after `timeout` s (a failure guard, not a speed check)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


class StepGate:
    """Counts a running engine's model calls (prefill chunks and decode steps) and lets each run only when allowed.

    allow(n): n more calls may start; step(): one more, unless one already may; open(): all may. `calls` counts
    the calls started, `parked` is true while the engine thread waits at the gate, `max_running` is the most rows the
    engine held at a call, and `handles` are the Handles submitted to the engine since the gate was put in (a server
    test cannot otherwise reach them)."""

    def __init__(self, engine, timeout: float = 60.0):
        self.engine, self.timeout = engine, timeout
        self._cond = threading.Condition()
        self._budget, self._open = 0, False
        self.calls, self.parked, self.max_running = 0, False, 0
        self.handles: list = []

    def allow(self, n: int = 1) -> None:
        with self._cond:
            self._budget += n
            self._cond.notify_all()

    def step(self) -> None:
        """Let one more call through, unless one already may (so calls go one at a time, one per step() at most)."""
        with self._cond:
            if self._budget == 0:
                self._budget = 1
                self._cond.notify_all()

    def open(self) -> None:
        with self._cond:
            self._open = True
            self._cond.notify_all()

    def wait_parked(self, calls: int | None = None) -> bool:
        """Wait until the engine waits at the gate (after `calls` calls started, if given)."""
        return wait_until(lambda: self.parked and (calls is None or self.calls >= calls), self.timeout)

    def _enter(self) -> None:  # on the engine thread, before each model call
        with self._cond:
            self.parked = True
            ok = self._cond.wait_for(lambda: self._open or self._budget > 0, self.timeout)
            self.parked = False
            if not ok:  # fails the rows in this step (the test then fails), never hangs the engine
                raise RuntimeError(f"StepGate: no model call was allowed within {self.timeout} s")
            if not self._open:
                self._budget -= 1
            self.calls += 1
            self.max_running = max(self.max_running, self.engine.running)


@contextlib.contextmanager
def gated_steps(engine, allow: int = 0):
    """Put a StepGate (first letting `allow` calls through) in front of a running engine's model; yields the gate.
    On exit the gate opens and the engine's own forward and submit are back."""
    gate = StepGate(engine)
    gate.allow(allow)
    forward, submit = engine.model.forward, engine.submit

    def gated_forward(*a, **kw):
        gate._enter()
        return forward(*a, **kw)

    def recorded_submit(*a, **kw):
        h = submit(*a, **kw)
        gate.handles.append(h)
        return h

    engine.model.forward, engine.submit = gated_forward, recorded_submit
    try:
        yield gate
    finally:
        gate.open()
        del engine.model.forward, engine.submit  # back to the classes' methods


class ScriptedModel(Transformer):
    """A Transformer whose reply is forced: the k-th generated token is script[k] (all else as usual).

    The reply starts right after the last prefilled prompt token (the last forward that picks its logits with
    logits_idx: the engine's prefill; with the prefix cache it may be a single token), so the test does not need
    the prompt's length. One request at a time."""

    script: list[int] = []
    start: int | None = None

    def forward(self, tokens, input_pos=None, mask=None, kv_len=None, logits_idx=None, pages=None):
        logits = super().forward(tokens, input_pos, mask, kv_len, logits_idx, pages)
        pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(tokens.shape[0], -1)
        if logits_idx is not None:
            pos = pos.gather(1, logits_idx)
        if logits_idx is not None:  # a prefill: the reply starts after its last token
            self.start = int(pos[0, -1]) + 1
        for b in range(pos.shape[0]):
            for t in range(pos.shape[1]):
                k = int(pos[b, t]) + 1 - (self.start or 0)
                if self.start is not None and 0 <= k < len(self.script):
                    logits[b, t] = -1e4
                    logits[b, t, self.script[k]] = 1e4
        return logits
