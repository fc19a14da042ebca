"""`herd bench`: the machine's fingerprint, then the decode/prefill, training and server benchmarks, in one table.

The fingerprint (processor, threads, torch, measured memory read bandwidth and matmul peak) is measured here; every
other number comes from a script in the repository's `benchmarks/` folder, run as a child process with `--json`, so
each measurement has one source. A child that fails becomes a failed row carrying its last output lines.

    from herd.bench import run_bench, format_report
    report = run_bench(only=["train"], preset="smoke")
    print(format_report(report))
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

STAGES = ("decode", "train", "serve")
PRESETS = ("full", "quick", "smoke")

# Extra arguments per preset and stage. "full" is each script's own defaults (the issues' settings: decode at the
# Llama-3.2-1B shape, a ~100M-parameter training step, 1..64 server clients); "quick" takes minutes on 2 cores;
# "smoke" takes seconds and only checks that everything runs.
PRESET_ARGS: dict[str, dict[str, list[str]]] = {
    "full": {"decode": [], "train": [], "serve": []},
    "quick": {
        "decode": ["--layers", "2", "--prompt", "64", "--new", "32", "--prefill", "256", "--repeats", "2"],
        "train": ["--dim", "384", "--layers", "4", "--heads", "6", "--kv-heads", "2", "--vocab", "8192", "--seq",
                  "256", "--steps", "4", "--no-compile"],
        "serve": ["--levels", "1", "8", "32", "--requests", "1"],
    },
    "smoke": {
        "decode": ["--smoke", "--vocab", "128256"],  # Llama 3's vocabulary, so llama.cpp runs too
        "train": ["--dim", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "2048", "--seq",
                  "128", "--steps", "2", "--warmup", "1", "--no-compile"],
        "serve": ["--dim", "64", "--levels", "1", "4", "--requests", "1", "--tokens", "8"],
    },
}


class BenchError(ValueError):
    """A bad request to `herd bench` (unknown stage or preset, no benchmarks folder, no CUDA device)."""


# ---- fingerprint --------------------------------------------------------------------------------------------


@dataclass
class Fingerprint:
    """The CPU is always measured (the benchmark scripts run on it); a GPU is added with device="cuda"."""

    device: str  # "cpu" or "cuda"
    processor: str  # the CPU's model name
    cpu_count: int
    threads: int  # torch intra-op threads, also given to the decode and training scripts
    torch: str
    kernels: bool  # herd's AVX-512 CPU kernels loaded
    bandwidth_gb_s: dict[str, float]  # probe name -> best GB/s
    matmul_tflops: dict[str, float]  # "bf16" / "fp32" -> best TFLOP/s of a square matmul
    buffer_mib: int
    gpu: dict | None = None  # {"name", "bandwidth_gb_s", "matmul_tflops"} on cuda


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    fn()  # warm-up: page faults, allocator, lazy kernel loads
    sync()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(device: str = "cpu", mib: int = 2048, repeats: int = 5) -> dict[str, float]:
    """Best memory bandwidth in GB/s over a `mib` buffer (make it several times the last-level cache).

    CPU: read bandwidth of torch's sum and, when herd's CPU kernels are loaded, of their multi-stream read probe.
    CUDA: a device-to-device copy (counted as bytes read + bytes written) and torch's sum.
    """
    n = mib * 2**20 // 4
    out: dict[str, float] = {}
    if device == "cuda":
        src = torch.ones(n, device="cuda")
        dst = torch.empty_like(src)
        sync = torch.cuda.synchronize
        out["cuda_copy"] = 2 * n * 4 / _best_seconds(lambda: dst.copy_(src), repeats, sync) / 1e9
        out["torch_sum"] = n * 4 / _best_seconds(lambda: src.sum(), repeats, sync) / 1e9
        del src, dst
        return out
    from .kernels import cpu_kernels

    buf = torch.ones(n)
    if cpu_kernels():
        out["herd_read"] = n * 4 / _best_seconds(lambda: torch.ops.herd.read_sum(buf), repeats) / 1e9
    out["torch_sum"] = n * 4 / _best_seconds(lambda: buf.sum(), repeats) / 1e9
    return out


def measure_matmul(device: str = "cpu", n: int | None = None) -> dict[str, float]:
    """Best bf16 and fp32 square-matmul TFLOP/s (metrics.measure_matmul_peak, the MFU denominator of training)."""
    from .train.metrics import measure_matmul_peak

    dev = torch.device(device)
    return {name: measure_matmul_peak(dev, dtype, n=n) / 1e12
            for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32))}


def fingerprint(device: str = "cpu", preset: str = "full", threads: int | None = None) -> Fingerprint:
    """Measure this machine: bandwidth over 2 GiB (256 MiB in the smoke preset) and matmul peaks, of the CPU
    and, with device="cuda", of the GPU too. Sets torch's thread count when `threads` is given."""
    if device not in ("cpu", "cuda"):
        raise BenchError(f"device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda: torch sees no CUDA device")
    if threads:
        torch.set_num_threads(threads)
    from .kernels import cpu_kernels

    # 2 GiB: several times the last-level cache (480 MiB on this project's CPUs)
    mib, repeats, n = (256, 3, 1024) if preset == "smoke" else (2048, 5, None)
    gpu = None
    if device == "cuda":
        gpu = {"name": torch.cuda.get_device_name(), "bandwidth_gb_s": measure_bandwidth("cuda", mib, repeats),
               "matmul_tflops": measure_matmul("cuda", n)}
    return Fingerprint(
        device=device, processor=cpu_name(), cpu_count=os.cpu_count() or 1, threads=torch.get_num_threads(),
        torch=torch.__version__, kernels=cpu_kernels(), bandwidth_gb_s=measure_bandwidth("cpu", mib, repeats),
        matmul_tflops=measure_matmul("cpu", n), buffer_mib=mib, gpu=gpu)


