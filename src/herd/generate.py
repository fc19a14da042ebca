"""What makes the engine's decode step fast, and where text stops: `compile_step` (inductor; on CPUs with herd's
kernels and a C++ wrapper), `CudaGraphStep` (a compiled step replayed as one CUDA graph per batch-size bucket), and
`StopStrings` (cutting a stream of text at the first stop string). The engine itself is herd.engine; sampling is
herd.sampling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .model import Transformer


def compile_step(fn, model: Transformer, *, freezing: bool = True, torch_cudagraphs: bool = False,
                 dynamic: bool = False):
    """torch.compile a step function (inductor). `freezing` (CPU) folds the weights as constants, which lets
    inductor prepack them; it is applied only while the compiled function runs. `torch_cudagraphs` uses torch's own
    CUDA graphs (mode="reduce-overhead"); the engine uses CudaGraphStep instead, which replays faster
    (benchmarks/decode.py compares the two). `dynamic`: one graph for every batch size >= 2 (and one for 1, which
    dynamo specializes) instead of one per shape: on a CPU each graph costs ~20-40 s of compiling."""
    import torch._inductor.config as inductor_config

    on_cpu = model.tok_embeddings.weight.device.type == "cpu"
    compiled = torch.compile(fn, dynamic=dynamic, mode="reduce-overhead" if torch_cudagraphs else None)

    def run(*args):
        # CPU: the step also runs from C++ (cpp_wrapper) rather than a Python wrapper calling ~250 kernels one by
        # one: 2.8% (int8) and 3.7% (int4) faster decode at the 1B shape, for a longer first compile (~50 s vs ~40).
        with inductor_config.patch(freezing=freezing and on_cpu, cpp_wrapper=on_cpu):
            return compiled(*args)

    return run


class CudaGraphStep:
    """A decode step replayed from a CUDA graph: one launch per token instead of hundreds.

    At batch 1 a GPU step is a few hundred small kernels; launched one by one from Python (even compiled) the GPU
    waits on the host. Each input shape (the engine's batch-size buckets) and cache storage gets its graph, captured
    after two warm-up calls (which compile the step and write the same cache slot the real step writes). A call
    copies its inputs (tokens, positions, block tables, lengths) into the graph's input tensors and replays it; the
    returned logits are the graph's own output tensor, valid until the next call. A new cache drops the graphs
    that point at the old one. torch's
    own `mode="reduce-overhead"` does this too, with more bookkeeping per call (measured in docs/generation.md).
    """

    def __init__(self, step):
        self.step = step
        self.graphs: dict = {}
        self.cache_ptr: int | None = None

    def __call__(self, model: Transformer, tokens: torch.Tensor, input_pos: torch.Tensor, *pages: torch.Tensor):
        cache = model.layers[0].attention.cache
        ptr = (cache.k_pool if hasattr(cache, "k_pool") else cache.k).data_ptr()
        if ptr != self.cache_ptr:
            self.graphs.clear()
            self.cache_ptr = ptr
        key = tuple(t.shape for t in (tokens, *pages))
        if key not in self.graphs:
            static_in = (tokens.clone(), input_pos.clone(), *(t.clone() for t in pages))
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (and compilation) off the capture, as CUDA graphs require
                for _ in range(2):
                    self.step(model, *static_in)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.step(model, *static_in)
            self.graphs[key] = (graph, static_in, out)
        graph, static_in, out = self.graphs[key]
        for dst, src in zip(static_in, (tokens, input_pos, *pages)):
            dst.copy_(src)
        graph.replay()
        return out


# ---- stop strings -------------------------------------------------------------------------------------------


class StopStrings:
    """Cuts a stream of text deltas at the first stop string, holding back any tail that could start one.

    Each stop string is matched incrementally (Knuth-Morris-Pratt): its state is the length of the longest suffix of
    the text so far that is a prefix of it, so a feed costs O(len(text) x stops) amortized, whatever the length of
    the stream or of the stops, and the held-back tail is the longest of those suffixes. Among the stop strings
    that a feed completes, the one starting first wins (ties: the smaller string). `work` counts the character steps
    taken (for tests that bound the cost)."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._fail = [_kmp_failure(s) for s in self.stops]
        self._state = [0] * len(self.stops)
        self.buf = ""
        self.hit: str | None = None
        self.work = 0

    def feed(self, text: str) -> tuple[str, bool]:
        """-> (text that is safe to emit, whether a stop string was found). After a hit, feed returns ("", True)."""
        if self.hit is not None:
            return "", True
        if not self.stops:
            return text, False
        held, best, work = len(self.buf), None, 0
        for k, stop in enumerate(self.stops):
            q, fail, n = self._state[k], self._fail[k], len(stop)
            for j, c in enumerate(text):
                while q and stop[q] != c:
                    q = fail[q - 1]
                    work += 1
                if stop[q] == c:
                    q += 1
                work += 1
                if q == n:  # its first occurrence; it starts inside the held-back tail or the new text
                    start = held + j + 1 - n
                    if best is None or (start, stop) < best:
                        best = (start, stop)
                    break
            self._state[k] = q
        self.work += work
        region = self.buf + text  # the held-back tail is shorter than the longest stop string
        if best is not None:
            i, self.hit = best
            self.buf = ""
            return region[:i], True
        cut = len(region) - max(self._state)
        out, self.buf = region[:cut], region[cut:]
        return out, False

    def flush(self) -> str:
        out, self.buf = ("" if self.hit is not None else self.buf), ""
        return out


def _kmp_failure(s: str) -> list[int]:
    """fail[i]: the length of the longest proper prefix of s[: i + 1] that is also its suffix (O(len(s)))."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail
