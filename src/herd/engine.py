"""The one generation engine: continuous batching over a paged KV cache with automatic prefix caching.

`herd generate`, `herd chat`, `LLM.generate` / `LLM.chat` and `herd serve` all run this class: the CLI and the
Python API call `step()` in their own thread until their requests finish; the server runs it on one engine thread
(herd.serve.engine). Batch 1 from the CLI is the same engine with one sequence.

Reads top to bottom: what a caller adds (GenRequest) and gets back (Event) -> one sequence's state (Sequence: its
tokens, blocks, sampler, detokenizer and stop strings) -> Engine: add / abort, then a step = admit waiting
sequences while blocks allow (reusing cached prefix blocks) -> prefill up to `prefill_chunk` prompt tokens ->
one decode step for every prefilled sequence (compiled when asked: herd.generate.compile_step, one dynamic-batch
graph on CPUs, a CUDA graph per batch-size bucket on GPUs) -> sample (herd.sampling) -> events. A sequence that needs a block when none is free
preempts the youngest running one, which goes back to the queue and later recomputes (its full blocks usually
still cached).

The stop / length policy: a stop token ends the request (reported as `stop`, no text), a stop string ends it
(the text before it is kept), `max_tokens` ends it with finish "length".
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

import psutil
import torch

from . import kv_cache
from .generate import CudaGraphStep, StopStrings, compile_step
from .kernels import BF16_KERNEL_MAX_ROWS, KERNEL_MAX_ROWS
from .kv_cache import SCRATCH, BlockPool, block_hashes
from .sampling import GenerationError, SamplingParams, apply_penalties, chosen_logprobs, sample
from .tokenizer import IncrementalDecoder

BLOCK_SIZE = 16
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # a compiled (CUDA: graph-captured) decode step per bucket


class ContextLengthError(GenerationError):
    """Prompt + max_tokens does not fit the context limit (the model's, the engine's or the KV pool's)."""


@dataclass
class GenRequest:
    """One generation job. `prompt` is token ids (BOS and chat headers already in place)."""

    prompt: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: Seq[str] = ()
    stop_token_ids: Seq[int] | None = None  # None: the tokenizer's (end_of_text, eom, eot)
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
    error_code: str | None = None  # "queue_timeout" | "engine_error" | "shutdown" | "too_long"


class Sequence:
    """Engine-side state of one request: tokens (prompt + generated), KV blocks, sampler, text and stop state."""

    def __init__(self, req: GenRequest, tokenizer, vocab: int, device, seq_id: int, tag=None):
        self.req, self.id, self.tag = req, seq_id, tag
        self.tokens = list(req.prompt)
        self.n_prompt = len(req.prompt)
        self.blocks: list[int] = []
        self.computed = 0  # tokens whose keys/values are in the cache
        self.hashes: list[bytes] = []  # chain keys of the full blocks registered so far
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache at (first) admission
        self.admitted = False
        self.n_out = 0
        self.finished: str | None = None
        self.t_added, self.t_first, self.t_end = time.perf_counter(), None, None
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

    @property
    def prefilled(self) -> bool:
        """Every token but the last (the one the next decode step feeds) is in the cache."""
        return self.computed == len(self.tokens) - 1 and self.n_out > 0

    def process(self, logits: torch.Tensor) -> int:
        """Penalties, bias and sampling for this sequence: logits (1, V) raw -> token id."""
        if self.bias is not None:
            logits = logits.clone()
            logits[0, self.bias[0]] += self.bias[1]
        if self.counts is not None:
            logits = apply_penalties(logits, self.counts, self.in_prompt, self.req.params)
        return int(sample(logits, self.req.params, self.gen)[0])

    def emit(self, tok: int, lp: float | None, top: dict | None) -> Event:
        """A sampled token -> an Event (text, stop handling); the request finishes on a stop or at its limit."""
        self.n_out += 1
        self.tokens.append(tok)
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
        elif self.n_out >= self.req.max_tokens:
            more, hit = self.cutter.feed(self.decoder.flush())
            ev.text += more + ("" if hit else self.cutter.flush())
            ev.finish, ev.stop = ("stop", self.cutter.hit) if hit else ("length", None)
        return ev


def default_kv_bytes(device: torch.device) -> int:
    """The KV pool's default size: a quarter of the memory that is free now (GPU: half of its free memory)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0] * 0.5)
    return int(psutil.virtual_memory().available * 0.25)


def decode_one(model, tokens: torch.Tensor, input_pos: torch.Tensor, table: torch.Tensor, seq_lens: torch.Tensor):
    """One decode step over a paged cache: (B, 1) tokens at (B, 1) positions -> (B, V) float32 logits."""
    return model(tokens, input_pos, pages=(table, seq_lens))[:, 0]


class Engine:
    """Continuous-batching generation for one model (not thread-safe: one thread calls add / abort / step).

    Args:
        model: a Transformer in eval mode on its device and dtype (its attention layers get paged caches).
        tokenizer: for stop tokens, detokenization and stop strings.
        max_batch: sequences decoded together at most.
        max_seq_len: prompt + generated tokens per request (default: min(model context, 8192)).
        kv_cache_gb: the KV pool's size (default: from free memory, capped at what max_batch full sequences take).
        block_size: token slots per block (a power of two).
        prefix_cache: reuse the blocks of earlier requests' identical prefixes.
        compile: torch.compile the decode step (CPU: inductor with herd's kernels; CUDA: + CUDA graphs).
        prefill_chunk: prompt tokens prefilled per step (long prompts are split so running sequences keep going).
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 64, max_seq_len: int | None = None,
                 kv_cache_gb: float | None = None, block_size: int = BLOCK_SIZE, prefix_cache: bool = True,
                 compile: bool = False, prefill_chunk: int = 512, cudagraphs: bool = True):
        ctx = model.args.max_seq_len
        self.max_seq_len = min(max_seq_len or min(ctx, 8192), ctx)
        if max_batch < 1 or self.max_seq_len < 2 or prefill_chunk < 1:
            raise ValueError("max_batch >= 1, max_seq_len >= 2 and prefill_chunk >= 1 are required")
        self.model, self.tokenizer = model, tokenizer
        self.max_batch, self.prefill_chunk, self.block_size = max_batch, prefill_chunk, block_size
        self.vocab = model.args.vocab_size
        w = model.tok_embeddings.weight
        self.device, self.dtype = w.device, w.dtype
        self.block_bytes = kv_cache.kv_bytes_per_block(model, block_size, self.dtype)
        self.max_blocks = -(-self.max_seq_len // block_size)
        want = (max_batch * self.max_blocks + 1) * self.block_bytes
        budget = kv_cache_gb * 2**30 if kv_cache_gb is not None else min(want, default_kv_bytes(self.device))
        num_blocks = int(budget // self.block_bytes)
        if num_blocks < 2:
            raise ValueError(f"a KV cache of {budget / 2**30:.3g} GiB holds no block of {self.block_bytes:,} bytes")
        self.pool = BlockPool(num_blocks, block_size, prefix_cache=prefix_cache)
        kv_cache.install(model, num_blocks, block_size)
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.steps = 0  # decode steps run
        self.preemptions = 0
        self._ids = 0
        self.compiled = compile
        # CPU: one dynamic-batch graph (+ batch 1); CUDA: a static graph, replayed as a CUDA graph, per bucket
        self._buckets = compile and self.device.type == "cuda"
        self._decode = decode_one
        if compile:
            step = compile_step(decode_one, model, dynamic=not self._buckets)
            self._decode = CudaGraphStep(step) if cudagraphs and self._buckets else step

    # ---- the caller's side ----------------------------------------------------------------------------------

    @property
    def kv_tokens(self) -> int:
        """Token slots in the pool (scratch excluded)."""
        return self.pool.usable * self.block_size

    def check_length(self, prompt_tokens: int, max_tokens: int | None) -> int:
        """The context policy -> max_tokens to use. Unset max_tokens means "the rest of the context"; an explicit
        one that does not fit, or a prompt that leaves no room, is a ContextLengthError carrying the counts."""
        limit = min(self.max_seq_len, self.kv_tokens)
        if prompt_tokens >= limit:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens, which exceeds the context limit of {limit} tokens "
                f"(prompt + generated); shorten the prompt")
        if max_tokens is None:
            return limit - prompt_tokens
        if prompt_tokens + max_tokens > limit:
            raise ContextLengthError(
                f"the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}: {prompt_tokens + max_tokens} "
                f"tokens exceed the context limit of {limit} tokens; shorten the prompt or lower max_tokens")
        return max_tokens

    def add(self, req: GenRequest, tag=None) -> Sequence:
        """Queue a request (checked here: bad input raises, nothing is queued)."""
        self.check(req)
        self._ids += 1
        seq = Sequence(req, self.tokenizer, self.vocab, self.device, self._ids, tag)
        self.waiting.append(seq)
        return seq

    def check(self, req: GenRequest) -> None:
        """GenerationError (ContextLengthError for the length policy) if the engine would refuse `req`."""
        if not req.prompt:
            raise GenerationError("empty prompt")
        if min(req.prompt) < 0 or max(req.prompt) >= self.vocab:
            raise GenerationError(f"prompt has a token id outside the vocabulary [0, {self.vocab})")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise GenerationError(f"max_tokens must be a positive integer, got {req.max_tokens!r}")
        if not 0 <= req.top_logprobs <= 20:
            raise GenerationError(f"top_logprobs must be in 0..20, got {req.top_logprobs}")
        self.check_length(len(req.prompt), req.max_tokens)

    def abort(self, seq: Sequence) -> None:
        """Stop a sequence now (waiting or running); its blocks go back to the pool."""
        if seq.finished:
            return
        seq.finished = "abort"
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        self._release(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict:
        p = self.pool
        return {"kv_blocks_total": p.usable, "kv_blocks_free": p.n_free, "kv_blocks_cached": p.n_cached,
                "kv_block_bytes": self.block_bytes, "kv_block_size": self.block_size,
                "prefix_cache_hit_tokens": p.hits, "prefix_cache_query_tokens": p.queries,
                "prefix_cache_evictions": p.evictions, "preemptions": self.preemptions, "decode_steps": self.steps}

    # ---- a step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, Event]]:
        """Admit, prefill a chunk, decode one token for every prefilled sequence -> (sequence, event) pairs."""
        out: list[tuple[Sequence, Event]] = []
        self._admit(out)
        self._prefill(out)
        self._decode_step(out)
        return out

    def _admit(self, out: list) -> None:
        while self.waiting and len(self.running) < self.max_batch:
            seq = self.waiting[0]
            # prefix cache: whole blocks of the tokens, always leaving the last token to compute (a preempted
            # sequence that comes back usually finds its own earlier blocks still cached)
            usable = (len(seq.tokens) - 1) // self.block_size
            hashes = block_hashes(seq.tokens[: usable * self.block_size], self.block_size)
            hit = self.pool.match(hashes)
            need = -(-len(seq.tokens) // self.block_size) - len(hit)
            if need > self.pool.n_free:
                self.pool.release(hit)
                if not self.running:  # even an empty pool cannot hold it (check_length makes this rare)
                    self.waiting.popleft()
                    seq.finished = "error"
                    out.append((seq, Event(finish="error", error="the request does not fit the KV cache",
                                           error_code="too_long")))
                    continue
                return
            self.waiting.popleft()
            seq.blocks = hit + [self.pool.allocate() for _ in range(need)]
            seq.hashes = hashes[: len(hit)]
            seq.computed = len(hit) * self.block_size
            if not seq.admitted:
                seq.cached_tokens = seq.computed
                seq.admitted = True
            self.running.append(seq)

    def _table(self, seqs: list[Sequence], rows: int | None = None) -> torch.Tensor:
        table = torch.full((rows or len(seqs), self.max_blocks), SCRATCH, dtype=torch.int32)
        for i, s in enumerate(seqs):
            table[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
        return table

    def _register_full_blocks(self, seq: Sequence) -> None:
        """Key every block that the cache now holds in full (prefill and decode both fill blocks)."""
        full = seq.computed // self.block_size
        if full > len(seq.hashes):
            parent = seq.hashes[-1] if seq.hashes else b""
            start = len(seq.hashes) * self.block_size
            new = block_hashes(seq.tokens[start : full * self.block_size], self.block_size, parent)
            for i, h in enumerate(new, start=len(seq.hashes)):
                self.pool.register(seq.blocks[i], h)
            seq.hashes += new

    def _prefill(self, out: list) -> None:
        """Up to prefill_chunk prompt tokens this step, oldest first, in one model call; a finished prompt samples
        its first token here and decodes from the next step on."""
        budget, plan = self.prefill_chunk, []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.prefilled:
                continue  # it decodes
            a, b = seq.computed, min(len(seq.tokens), seq.computed + budget)
            plan.append((seq, a, b))
            budget -= b - a
        if not plan:
            return
        t = max(b - a for _, a, b in plan)
        cap = self.max_blocks * self.block_size - 1
        toks = torch.zeros(len(plan), t, dtype=torch.long)
        pos = torch.zeros(len(plan), t, dtype=torch.long)
        last = torch.zeros(len(plan), 1, dtype=torch.long)
        for r, (seq, a, b) in enumerate(plan):
            toks[r, : b - a] = torch.tensor(seq.tokens[a:b])
            # padding continues the row's positions: its writes land in the row's own unused slots or in scratch
            pos[r] = torch.arange(a, a + t).clamp(max=cap)
            last[r, 0] = b - a - 1
        lens = torch.tensor([b for _, _, b in plan], dtype=torch.int32)
        dev = self.device
        pages = (self._table([s for s, _, _ in plan]).to(dev), lens.to(dev))
        logits = self.model(toks.to(dev), pos.to(dev), kv_len=int(lens.max()), logits_idx=last.to(dev),
                            pages=pages)[:, 0]
        done = []
        for r, (seq, a, b) in enumerate(plan):
            seq.computed = b
            self._register_full_blocks(seq)
            if b == len(seq.tokens):
                done.append(r)
        if done:
            self._sample([plan[r][0] for r in done], logits[done], out)

    def _grow(self, seq: Sequence) -> bool:
        """Make room for the token at position len(tokens) - 1; False if `seq` was preempted (for it, or earlier in
        this step for another sequence)."""
        if seq not in self.running:
            return False
        while len(seq.blocks) * self.block_size < len(seq.tokens):
            if self.pool.n_free == 0:
                victim = self.running[-1]  # the youngest: the least work lost
                self._preempt(victim)
                if victim is seq:
                    return False
                continue
            seq.blocks.append(self.pool.allocate())
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def _release(self, seq: Sequence) -> None:
        self.pool.release(seq.blocks)
        seq.blocks, seq.hashes = [], []

    def _bucket(self, n: int) -> int:
        if not self._buckets:
            return n
        return next((b for b in BATCH_BUCKETS if b >= n), n)

    def warmup_buckets(self) -> list[int]:
        """Batch sizes that cover every graph the compiled decode step needs up to max_batch. CPU: batch 1, then a
        dynamic graph for each range in which herd's kernels decide the same way (bf16 linears up to 4 rows, int8
        and int4 up to 16: kernels.BF16_KERNEL_MAX_ROWS, KERNEL_MAX_ROWS), so serving never stops to compile; a
        range that needs no graph of its own costs a call, not a compile. CUDA: each bucket."""
        if not self._buckets:
            firsts = (1, 2, BF16_KERNEL_MAX_ROWS + 1, KERNEL_MAX_ROWS + 1)
            return [b for b in firsts if b <= self.max_batch]
        top = self._bucket(self.max_batch)
        return [b for b in BATCH_BUCKETS if b <= top] or [top]

    @torch.inference_mode()
    def warmup(self, batch: int) -> None:
        """Run (and so compile) the decode step once for `batch` padding rows: length 0, writes to scratch."""
        tokens, pos = (torch.zeros(batch, 1, dtype=torch.long, device=self.device) for _ in range(2))  # not one
        # tensor twice: dynamo guards on aliasing, and the real steps pass two
        self._decode(self.model, tokens, pos, self._table([], batch).to(self.device),
                     torch.zeros(batch, dtype=torch.int32, device=self.device))

    def _decode_step(self, out: list) -> None:
        rows = [s for s in self.running if s.prefilled]
        rows = [s for s in rows if self._grow(s)]
        rows = [s for s in rows if s in self.running]  # a later row's growth may have preempted an earlier one
        if not rows:
            return
        n = self._bucket(len(rows))
        toks = torch.zeros(n, 1, dtype=torch.long)
        pos = torch.zeros(n, 1, dtype=torch.long)
        lens = torch.zeros(n, dtype=torch.int32)  # padding rows: length 0, writes to scratch slot 0
        for i, s in enumerate(rows):
            toks[i, 0], pos[i, 0], lens[i] = s.tokens[-1], len(s.tokens) - 1, len(s.tokens)
        dev = self.device
        logits = self._decode(self.model, toks.to(dev), pos.to(dev), self._table(rows, n).to(dev), lens.to(dev))
        for s in rows:
            s.computed += 1
            self._register_full_blocks(s)
        self.steps += 1
        self._sample(rows, logits[: len(rows)], out)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, out: list) -> None:
        """logits (len(seqs), V) raw -> one Event per sequence; finished sequences leave and free their blocks."""
        nxt = torch.empty(len(seqs), dtype=torch.long)
        simple = [i for i, s in enumerate(seqs) if s.simple_greedy]
        if simple:
            sel = logits if len(simple) == len(seqs) else logits[simple]
            nxt[simple] = sel.argmax(dim=-1).cpu()
        for i, s in enumerate(seqs):
            if not s.simple_greedy:
                nxt[i] = s.process(logits[i : i + 1])
        want = [i for i, s in enumerate(seqs) if s.req.logprobs or s.req.top_logprobs]
        lps: dict[int, tuple[float, dict | None]] = {}
        if want:
            k_max = max(seqs[i].req.top_logprobs for i in want)
            chosen, tops = chosen_logprobs(logits[want], nxt[want], k_max)
            chosen = chosen.tolist()
            if tops is not None:
                top_ids, top_lps = tops.indices.tolist(), tops.values.tolist()
            for j, i in enumerate(want):
                k = seqs[i].req.top_logprobs
                lps[i] = (chosen[j], dict(zip(top_ids[j][:k], top_lps[j][:k])) if k else None)
        now = time.perf_counter()
        for i, (s, tok) in enumerate(zip(seqs, nxt.tolist())):
            lp, top = lps.get(i, (None, None))
            ev = s.emit(tok, lp, top)
            if s.t_first is None:
                s.t_first = now
            out.append((s, ev))
            if ev.finish is not None:
                s.finished, s.t_end = ev.finish, now
                self.running.remove(s)
                self._release(s)


def run_stats(seqs: list[Sequence]) -> dict:
    """What `herd generate --stats` prints for sequences run together from submission to their end."""
    t0 = min(s.t_added for s in seqs)
    t_first = max((s.t_first for s in seqs if s.t_first is not None), default=None)
    t_end = max((s.t_end or time.perf_counter()) for s in seqs)
    n_prompt = sum(s.n_prompt for s in seqs)
    emitted = sum(s.n_out for s in seqs)
    prefill_s = (t_first or t_end) - t0
    decode_s = t_end - (t_first or t_end)
    decoded = emitted - sum(1 for s in seqs if s.n_out)  # each sequence's first token comes out of prefill
    return {"prompt_tokens": n_prompt, "generated_tokens": emitted, "batch_size": len(seqs),
            "cached_tokens": sum(s.cached_tokens for s in seqs),
            "prefill_s": round(prefill_s, 6), "decode_s": round(decode_s, 6),
            "prefill_tok_s": n_prompt / prefill_s if prefill_s > 0 else None,
            "decode_tok_s": decoded / decode_s if decoded > 0 and decode_s > 0 else None}