# ---- running the benchmark scripts --------------------------------------------------------------------------


def benchmarks_dir() -> Path:
    """The repository's benchmarks/ folder, next to the package source (herd installed editable)."""
    import herd

    d = Path(herd.__file__).resolve().parents[2] / "benchmarks"
    if not (d / "decode.py").is_file():
        raise BenchError(f"herd bench runs the scripts in the repository's benchmarks/ folder, not found at {d}: "
                         "install herd from a clone (pip install -e .)")
    return d


@dataclass
class StageResult:
    name: str
    command: list[str]
    returncode: int
    seconds: float
    result: dict | None  # the script's --json output
    tail: list[str]  # its last output lines (stdout and stderr together)

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.result is not None

    @property
    def error(self) -> str:
        lines = [ln.strip() for ln in self.tail if ln.strip()]
        why = lines[-1] if lines else "no output"
        return f"exit code {self.returncode}: {why}" if self.returncode else f"wrote no JSON results: {why}"


def stage_args(stage: str, preset: str, threads: int, model: str | None = None, device: str = "cpu") -> list[str]:
    args = list(PRESET_ARGS[preset][stage])
    if stage in ("decode", "train"):
        args += ["--threads", str(threads)]
    if stage == "decode" and model:
        args += ["--model", str(model)]
    if stage == "decode" and device == "cuda":  # decode and prefill on the GPU; train and serve stay on the CPU
        args += ["--device", "cuda"]
    if stage == "serve":
        args += ["--port", str(_free_port())]
    return args


def _free_port() -> int:
    """A port for the serve stage's server, free now. It is chosen below the kernel's ephemeral range, where
    bind(0) and outgoing connections take theirs, so another process is unlikely to take it before the server binds
    it; run_stage retries with a new port if that happens anyway."""
    import random

    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(50):
        port = rng.randrange(10000, max(10001, low))
        with socket.socket() as s:  # no SO_REUSEADDR: a port anyone listens on (any address) fails to bind
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PORT_RETRIES = 3  # serve stage: attempts when the server could not take its port


def _port_taken(tail: list[str]) -> bool:
    text = "\n".join(tail).lower()
    return "address already in use" in text or "did not start" in text or "cannot listen" in text


