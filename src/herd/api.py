"""The Python API for applications: `llm = herd.load(path)`, then `llm.generate(...)` and `llm.chat(...)`.

    import herd
    llm = herd.load("Llama-3.1-8B-Instruct/")            # HF folder, Meta folder, .gguf file or `herd quantize` output
    print(llm.generate("The capital of France is", max_new_tokens=20, temperature=0).text)
    reply = llm.chat([{"role": "user", "content": "Hi!"}])
    print(reply.message.content)
    for delta in llm.chat(messages, stream=True):        # text deltas, safe at UTF-8 boundaries
        print(delta, end="", flush=True)

Streams are `TextStream` objects: iterate them for text deltas; afterwards `.result` holds the full Completion
(or ChatCompletion). An LLM is not thread-safe: it owns one KV cache.
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
from .generate import Engine, GenerationError, StopStrings
from .loading import checkpoint_tokenizer, load_tokenizer, open_model
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import IncrementalDecoder, Tokenizer


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
    """A model + tokenizer + generation engine.

    Args:
        model: a Transformer (eval mode is set here).
        tokenizer: its tokenizer (n_words must equal the model's vocab_size).
        max_seq_len: cap on prompt + generated tokens (default: the model's context).
        compile: torch.compile the decode step (first call pays the compile time).
    """

    def __init__(self, model: Transformer, tokenizer: Tokenizer, *, max_seq_len: int | None = None,
                 compile: bool = False):
        if tokenizer.n_words != model.args.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.n_words} ids but the model's vocabulary is {model.args.vocab_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.chat_format = ChatFormat(tokenizer)
        self.engine = Engine(self.model, max_seq_len=max_seq_len, compile=compile)

    @property
    def device(self) -> torch.device:
        return self.engine.device

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
        presence_penalty, frequency_penalty, seed. Stops on the tokenizer's stop tokens (end_of_text, eom, eot)
        unless `stop_token_ids` is given, and on any of the `stop` strings (cut from the text). With stream=True
        (single prompt only) returns a TextStream of text deltas.
        """
        batch, prompts = self._prompts(prompt, add_bos)
        params = _params(sampling)
        stops = _as_list(stop)
        stop_ids = self.tokenizer.stop_tokens if stop_token_ids is None else list(stop_token_ids)
        run = self._run(prompts, params, max_new_tokens, stops, stop_ids, logprobs, top_logprobs, skip_special=False)
        if stream:
            if batch:
                raise GenerationError("stream=True takes a single prompt")
            return self._stream(run, lambda results: results[0])
        results = _drain(run)
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
        params = _params(sampling)
        stop_ids = self.tokenizer.stop_tokens
        run = self._run([ids], params, max_new_tokens, _as_list(stop), stop_ids, logprobs, 0, skip_special=True)

        def finish(results: list[Completion]) -> ChatCompletion:
            c = results[0]
            tail = [c.stop] if isinstance(c.stop, int) else []
            reason = "end_of_turn" if isinstance(c.stop, str) else None
            return ChatCompletion(self.chat_format.decode_assistant_message(c.token_ids + tail, reason), c)

        if stream:
            return self._stream(run, finish)
        return finish(_drain(run))

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

    def _run(self, prompts, params, max_new_tokens, stops, stop_ids, logprobs, top_logprobs, *, skip_special):
        stop_rows: set[int] = set()  # rows ended by a stop string; the engine stops producing tokens for them
        steps = self.engine.generate(prompts, params, max_new_tokens=max_new_tokens, stop_tokens=stop_ids,
                                     logprobs=logprobs, top_logprobs=top_logprobs, stop_rows=stop_rows)
        return _Run(self, prompts, steps, stop_rows, stops, stop_ids, logprobs, top_logprobs, skip_special)

    def _stream(self, run: "_Run", finish) -> TextStream:
        return TextStream(run.deltas(), lambda: finish(run.results()))


class _Run:
    """The text side of one engine run: detokenizes each row, applies stop strings, and collects Completions."""

    def __init__(self, llm: LLM, prompts, steps, stop_rows, stops, stop_ids, logprobs, top_logprobs, skip_special):
        n = len(prompts)
        self.llm, self.prompts, self.steps, self.stop_rows = llm, prompts, steps, stop_rows
        self.logprobs, self.top_logprobs = logprobs, top_logprobs
        self.stop_set = set(stop_ids)
        self.decoders = [IncrementalDecoder(llm.tokenizer, skip_special=skip_special) for _ in range(n)]
        self.cutters = [StopStrings(stops) for _ in range(n)]
        self.ids: list[list[int]] = [[] for _ in range(n)]
        self.texts: list[list[str]] = [[] for _ in range(n)]
        self.lps: list[list[float]] = [[] for _ in range(n)]
        self.tops: list[list[dict]] = [[] for _ in range(n)]
        self.finish: list[str | None] = [None] * n
        self.stop_by: list[int | str | None] = [None] * n

    def deltas(self) -> Iterator[str]:
        for _, d in self.row_deltas():
            yield d

    def row_deltas(self) -> Iterator[tuple[int, str]]:
        """Yield (row, text delta) as tokens arrive."""
        try:
            for out in self.steps:
                for i, tok in enumerate(out.tokens):
                    if tok is None or self.finish[i] is not None:
                        continue
                    delta = self._add(i, tok, out)
                    if delta:
                        self.texts[i].append(delta)
                        yield i, delta
        finally:
            self.steps.close()

    def _add(self, i: int, tok: int, out) -> str:
        if out.logprobs is not None:
            self.lps[i].append(out.logprobs[i])
        if out.top_logprobs is not None:
            self.tops[i].append(out.top_logprobs[i])
        dec, cut = self.decoders[i], self.cutters[i]
        if out.finish[i] == "stop" and tok in self.stop_set:  # a stop token: not part of the text or the ids
            self.finish[i], self.stop_by[i] = "stop", tok
            delta, hit = cut.feed(dec.flush())
            return delta + cut.flush()
        self.ids[i].append(tok)
        delta, hit = cut.feed(dec.add(tok))
        if not hit and out.finish[i] == "length":
            self.finish[i] = "length"
            more, hit = cut.feed(dec.flush())
            delta += more + ("" if hit else cut.flush())
        if hit:
            self.finish[i], self.stop_by[i] = "stop", cut.hit
            self.stop_rows.add(i)
        return delta

    def results(self) -> list[Completion]:
        stats = dict(self.llm.engine.last_stats)
        out = []
        for i, prompt in enumerate(self.prompts):
            if self.finish[i] is None:  # closed early (Ctrl-C): keep what was generated
                self.finish[i] = "interrupted"
                self.texts[i].append(self.decoders[i].flush() + self.cutters[i].flush())
            out.append(Completion(
                "".join(self.texts[i]), self.ids[i], self.finish[i], self.stop_by[i],
                self.lps[i] if self.logprobs else None, self.tops[i] if self.top_logprobs else None,
                len(prompt), stats,
            ))
        return out


def _drain(run: _Run) -> list[Completion]:
    for _ in run.row_deltas():
        pass
    return run.results()


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
) -> LLM:
    """Load a checkpoint (HF folder, Meta folder, .gguf file, or `herd quantize` output) as an LLM;
    no path: herd's bundled default model (a small Llama 3.1-architecture model trained on Shakespeare).

    Args:
        device: default cuda when available, else cpu.
        dtype: weights and activations, bf16 | fp16 | fp32 (default bf16; quantized checkpoints keep their format).
        tokenizer: a Tokenizer, or a file/folder; default: the checkpoint's own, else the Llama 3 vocabulary.
        max_seq_len: cap on prompt + generated tokens.
        compile: torch.compile the decode step.
    """
    if path is None:  # herd's bundled default model
        path = default_model_path()
    if not Path(path).exists():
        hint = " (config names give shapes only: use LLM.random(name) for random weights)" if str(path).lower() in CONFIGS else ""
        raise FileNotFoundError(f"no checkpoint at {path}{hint}")
    model = open_model(path, device=device or _default_device(), dtype=dtype)
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = checkpoint_tokenizer(path, tokenizer)
    return LLM(model, tokenizer, max_seq_len=max_seq_len, compile=compile)


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
