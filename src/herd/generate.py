"""Token generation: KV-cache prefill and decode, sampling, stop handling, batched ragged prompts.

Reads top to bottom: the two model steps (`prefill`, `decode_one`) -> `Engine`, which owns the cache and runs the
loop -> stop strings. Sampling and log-probabilities are herd.sampling's (the server uses the same functions). Only
the engine loop talks to Python objects; the tensor functions take and return tensors and are what `torch.compile`
sees.

Ragged batches follow model.py's design: prompts are right-padded, each row has its own positions, the cache slot
of a token is its position, and the mask is key_pos <= query_pos. A row's pad slots hold garbage that is never
attended: decode writes slot p before the query at position p reads slots 0..p.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model import Transformer
from .sampling import GenerationError, SamplingParams, apply_penalties, chosen_logprobs, sample


class ContextLengthError(GenerationError):
    """Prompt + max_new_tokens does not fit the model's context (or the engine's cache limit)."""


# ---- the two model steps ------------------------------------------------------------------------------------


def prefill(model: Transformer, tokens: torch.Tensor, last: torch.Tensor):
    """tokens (B, T), right-padded prompts at positions 0..T-1; last (B, 1) index of each row's final prompt token
    -> (B, V) fp32 logits. Causal attention over the T slots is exact for every row: pads only follow real tokens."""
    return model(tokens, logits_idx=last)[:, 0]


def decode_one(model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int):
    """tokens, input_pos (B, 1) -> (B, V) fp32 logits of the next token."""
    return model(tokens, input_pos, kv_len=kv_len)[:, 0]


# ---- the engine ---------------------------------------------------------------------------------------------


@dataclass
class StepOutput:
    """One decode step for the whole batch. Rows already finished before this step have token None."""

    tokens: list[int | None]
    logprobs: list[float] | None = None
    top_logprobs: list[dict[int, float]] | None = None
    finish: list[str | None] = field(default_factory=list)  # "stop" or "length" on the row's last step


def check_context(prompt_lens: Sequence[int], max_new_tokens: int, limit: int) -> int:
    """-> the cache length needed; raises ContextLengthError with the numbers when it exceeds `limit`."""
    need = max(prompt_lens) + max_new_tokens
    if need > limit:
        longest = max(prompt_lens)
        raise ContextLengthError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {need} tokens exceeds the context "
            f"limit of {limit} tokens; shorten the prompt or lower max_new_tokens"
        )
    return need


class Engine:
    """Runs generation for one model: owns its KV cache and the (optionally compiled) prefill/decode steps.

    Args:
        model: a Transformer in eval mode, on its device and dtype.
        max_seq_len: cap on prompt + new tokens (default: the model's context).
        compile: torch.compile the decode step (inductor; `freezing` folds weights as constants, CPU only).
        cudagraphs: on CUDA, also capture the compiled step as a CUDA graph per (batch, cache length)
            (CudaGraphStep).
        min_kv_bucket: smallest attention length of the compiled step (lengths are rounded up to powers of two).
        overlap: launch each decode step before the previous step's tokens are read back (default: on a GPU).
    """

    def __init__(self, model: Transformer, *, max_seq_len: int | None = None, compile: bool = False,
                 freezing: bool = True, cudagraphs: bool = True, min_kv_bucket: int = 256,
                 overlap: bool | None = None):
        self.model = model
        self.max_seq_len = min(max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        self.compiled = compile
        self.min_kv_bucket = min_kv_bucket
        self.overlap = self.device.type != "cpu" if overlap is None else overlap
        self.last_stats: dict = {}
        self._prefill, self._decode = prefill, decode_one
        if compile:
            self._decode = compile_step(decode_one, model, freezing=freezing)
            if cudagraphs and self.device.type == "cuda":
                self._decode = CudaGraphStep(self._decode)

    @property
    def device(self) -> torch.device:
        return self.model.tok_embeddings.weight.device

    def _cache(self, batch: int, need: int) -> int:
        """Make sure a cache of at least (batch, need) slots exists; -> the number of slots attention reads.

        Eager reads exactly `need`; compiled reads a power-of-two bucket, so a new graph is traced only when a
        request outgrows the bucket (decode is recompiled per (batch, bucket) shape)."""
        kv_len = need
        if self.compiled:
            kv_len = min(self.max_seq_len, max(self.min_kv_bucket, 1 << (need - 1).bit_length()))
        cache = self.model.layers[0].attention.cache
        if cache is None or cache.k.shape[0] < batch or cache.k.shape[2] < kv_len:
            self.model.setup_caches(batch, kv_len)
        return kv_len

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | None = None,
        *,
        max_new_tokens: int = 256,
        stop_tokens: Sequence[int] = (),
        logprobs: bool = False,
        top_logprobs: int = 0,
        stop_rows: set[int] | None = None,
    ) -> Iterator[StepOutput]:
        """An iterator of one StepOutput per generated position, until every row has stopped.

        The request is checked (and the cache allocated) here, so bad input raises at the call, not later.

        A row stops on a token in `stop_tokens` (that token is reported, with finish "stop"), at max_new_tokens
        ("length"), or when the caller adds its index to `stop_rows` (e.g. a stop string matched; no further
        tokens are produced for it). Logprobs are log-softmax of the raw model logits (before penalties and
        temperature), for the chosen token and, with top_logprobs=n, the n most likely tokens.
        """
        p = params or SamplingParams()
        prompts = [list(map(int, pr)) for pr in prompts]
        vocab = self.model.args.vocab_size
        if not prompts:
            raise GenerationError("no prompts given")
        for i, pr in enumerate(prompts):
            if not pr:
                raise GenerationError(f"prompt {i} is empty")
            if min(pr) < 0 or max(pr) >= vocab:
                raise GenerationError(f"prompt {i} has a token id outside the vocabulary [0, {vocab})")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        if not 0 <= top_logprobs <= 20:
            raise GenerationError(f"top_logprobs must be in 0..20, got {top_logprobs}")
        lens = [len(pr) for pr in prompts]
        need = check_context(lens, max_new_tokens, self.max_seq_len)
        kv_len = self._cache(len(prompts), need)
        return self._steps(prompts, p, kv_len, max_new_tokens, stop_tokens, logprobs, top_logprobs,
                           stop_rows if stop_rows is not None else set())

    @torch.inference_mode()
    def _steps(self, prompts, p, kv_len, max_new_tokens, stop_tokens, logprobs, top_logprobs, stop_rows):
        lens = [len(pr) for pr in prompts]
        bsz, dev, vocab = len(prompts), self.device, self.model.args.vocab_size

        # right-pad; pad slots get written during prefill but are never attended (see the module docstring)
        tmax = max(lens)
        tokens = torch.zeros(bsz, tmax, dtype=torch.long, device=dev)
        for i, pr in enumerate(prompts):
            tokens[i, : len(pr)] = torch.tensor(pr, device=dev)
        pos = torch.tensor(lens, device=dev)
        gen = torch.Generator(device=dev)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(2**62, (1,)).item()))
        stop_set = set(stop_tokens)
        counts = in_prompt = None
        if p.penalized:
            counts = torch.zeros(bsz, vocab, dtype=torch.int32, device=dev)
            real = (torch.arange(tmax, device=dev) < pos[:, None]).to(torch.int32)  # 0 on pad slots
            in_prompt = torch.zeros_like(counts).scatter_add_(1, tokens, real) > 0
        # With overlap (a GPU), the next step is launched before this step's tokens are read back, so the GPU
        # computes step n+1 while the host waits for, checks and hands out step n (that work is wasted only if
        # every row stops at step n). On the CPU, where every op runs as it is called, a step runs only when needed.

        t0 = time.perf_counter()
        t_first, steps, emitted = None, 0, 0
        done = [False] * bsz
        try:
            logits = self._prefill(self.model, tokens, (pos - 1)[:, None])
            for step in range(max_new_tokens):
                raw = logits
                if counts is not None:
                    logits = apply_penalties(logits, counts, in_prompt, p)
                nxt = sample(logits, p, gen)
                if counts is not None:
                    counts.scatter_add_(1, nxt[:, None], torch.ones_like(nxt[:, None], dtype=counts.dtype))
                lp_t = top_t = None
                if logprobs or top_logprobs:
                    lp_t, top_t = chosen_logprobs(raw, nxt, top_logprobs)
                del raw, logits  # a CUDA-graph step reuses its output buffer: nothing may read it past here
                last = step == max_new_tokens - 1
                if self.overlap and not last:  # feed this step's tokens at their positions (prompt length + step)
                    logits = self._decode(self.model, nxt[:, None], pos[:, None], kv_len)
                    pos = pos + 1
                ids = nxt.tolist()  # the host sync of this step
                lp = lp_t.tolist() if lp_t is not None else None
                top = None
                if top_t is not None:
                    top = [dict(zip(r_i, r_v)) for r_i, r_v in zip(top_t.indices.tolist(), top_t.values.tolist())]
                if t_first is None:
                    t_first = time.perf_counter()
                out = StepOutput([None] * bsz, [0.0] * bsz if lp else None, [{}] * bsz if top else None, [None] * bsz)
                for i in range(bsz):
                    if done[i] or i in stop_rows:
                        done[i] = True
                        continue
                    out.tokens[i] = ids[i]
                    if lp:
                        out.logprobs[i] = lp[i]
                    if top:
                        out.top_logprobs[i] = top[i]
                    if ids[i] in stop_set:
                        out.finish[i], done[i] = "stop", True
                    elif last:
                        out.finish[i], done[i] = "length", True
                steps += 1
                emitted += sum(t is not None for t in out.tokens)
                yield out
                if all(done[i] or i in stop_rows for i in range(bsz)):
                    break
                if not self.overlap:
                    logits = self._decode(self.model, nxt[:, None], pos[:, None], kv_len)
                    pos = pos + 1
        finally:  # also when the consumer stops early (Ctrl-C, a stop string)
            self.last_stats = _stats(sum(lens), bsz, steps, emitted, t0, t_first, time.perf_counter())


def _stats(n_prompt: int, bsz: int, steps: int, emitted: int, t0: float, t_first: float | None, t_end: float):
    prefill_s = (t_first or t_end) - t0
    decode_s = t_end - (t_first or t_end)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": emitted,
        "batch_size": bsz,
        "prefill_s": round(prefill_s, 6),
        "decode_s": round(decode_s, 6),
        "prefill_tok_s": n_prompt / prefill_s if prefill_s > 0 else None,
        # the first token of each row comes out of prefill; decode made the rest
        "decode_tok_s": (steps - 1) * bsz / decode_s if steps > 1 and decode_s > 0 else None,
    }


def compile_step(fn, model: Transformer, *, freezing: bool = True, torch_cudagraphs: bool = False):
    """torch.compile a step function (inductor, static shapes). `freezing` (CPU) folds the weights as constants,
    which lets inductor prepack them; it is applied only while the compiled function runs. `torch_cudagraphs` uses
    torch's own CUDA graphs (mode="reduce-overhead"); the engine uses CudaGraphStep instead, which replays faster
    (benchmarks/decode.py compares the two)."""
    import torch._inductor.config as inductor_config

    on_cpu = model.tok_embeddings.weight.device.type == "cpu"
    compiled = torch.compile(fn, dynamic=False, mode="reduce-overhead" if torch_cudagraphs else None)

    def run(*args):
        # CPU: the step also runs from C++ (cpp_wrapper) rather than a Python wrapper calling ~250 kernels one by
        # one: 2.8% (int8) and 3.7% (int4) faster decode at the 1B shape, for a longer first compile (~50 s vs ~40).
        with inductor_config.patch(freezing=freezing and on_cpu, cpp_wrapper=on_cpu):
            return compiled(*args)

    return run


class CudaGraphStep:
    """A decode step replayed from a CUDA graph: one launch per token instead of hundreds.

    At batch 1 a GPU step is a few hundred small kernels; launched one by one from Python (even compiled) the GPU
    waits on the host. Each (batch, kv_len, cache storage) gets its graph, captured after two warm-up calls (which
    compile the step and write the same cache slot the real step writes). A call copies its tokens and positions
    into the graph's input tensors and replays it; the returned logits are the graph's own output tensor, valid
    until the next call. A new cache (a larger batch or bucket) drops the graphs that point at the old one. torch's
    own `mode="reduce-overhead"` does this too, with more bookkeeping per call (measured in docs/generation.md).
    """

    def __init__(self, step):
        self.step = step
        self.graphs: dict = {}
        self.cache_ptr: int | None = None

    def __call__(self, model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, kv_len: int):
        ptr = model.layers[0].attention.cache.k.data_ptr()
        if ptr != self.cache_ptr:
            self.graphs.clear()
            self.cache_ptr = ptr
        key = (tokens.shape[0], kv_len)
        if key not in self.graphs:
            static_in = (tokens.clone(), input_pos.clone())
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and compilation) off the capture, as CUDA graphs require
                for _ in range(2):
                    self.step(model, *static_in, kv_len)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.step(model, *static_in, kv_len)
            self.graphs[key] = (graph, static_in, out)
        graph, (tok, pos), out = self.graphs[key]
        tok.copy_(tokens)
        pos.copy_(input_pos)
        graph.replay()
        return out


# ---- stop strings -------------------------------------------------------------------------------------------


class StopStrings:
    """Cuts a stream of text deltas at the first stop string, holding back any tail that could start one."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.hit: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text that is safe to emit, whether a stop string was found). After a hit, feed returns ("", True)."""
        if self.hit is not None:
            return "", True
        if not self.stops:
            return text, False
        self.buf += text
        found = [(self.buf.find(s), s) for s in self.stops if s in self.buf]
        if found:
            i, self.hit = min(found)
            out, self.buf = self.buf[:i], ""
            return out, True
        keep = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop string
            for n in range(min(len(s) - 1, len(self.buf)), keep, -1):
                if self.buf.endswith(s[:n]):
                    keep = n
                    break
        cut = len(self.buf) - keep
        out, self.buf = self.buf[:cut], self.buf[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = ("" if self.hit is not None else self.buf), ""
        return out