def run_stage(stage: str, args: list[str], bench_dir: Path, log: Callable[[str], None] | None = None,
              tail_lines: int = 12) -> StageResult:
    """Run benchmarks/<stage>.py with `args` + `--json`, echoing its output to `log` line by line. A stage given
    `--port` whose server could not start (its port taken in the meantime) is run again on a new port, up to
    PORT_RETRIES times; the result's tail keeps the child's own error lines."""
    result = _run_stage_once(stage, args, bench_dir, log, tail_lines)
    tried = []
    while "--port" in args and not result.ok and _port_taken(result.tail) and len(tried) < PORT_RETRIES - 1:
        i = args.index("--port") + 1
        tried.append(args[i])
        args = [*args[:i], str(_free_port()), *args[i + 1:]]
        if log:
            log(f"    (port {tried[-1]} could not be used; retrying on {args[i]})")
        result = _run_stage_once(stage, args, bench_dir, log, tail_lines)
    if tried and not result.ok:  # (first: `error` shows the child's own last line)
        last = args[args.index("--port") + 1]
        result.tail.insert(0, f"the server could not start on port {', '.join(tried)} or {last}")
    return result


def _run_stage_once(stage: str, args: list[str], bench_dir: Path, log: Callable[[str], None] | None,
                    tail_lines: int) -> StageResult:
    script = bench_dir / f"{stage}.py"
    with tempfile.TemporaryDirectory(prefix="herd-bench-") as tmp:
        out = Path(tmp) / f"{stage}.json"
        cmd = [sys.executable, str(script), *args, "--json", str(out)]
        tail: deque[str] = deque(maxlen=tail_lines)
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                                    cwd=bench_dir.parent, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        except OSError as e:
            return StageResult(stage, cmd, 127, 0.0, None, [str(e)])
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                tail.append(line.rstrip("\n"))
                if log:
                    log(f"    {line.rstrip()}")
            rc = proc.wait()
        except BaseException:  # Ctrl-C: let the child clean up (serve.py stops its server), then make sure it is gone
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        result = None
        if rc == 0 and out.is_file():
            try:
                result = json.loads(out.read_text())
            except json.JSONDecodeError as e:
                tail.append(f"invalid JSON from {script.name}: {e}")
        return StageResult(stage, cmd, rc, time.perf_counter() - t0, result, list(tail))


# ---- rows ---------------------------------------------------------------------------------------------------


@dataclass
class Row:
    bench: str  # decode | prefill | train | serve
    what: str
    value: float | None = None  # herd's result
    unit: str = "tok/s"
    baseline: str = ""  # what the ratio is against
    baseline_value: float | None = None
    limit: str = ""  # fraction of a hardware limit, in words
    error: str | None = None  # set on a failed stage

    @property
    def ratio(self) -> float | None:
        if self.value is None or not self.baseline_value:
            return None
        return self.value / self.baseline_value

    def to_dict(self) -> dict:
        return {**asdict(self), "ratio": self.ratio}


# herd's weight width and the GGUF type llama.cpp runs it against
LLAMA_CPP_TYPES = (("bf16", "BF16"), ("int8", "Q8_0"), ("int4", "Q4_0"))


def llama_cpp_pairs(rows: list[dict]) -> list[tuple[str, dict, dict]]:
    """(width, herd's fastest decode row of that width, llama.cpp's row of the matching type) where both ran."""
    by_name = {r["name"]: r for r in rows}
    pairs = []
    for width, gtype in LLAMA_CPP_TYPES:
        mine = [r for r in rows if r["name"].startswith(f"herd {width} ")]
        theirs = by_name.get(f"llama.cpp {gtype}")
        if mine and theirs:
            pairs.append((width, max(mine, key=lambda r: r["tok_s"]), theirs))
    return pairs


