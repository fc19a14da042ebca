"""The Python API for applications: `llm = herd.load(path)`, then `llm.generate(...)` and `llm.chat(...)`.

    import herd
    llm = herd.load("Llama-3.1-8B-Instruct/")            # HF folder, Meta folder, .gguf file or `herd quantize` output
    print(llm.generate("The capital of France is", max_new_tokens=20, temperature=0).text)
    reply = llm.chat([{"role": "user", "content": "Hi!"}])
    print(reply.message.content)
    for delta in llm.chat(messages, stream=True):        # text deltas, safe at UTF-8 boundaries
        print(delta, end="", flush=True)

Streams are `TextStream` objects: iterate them for text deltas; afterwards `.result` holds the full Completion
(or ChatCompletion). An LLM is not thread-safe: it owns one engine (herd.engine, the one `herd serve` runs).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .chat_format import ChatFormat, Message
from .config import CONFIGS, get_config, torch_dtype
from .default_model import default_model_path
from .engine import Engine, Event, GenRequest, run_stats
from .loading import checkpoint_tokenizer, load_tokenizer, open_model
from .model import Transformer
from .sampling import GenerationError, SamplingParams
from .tokenizer import Tokenizer


@dataclass
class Completion:
    """One generated continuation. `token_ids` excludes a stop token; `stop` is the token id or string that ended it."""

    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (stop token or string) or "length"
    stop: int | str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    prompt_tokens: int = 0
    stats: dict = field(default_factory=dict)


@dataclass
class ChatCompletion:
    message: Message  # role "assistant", content, tool_calls, stop_reason (end_of_turn / end_of_message / out_of_tokens)
    completion: Completion

    @property
    def text(self) -> str:
        return self.message.content


class TextStream:
    """Iterator of text deltas; `.result` is set once it is exhausted (or closed)."""

    def __init__(self, gen: Iterator[str], finish):
        self._gen, self._finish = gen, finish
        self.result: Completion | ChatCompletion | None = None

    def __iter__(self) -> "TextStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._gen)
        except StopIteration:
            self.result = self._finish()
            raise

    def close(self) -> None:
        """Stop generating (e.g. on Ctrl-C); `.result` then holds what was generated so far."""
        self._gen.close()
        if self.result is None:
            self.result = self._finish()


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                  "frequency_penalty", "seed")


class LLM:
    """A model + tokenizer + the generation engine (herd.engine: the same one `herd serve` runs).

    Args:
        model: a Transformer (eval mode is set here).
        tokenizer: its tokenizer (n_words must equal the model's vocab_size).
        max_seq_len: cap on prompt + generated tokens (default: the model's context; the KV pool may be smaller).
        compile: torch.compile the decode step (the first call pays the compile time).
        kv_cache_gb: the KV pool's size (default: from free memory).
        prefix_cache: reuse the KV blocks of earlier prompts' identical prefixes (a chat's history, a system
            prompt); outputs are the same either way.
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_seq_len: int | None = None,
                 compile: bool = False, kv_cache_gb: float | None = None, prefix_cache: bool = True):
        if tokenizer.n_words != model.args.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} ids but the model's vocabulary is {model.args.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = ChatFormat(tokenizer)
        self._engine_kw = {"max_seq_len": max_seq_len or model.args.max_seq_len, "compile": compile,
                           "kv_cache_gb": kv_cache_gb, "prefix_cache": prefix_cache}
        self._engine: Engine | None = None
        self.last_stats: dict = {}

    @property
    def engine(self) -> Engine:
        """The engine, built on first use (the server sets its own: `llm.engine = Engine(llm.model, ...)`)."""
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer, **self._engine_kw)
        return self._engine

    @engine.setter
    def engine(self, engine: Engine) -> None:
        self._engine = engine

    def drop_engine(self, engine: Engine) -> None:
        """Forget `engine` if it is this LLM's (its caches were freed); the next call builds a new one."""
        if self._engine is engine:
            self._engine = None

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    # ---- plain completion -----------------------------------------------------------------------------------

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[str] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 256,
        stop: str | Sequence[str] | None = None,
        stop_token_ids: Sequence[int] | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        add_bos: bool = True,
        stream: bool = False,
        **sampling: Any,
    ) -> Completion | list[Completion] | TextStream:
        """Continue a prompt (text or token ids), or a batch of them (a list of texts or of id lists).

        Sampling keywords: temperature (0 = greedy; default 0.6), top_p (0.9), top_k, min_p, repetition_penalty,
        presence_penalty, frequency_penalty, seed (each prompt of a batch gets it: the same prompt gives the same
        text alone or in a batch). Stops on the tokenizer's stop tokens (end_of_text, eom, eot) unless
        `stop_token_ids` is given, and on any of the `stop` strings (cut from the text). With stream=True (single
        prompt only) returns a TextStream of text deltas.
        """
        batch, prompts = self._prompts(prompt, add_bos)
        if stream and batch:
            raise GenerationError("stream=True takes a single prompt")
        reqs = [GenRequest(p, max_new_tokens, _params(sampling), _as_list(stop),
                           None if stop_token_ids is None else list(stop_token_ids), logprobs, top_logprobs,
                           skip_special=False) for p in prompts]
        run = _Run(self, reqs)
        if stream:
            return self._stream(run, lambda results: results[0])
        results = run.drain()
        return results if batch else results[0]

    # ---- chat -----------------------------------------------------------------------------------------------

    def chat(
        self,
        messages: Sequence[dict | Message],
        *,
        tools: list | None = None,
        max_new_tokens: int = 512,
        stop: str | Sequence[str] | None = None,
        logprobs: bool = False,
        stream: bool = False,
        **sampling: Any,
    ) -> ChatCompletion | TextStream:
        """Reply to a dialog in the Llama 3.1 chat format (tools as in ChatFormat.encode_dialog_prompt).

        Returns a ChatCompletion whose message carries the parsed tool call, if any; with stream=True a
        TextStream of the reply's text deltas (special tokens skipped) whose `.result` is the ChatCompletion.
        """
        ids = self.chat_format.encode_dialog_prompt(list(messages), tools)
        run = _Run(self, [GenRequest(ids, max_new_tokens, _params(sampling), _as_list(stop), None, logprobs)])

        def finish(results: list[Completion]) -> ChatCompletion:
            c = results[0]
            tail = [c.stop] if isinstance(c.stop, int) else []
            reason = "end_of_turn" if isinstance(c.stop, str) else None
            return ChatCompletion(self.chat_format.decode_assistant_message(c.token_ids + tail, reason), c)

        if stream:
            return self._stream(run, finish)
        return finish(run.drain())

    # ---- helpers --------------------------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = True) -> list[int]:
        return self.tokenizer.encode(text, bos=bos)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def _prompts(self, prompt, add_bos: bool) -> tuple[bool, list[list[int]]]:
        if isinstance(prompt, str):
            return False, [self.encode(prompt, bos=add_bos)]
        if isinstance(prompt, torch.Tensor):
            prompt = prompt.tolist()
        prompt = list(prompt)
        if not prompt:
            raise GenerationError("empty prompt")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return False, [prompt]
        if all(isinstance(p, str) for p in prompt):
            return True, [self.encode(p, bos=add_bos) for p in prompt]
        if all(isinstance(p, (list, tuple)) for p in prompt):
            return True, [list(p) for p in prompt]
        raise GenerationError("prompt must be a string, a list of token ids, or a list of either")

    def _stream(self, run: "_Run", finish) -> TextStream:
        return TextStream(run.deltas(), lambda: finish(run.results()))


