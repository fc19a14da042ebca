"""Prometheus text exposition (format 0.0.4) for /metrics: a few counters, gauges and histograms, by hand.

Names follow vLLM's where one exists (requests running / waiting, time to first token), prefixed `herd:`.
Updates come from the engine thread and the event loop; each is one Python operation on a float or a list slot,
so no lock is needed for these monotonic counters under the GIL.
"""

from __future__ import annotations

import bisect


def _fmt(v: float) -> str:
    if v == float("inf"):
        return "+Inf"
    return repr(float(v)) if not float(v).is_integer() else str(int(v))


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = (str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for v in labels.values())
    return "{" + ",".join(f'{k}="{v}"' for k, v in zip(labels, esc)) + "}"


class Counter:
    def __init__(self, name: str, help: str):
        self.name, self.help = name, help
        self.values: dict[tuple, float] = {}

    def inc(self, n: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        self.values[key] = self.values.get(key, 0.0) + n

    def get(self, **labels) -> float:
        return self.values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        for key, v in sorted(self.values.items()) or [((), 0.0)]:
            out.append(f"{self.name}{_labels(dict(key))} {_fmt(v)}")
        return out


class Gauge:
    def __init__(self, name: str, help: str):
        self.name, self.help, self.value = name, help, 0.0

    def set(self, v: float) -> None:
        self.value = v

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_fmt(self.value)}"]


class Histogram:
    def __init__(self, name: str, help: str, buckets: list[float]):
        self.name, self.help = name, help
        self.bounds = sorted(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, v: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, v)] += 1
        self.sum += v
        self.count += 1

    def render(self) -> list[str]:
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cum = 0
        for bound, c in zip([*self.bounds, float("inf")], self.counts):
            cum += c
            out.append(f'{self.name}_bucket{{le="{_fmt(bound)}"}} {cum}')
        out += [f"{self.name}_sum {_fmt(self.sum)}", f"{self.name}_count {self.count}"]
        return out


class ServerMetrics:
    def __init__(self):
        self.running = Gauge("herd:num_requests_running", "Requests in a KV-cache row (prefilling or decoding).")
        self.waiting = Gauge("herd:num_requests_waiting", "Requests queued for a KV-cache row.")
        self.slots = Gauge("herd:max_batch", "Sequences decoded together at most.")
        self.kv_blocks_total = Gauge("herd:kv_blocks_total", "Blocks in the paged KV pool.")
        self.kv_blocks_used = Gauge("herd:kv_blocks_used", "KV blocks held by running requests.")
        self.kv_blocks_cached = Gauge("herd:kv_blocks_cached", "Free KV blocks that still hold a reusable prefix.")
        self.kv_block_bytes = Gauge("herd:kv_block_bytes", "Bytes of one KV block across all layers.")
        self.cached_prompt_tokens = Counter("herd:prefix_cache_hit_tokens_total",
                                            "Prompt tokens whose keys/values came from the prefix cache.")
        self.requests = Counter("herd:requests_total", "Finished HTTP generation requests by endpoint and outcome.")
        self.prompt_tokens = Counter("herd:prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("herd:generation_tokens_total", "Tokens generated.")
        self.rejected = Counter("herd:requests_rejected_total", "Requests refused before generation, by reason.")
        self.ttft = Histogram("herd:time_to_first_token_seconds", "From queueing to the first generated token.",
                              [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.e2e = Histogram("herd:e2e_request_latency_seconds", "From queueing to the last generated token.",
                             [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300])

    def render(self) -> str:
        parts = [self.running, self.waiting, self.slots, self.kv_blocks_total, self.kv_blocks_used,
                 self.kv_blocks_cached, self.kv_block_bytes, self.requests, self.rejected, self.prompt_tokens,
                 self.cached_prompt_tokens, self.generation_tokens, self.ttft, self.e2e]
        return "\n".join(line for m in parts for line in m.render()) + "\n"