def decode_rows(res: dict, peak_tflops: float | None = None) -> list[Row]:
    """Decode rows from benchmarks/decode.py's JSON. bf16 rows are compared with transformers bf16; int8 with herd
    bf16 and int4 with herd int8 in the same mode (eager or compiled), the ratios the weights' sizes promise. Where
    llama.cpp ran, herd's fastest row of each width is also compared with it (bf16 / Q8_0 / Q4_0)."""
    by_name = {r["name"]: r for r in res["rows"]}
    peer = next((r for r in res["rows"] if r["name"].startswith("transformers")), None)
    rows = []
    for r in res["rows"]:
        if r is peer or r["name"].startswith("llama.cpp "):
            continue
        base_name, base = "transformers bf16", peer
        for q, lower in (("int8", "bf16"), ("int4", "int8")):
            if r["name"].startswith(f"herd {q} "):
                mode = r["name"].removeprefix(f"herd {q} ").split(",")[0]  # eager | compiled
                base = by_name.get(f"herd {lower} {mode}, herd kernels") or by_name.get(f"herd {lower} {mode}")
                base_name = f"herd {lower} {mode}"
        rows.append(Row("decode", r["name"].removeprefix("herd ") + (f" {r['note']}" if r.get("note") else ""),
                        r["tok_s"], baseline=base_name if base else "",
                        baseline_value=base["tok_s"] if base else None,
                        limit=f"{r['roofline_frac']:.1%} of memory roofline"))
    for _, best, theirs in llama_cpp_pairs(res["rows"]):
        rows.append(Row("decode", f"{best['name'].removeprefix('herd ')} vs llama.cpp", best["tok_s"],
                        baseline=theirs["name"], baseline_value=theirs["tok_s"],
                        limit=f"{best['roofline_frac']:.1%} of memory roofline (llama.cpp "
                              f"{theirs['roofline_frac']:.1%})"))
    pre = res.get("prefill_tok_s")
    if pre:
        flops = res.get("prefill_flops_per_token")
        n = res.get("prefill_tokens")
        rows.append(Row("prefill", f"bf16, {f'{n}-token prompt, ' if n else ''}time to first token", pre["herd"],
                        baseline="transformers bf16" if "transformers" in pre else "",
                        baseline_value=pre.get("transformers"),
                        limit=f"{pre['herd'] * flops / 1e12 / peak_tflops:.1%} of bf16 matmul peak"
                        if flops and peak_tflops else "-"))
    return rows


def train_rows(res: dict, peak_tflops: float) -> list[Row]:
    """Each herd engine against transformers in the same mode (eager vs eager, compiled vs compiled); MFU against
    the fingerprint's bf16 matmul peak."""
    peers = {r["compiled"]: r for r in res["rows"] if r["transformers"]}
    rows = []
    for r in res["rows"]:
        if r["transformers"]:
            continue
        peer = peers.get(r["compiled"])
        mfu = res["flops_per_token"] * r["tok_s"] / (peak_tflops * 1e12)
        rows.append(Row("train", f"{res['params'] / 1e6:.1f}M params, seq {res['shape']['seq']}, "
                                 + ("compiled" if r["compiled"] else "eager"), r["tok_s"],
                        baseline=f"transformers{' compiled' if r['compiled'] else ''}" if peer else "",
                        baseline_value=peer["tok_s"] if peer else None, limit=f"{mfu:.1%} MFU (bf16 peak)"))
    return rows


def serve_rows(res: dict) -> list[Row]:
    """Aggregate tok/s at each client count against one client."""
    levels = res["levels"]
    one = next((lv for lv in levels if lv["clients"] == 1), None)
    return [Row("serve", f"{lv['clients']} streaming clients, aggregate ({lv['per_client']:.1f} tok/s each)",
                lv["tok_s"], baseline="1 client" if one else "", baseline_value=one["tok_s"] if one else None)
            for lv in levels if lv is not one or len(levels) == 1]


def stage_rows(stage: StageResult, fp: Fingerprint) -> list[Row]:
    if not stage.ok:
        return [Row(stage.name, "FAILED", error=stage.error)]
    res = stage.result
    try:
        if stage.name == "decode":
            on_gpu = res.get("device") == "cuda" and fp.gpu  # prefill's peak: the device it ran on
            return decode_rows(res, (fp.gpu["matmul_tflops"] if on_gpu else fp.matmul_tflops).get("bf16"))
        if stage.name == "train":
            return train_rows(res, fp.matmul_tflops["bf16"])
        return serve_rows(res)
    except (KeyError, TypeError, IndexError, StopIteration) as e:  # a script's JSON layout changed
        return [Row(stage.name, "FAILED", error=f"unexpected JSON from {stage.name}.py: {type(e).__name__} {e}")]


# ---- the whole run ------------------------------------------------------------------------------------------


@dataclass
class BenchReport:
    preset: str
    fingerprint: Fingerprint
    stages: list[StageResult] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    model: str | None = None

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.stages) and not any(r.error for r in self.rows)

    def to_dict(self) -> dict:
        return {"preset": self.preset, "model": self.model, "ok": self.ok,
                "fingerprint": asdict(self.fingerprint), "rows": [r.to_dict() for r in self.rows],
                "stages": {s.name: {"ok": s.ok, "returncode": s.returncode, "seconds": s.seconds,
                                    "command": s.command, "result": s.result, "tail": s.tail} for s in self.stages}}