class _Run:
    """One call's sequences in the engine: steps it until they finish and collects their events as Completions."""

    def __init__(self, llm: LLM, reqs: list[GenRequest]):
        self.llm, self.engine = llm, llm.engine
        self.seqs = []
        try:
            for i, r in enumerate(reqs):
                if not r.prompt:
                    raise GenerationError(f"prompt {i} is empty")
                self.seqs.append(self.engine.add(r))
        except Exception:
            for s in self.seqs:
                self.engine.abort(s)
            raise
        self.row = {s.id: i for i, s in enumerate(self.seqs)}
        self.events: list[list[Event]] = [[] for _ in self.seqs]

    def deltas(self) -> Iterator[str]:
        for _, ev in self.row_events():
            if ev.text:
                yield ev.text

    def row_events(self) -> Iterator[tuple[int, Event]]:
        """(row, event) as tokens arrive, until every row has finished; closing it early aborts the rest."""
        try:
            while any(s.finished is None for s in self.seqs):
                for seq, ev in self.engine.step():
                    i = self.row.get(seq.id)
                    if i is not None and self.seqs[i] is seq:
                        self.events[i].append(ev)
                        yield i, ev
        finally:
            for s in self.seqs:
                self.engine.abort(s)

    def drain(self) -> list[Completion]:
        for _ in self.row_events():
            pass
        return self.results()

    def results(self) -> list[Completion]:
        stats = run_stats(self.seqs)
        self.llm.last_stats = stats
        out = []
        for seq, events in zip(self.seqs, self.events):
            toks = [e for e in events if e.token is not None]
            last = events[-1] if events else Event()
            finish = last.finish if last.finish in ("stop", "length") else "interrupted"
            ids = [e.token for e in toks if not (e is last and isinstance(last.stop, int))]
            lps = [e.logprob for e in toks] if seq.req.logprobs else None
            tops = [e.top_logprobs or {} for e in toks] if seq.req.top_logprobs else None
            text = "".join(e.text for e in events)
            if finish == "interrupted":  # closed early (Ctrl-C): keep what was generated
                text += seq.decoder.flush() + seq.cutter.flush()
            out.append(Completion(text, ids, finish, last.stop if finish == "stop" else None, lps, tops,
                                  seq.n_prompt, stats))
        return out


def _params(sampling: dict) -> SamplingParams:
    unknown = set(sampling) - set(_SAMPLING_KEYS)
    if unknown:
        raise TypeError(f"unknown generation keyword(s): {sorted(unknown)}")
    return SamplingParams(**sampling)


def _as_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


# ---- loading ------------------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    tokenizer: str | os.PathLike | Tokenizer | None = None,
    max_seq_len: int | None = None,
    compile: bool = False,
    kv_cache_gb: float | None = None,
) -> LLM:
    """Load a checkpoint (HF folder, Meta folder, .gguf file, or `herd quantize` output) as an LLM;
    no path: herd's bundled default model (a small Llama 3.1-architecture model trained on Shakespeare).

    Args:
        device: default cuda when available, else cpu.
        dtype: weights and activations, bf16 | fp16 | fp32 (default bf16; quantized checkpoints keep their format).
        tokenizer: a Tokenizer, or a file/folder; default: the checkpoint's own, else the Llama 3 vocabulary.
        max_seq_len: cap on prompt + generated tokens.
        compile: torch.compile the decode step.
        kv_cache_gb: the KV pool's size (default: from free memory).
    """
    if path is None:  # herd's bundled default model
        path = default_model_path()
    if not Path(path).exists():
        hint = " (config names give shapes only: use LLM.random(name) for random weights)" if str(path).lower() in CONFIGS else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    model = open_model(path, device=device or _default_device(), dtype=dtype)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = checkpoint_tokenizer(path, tokenizer)
    return LLM(model, tokenizer, max_seq_len=max_seq_len, compile=compile, kv_cache_gb=kv_cache_gb)


def random_llm(name: str, *, seed: int = 0, device=None, dtype=None, tokenizer: Tokenizer | None = None,
               **kw) -> LLM:
    """An LLM with random weights in the shape of a named config (for tests, demos and benchmarks)."""
    args = get_config(name)
    torch.manual_seed(seed)
    model = Transformer(args)
    model.init_weights()
    model = model.to(device=device or "cpu", dtype=torch_dtype(dtype))
    if tokenizer is None:
        tokenizer = load_tokenizer(None, n_words=args.vocab_size)
    return LLM(model, tokenizer, **kw)


LLM.random = staticmethod(random_llm)
