"""Shared by the server tests: small random LLMs with the real Llama 3 tokenizer, a server on 127.0.0.1 in a thread,
and a model that is made to emit a scripted reply (for tool calls)."""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

from herd.api import LLM
from herd.config import get_config
from herd.model import Transformer
from herd.serve import ServerThread, create_app
from herd.tokenizer import load_tokenizer

MODEL = "tiny-llama3-vocab"  # dim 64, 2 layers, the real 128,256-id vocabulary


def make_llm(seed: int = 0, model_cls=Transformer, **shape) -> LLM:
    """An fp32 LLM with random weights in the tiny-llama3-vocab shape (fields in `shape` override it). The same
    seed gives the same weights, so one instance can serve while another is the oracle."""
    args = dataclasses.replace(get_config(MODEL), **shape)
    torch.manual_seed(seed)
    model = model_cls(args)
    model.init_weights()
    return LLM(model.float().eval(), load_tokenizer(None, n_words=args.vocab_size))


@contextlib.contextmanager
def serve(llm: LLM, **kw):
    """create_app + ServerThread on 127.0.0.1 and a free port; yields the running ServerThread (`.url`, `.ctx`)."""
    kw.setdefault("model_name", MODEL)
    kw.setdefault("max_seq_len", 512)
    app = create_app(llm, **kw)
    with ServerThread(app) as srv:
        srv.ctx = app.app.state.ctx
        yield srv


@contextlib.contextmanager
def slow_steps(engine, seconds: float):
    """Make every model call of a running engine take `seconds` longer (so a test can act while it works)."""
    real = engine.model.forward

    def forward(*a, **kw):
        time.sleep(seconds)
        return real(*a, **kw)

    engine.model.forward = forward
    try:
        yield
    finally:
        del engine.model.forward  # back to the class's method


class ScriptedModel(Transformer):
    """A Transformer whose reply is forced: the k-th generated token is script[k] (all else as usual).

    The reply starts right after the last prefilled prompt token (the last forward with more than one token), so
    the test does not need the prompt's length. One request at a time."""

    script: list[int] = []
    start: int | None = None

    def forward(self, tokens, input_pos=None, mask=None, kv_len=None, logits_idx=None):
        logits = super().forward(tokens, input_pos, mask, kv_len, logits_idx)
        pos = input_pos if input_pos.dim() == 2 else input_pos[None].expand(tokens.shape[0], -1)
        if logits_idx is not None:
            pos = pos.gather(1, logits_idx)
        if tokens.shape[1] > 1:  # a prefill: the reply starts after its last token
            self.start = int(pos[0, -1]) + 1
        for b in range(pos.shape[0]):
            for t in range(pos.shape[1]):
                k = int(pos[b, t]) + 1 - (self.start or 0)
                if self.start is not None and 0 <= k < len(self.script):
                    logits[b, t] = -1e4
                    logits[b, t, self.script[k]] = 1e4
        return logits