def parse_only(only: str | list[str] | None) -> list[str]:
    """'decode,train' -> ['decode', 'train'] in run order; unknown names are a BenchError."""
    if only is None:
        return list(STAGES)
    names = [n.strip() for n in (only.split(",") if isinstance(only, str) else only) if n.strip()]
    bad = [n for n in names if n not in STAGES]
    if bad or not names:
        hint = " (prefill rows come from the decode stage)" if "prefill" in bad else ""
        raise BenchError(f"unknown benchmark {', '.join(bad) or '(none)'}: choose from {', '.join(STAGES)}{hint}")
    return [s for s in STAGES if s in names]


def run_bench(only: str | list[str] | None = None, preset: str = "full", model: str | None = None,
              device: str = "cpu", threads: int | None = None, bench_dir: str | Path | None = None,
              log: Callable[[str], None] | None = None) -> BenchReport:
    """Fingerprint the machine, run the chosen benchmark scripts one after another, collect one row list."""
    stages = parse_only(only)
    if preset not in PRESETS:
        raise BenchError(f"preset must be one of {', '.join(PRESETS)}, got {preset!r}")
    bdir = Path(bench_dir) if bench_dir is not None else benchmarks_dir()
    missing = [f"{name}.py" for name in stages if not (bdir / f"{name}.py").is_file()]
    if missing:
        raise BenchError(f"{bdir}: no {', '.join(missing)}")
    say = log or (lambda _: None)
    say(f"[0/{len(stages)}] fingerprint: memory bandwidth and matmul peak")
    fp = fingerprint(device, preset, threads)
    report = BenchReport(preset, fp, model=model)
    for i, name in enumerate(stages, 1):
        args = stage_args(name, preset, fp.threads, model, device)
        say(f"[{i}/{len(stages)}] {name}: benchmarks/{name}.py {' '.join(args)}")
        stage = run_stage(name, args, bdir, log)
        say(f"[{i}/{len(stages)}] {name}: {'done' if stage.ok else 'FAILED'} in {stage.seconds:.0f} s")
        report.stages.append(stage)
        report.rows += stage_rows(stage, fp)
    return report


# ---- output -------------------------------------------------------------------------------------------------


def _num(v: float | None, unit: str = "") -> str:
    if v is None:
        return "-"
    text = f"{v:,.0f}" if v >= 100 else f"{v:.3g}" if v < 1 else f"{v:.1f}"
    return f"{text} {unit}".strip()


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def format_report(report: BenchReport) -> str:
    """The fingerprint as a header, then one markdown table of every row."""
    fp = report.fingerprint
    bw = ", ".join(f"{k} {v:.1f}" for k, v in fp.bandwidth_gb_s.items())
    mm = ", ".join(f"{k} {v:.2f}" for k, v in fp.matmul_tflops.items())
    lines = [f"# herd bench ({report.preset}): {fp.processor}, {fp.cpu_count} CPUs, {fp.threads} torch threads, "
             f"torch {fp.torch}, herd CPU kernels {'on' if fp.kernels else 'off'}",
             f"# CPU memory read bandwidth (GB/s, {fp.buffer_mib} MiB buffer): {bw}; matmul peak (TFLOP/s): {mm}"]
    if fp.gpu:
        lines.append(f"# GPU {fp.gpu['name']}: bandwidth (GB/s) "
                     + ", ".join(f"{k} {v:.0f}" for k, v in fp.gpu["bandwidth_gb_s"].items()) + "; matmul peak "
                     "(TFLOP/s) " + ", ".join(f"{k} {v:.0f}" for k, v in fp.gpu["matmul_tflops"].items())
                     + " (decode and prefill run on the GPU, training and the server on the CPU)")
    if report.model:
        lines.append(f"# decode model: {report.model}")
    lines += ["", "| benchmark | what | herd | baseline | ratio | of hardware limit |", "|---|---|---:|---|---:|---|"]
    for r in report.rows:
        if r.error:
            lines.append(f"| {r.bench} | **FAILED** | - | - | - | {_cell(r.error[-300:])} |")
            continue
        base = f"{r.baseline} {_num(r.baseline_value, r.unit)}" if r.baseline else "-"
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
        lines.append(f"| {r.bench} | {_cell(r.what)} | {_num(r.value, r.unit)} | {_cell(base)} | {ratio} | "
                     f"{_cell(r.limit) or '-'} |")
    return "\n".join(lines)
