"""Decode and prefill speed of herd vs transformers on the same random weights, against the memory roofline.

Batch-1 decode reads every weight once per token, so its ceiling is (read bandwidth) / (bytes read per token).
This script measures the bandwidth first, then tok/s and the fraction of that roofline for: herd bf16 (eager, with
and without herd's CPU kernels), transformers bf16, herd int8 and int4, herd under torch.compile, the prefill of a
long prompt, and llama.cpp (llama-cpp-python) on the same weights written as GGUF BF16, Q8_0 and Q4_0. Timings are
the best of --repeats runs (other work on the machine only slows runs down).

    .venv/bin/python benchmarks/decode.py                      # the issue's setting: Llama-3.2-1B shape, 2 threads
    .venv/bin/python benchmarks/decode.py --smoke              # seconds: 2-layer 256-dim model, short prompts
    .venv/bin/python benchmarks/decode.py --layers 4 --compile # fewer layers (the head stays full size), + compile
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/tokenize.py would shadow the standard library's tokenize (imported by torch) when this folder is
# sys.path[0]; put the package source there instead.
sys.path[0] = str(Path(__file__).resolve().parents[1] / "src")

import argparse
import copy
import gc
import json
import platform
import tempfile
import time

import torch

from herd.bench import LLAMA_CPP_TYPES, llama_cpp_pairs, measure_bandwidth  # noqa: E402
from herd.checkpoint import meta_to_hf  # noqa: E402
from herd.config import get_config, kv_cache_bytes_per_token  # noqa: E402
from herd.engine import Engine, GenRequest, decode_one, run_stats  # noqa: E402
from herd.generate import compile_step  # noqa: E402
from herd.kernels import cpu_kernels, restore_linears, use_cpu_kernels  # noqa: E402
from herd.loading import load_model  # noqa: E402
from herd.model import Transformer  # noqa: E402
from herd.quantize import quantize_model, weight_bytes_per_token  # noqa: E402
from herd.sampling import SamplingParams  # noqa: E402

GREEDY = SamplingParams(temperature=0)


DEVICE = {"name": "cpu"}


def _sync() -> None:
    if DEVICE["name"] == "cuda":
        torch.cuda.synchronize()


def _timed(fn) -> float:
    _wait_quiet()
    _sync()
    t = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t


# --gate: before each timed run, wait (up to --gate-timeout s) until a quick read probe reaches this many GB/s, so
# runs on a shared machine are taken while nobody else is streaming memory. Off (0) by default.
GATE = {"gb_s": 0.0, "timeout": 600.0, "buf": None}


def _wait_quiet() -> None:
    if GATE["gb_s"] <= 0:
        return
    if GATE["buf"] is None:
        GATE["buf"] = torch.ones(2**28, dtype=torch.float32)  # 1 GiB, larger than the caches
    buf, t0 = GATE["buf"], time.perf_counter()
    while time.perf_counter() - t0 < GATE["timeout"]:
        t = time.perf_counter()
        buf.sum()
        if buf.numel() * 4 / (time.perf_counter() - t) / 1e9 >= GATE["gb_s"]:
            return
        time.sleep(2)


class _NoText:
    """The engine's tokenizer here: no stop tokens, no text (only token ids and timings are measured)."""

    stop_tokens = ()
    special_tokens: dict = {}
    n_words = 0

    def token_bytes(self, i):
        return b""

    def is_special(self, i):
        return False


def make_engine(model, **kw) -> Engine:
    """herd's engine (the one `herd generate` and `herd serve` run), prefix cache off: every repeat recomputes its
    prompt, as a new prompt would."""
    return Engine(model, _NoText(), max_batch=1, prefix_cache=False, **kw)


def generate(engine: Engine, prompt: list[int], new: int) -> dict:
    seq = engine.add(GenRequest(list(prompt), new, GREEDY, stop_token_ids=[]))
    while seq.finished is None:
        engine.step()
    return run_stats([seq])


def herd_decode(model, prompt: list[int], new: int, repeats: int, engine: Engine | None = None) -> dict:
    """Best decode tok/s (tokens after the first / decode time) and prefill tok/s of greedy generation."""
    engine = engine or make_engine(model)
    best = None
    for _ in range(repeats):
        _wait_quiet()
        s = generate(engine, prompt, new)
        if best is None or s["decode_tok_s"] > best["decode_tok_s"]:
            best = s
    return best


def compiled_engine(model, prompt: list[int], cudagraphs: bool | str = True) -> tuple[Engine, float]:
    """An engine whose decode step goes through torch.compile; -> (engine, seconds its first call took to compile).
    cudagraphs (CUDA): True = herd's CudaGraphStep, False = none, "torch" = torch.compile's mode="reduce-overhead"."""
    engine = make_engine(model, compile=True, cudagraphs=cudagraphs is True)
    if cudagraphs == "torch":
        engine._decode = compile_step(decode_one, model, torch_cudagraphs=True)
    t0 = time.perf_counter()
    generate(engine, prompt, 3)
    return engine, time.perf_counter() - t0


@torch.inference_mode()
def step_alone(engine: Engine, prompt_len: int, new: int, n: int = 64) -> float:
    """Steps/s of the (compiled) decode step called back to back with no host sync: the engine loop's ceiling."""
    model, dev = engine.model, engine.device
    n_blocks = min(engine.max_blocks, engine.pool.usable)
    table = torch.zeros(1, engine.max_blocks, dtype=torch.int32)
    table[0, :n_blocks] = torch.arange(1, n_blocks + 1)
    args = (torch.zeros(1, 1, dtype=torch.long, device=dev), torch.full((1, 1), prompt_len, device=dev),
            table.to(dev), torch.tensor([prompt_len + 1], dtype=torch.int32, device=dev))
    for _ in range(3):
        engine._decode(model, *args)
    return n / _timed(lambda: [engine._decode(model, *args) for _ in range(n)])


def herd_prefill(model, prompt: list[int], repeats: int, engine: Engine | None = None) -> float:
    """Best prefill tok/s (time to the first token) of a long prompt."""
    engine = engine or make_engine(model)
    best = 0.0
    for _ in range(repeats):
        _wait_quiet()
        best = max(best, generate(engine, prompt, 1)["prefill_tok_s"])
    return best


def hf_model_from(model: Transformer):
    """transformers' LlamaForCausalLM holding the same bf16 weights (q/k rows permuted to HF's RoPE layout)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    args = model.args
    cfg = LlamaConfig(**args.to_hf("bfloat16"))
    with torch.device("meta"):
        hf = LlamaForCausalLM(cfg)
    hf.load_state_dict(meta_to_hf(model.state_dict(), args), strict=False, assign=True)
    if args.tie_embeddings:
        hf.tie_weights()
    # its buffers are not in the state dict: build them, on the weights' device
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf.config).to(model.tok_embeddings.weight.device)
    return hf.eval()


@torch.inference_mode()
def hf_decode(hf, prompt: list[int], new: int, repeats: int) -> dict:
    """transformers generate (greedy, default cache): decode tok/s = (new - 1) / (t(new) - t(1))."""
    ids = torch.tensor([prompt], device=hf.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)

    def run(n):
        return _timed(lambda: hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw))

    run(2)
    t1 = min(run(1) for _ in range(repeats))
    tn = min(run(new) for _ in range(repeats))
    return {"decode_tok_s": (new - 1) / (tn - t1), "prefill_tok_s": len(prompt) / t1}


@torch.inference_mode()
def hf_prefill(hf, prompt: list[int], repeats: int) -> float:
    ids = torch.tensor([prompt], device=hf.device)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, max_new_tokens=1)
    return len(prompt) / min(_timed(lambda: hf.generate(ids, **kw)) for _ in range(repeats))


def llama_cpp_decode(path: Path, prompt: list[int], new: int, repeats: int, threads: int) -> float:
    """llama.cpp's best greedy decode tok/s on a GGUF file, through llama-cpp-python: tokens after the first / time,
    as herd's rows count them (its argmax over the logits included, as herd's sampling is)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new, n_batch=len(prompt), n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    n_vocab, best = llm.n_vocab(), 0.0

    def greedy() -> int:  # the last position's logits, read in place
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))))

    try:
        for i in range(repeats + 1):  # the first run pages the mmapped file in; it is not counted
            llm.reset()
            llm.eval(prompt)
            tok = greedy()
            t = time.perf_counter()
            for _ in range(new - 1):
                llm.eval([tok])
                tok = greedy()
            if i:
                best = max(best, (new - 1) / (time.perf_counter() - t))
    finally:
        llm.close()
    return best


def llama_cpp_skip_reason(device: str, vocab_size: int) -> str | None:
    """Why llama.cpp cannot run here, or None."""
    if device != "cpu":
        return "llama-cpp-python is built for the CPU here"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed"
    from herd.tokenizer import load_tokenizer

    if load_tokenizer().n_words != vocab_size:  # the GGUF carries the tokenizer, which must match the head
        return f"the GGUF needs the Llama 3 vocabulary (128256 ids), this run's vocab is {vocab_size}"
    return None


def llama_cpp_rows(base, args, prompt, a, kv_bytes, add, rows, res) -> None:
    """llama.cpp on the same weights: each GGUF type is written, measured and deleted in turn. Bytes per token are
    the file's tensor bytes (the tied head reads token_embd whole) plus the request's f16 KV cache."""
    import llama_cpp

    from herd.gguf import GGUFFile, write_gguf
    from herd.tokenizer import load_tokenizer

    print(f"## llama.cpp (llama-cpp-python {llama_cpp.__version__}), same weights as GGUF, {a.threads} threads",
          flush=True)
    tok, sd = load_tokenizer(), base.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        for _, gtype in LLAMA_CPP_TYPES:
            path = write_gguf(sd, args, tok, Path(tmp) / f"model-{gtype}.gguf", dtype=gtype.lower())
            f = GGUFFile(path)
            nbytes = sum(t.nbytes for t in f.tensors.values()) + kv_bytes
            f.close()
            rate = llama_cpp_decode(path, prompt, a.new, a.repeats, a.threads)
            path.unlink()
            add(f"llama.cpp {gtype}", rate, nbytes)
    # herd's best row of each width (eager or compiled) over llama.cpp's
    vs = {w: mine["tok_s"] / theirs["tok_s"] for w, mine, theirs in llama_cpp_pairs(rows) if theirs["tok_s"]}
    res["vs_llama_cpp"] = vs
    print("  herd (best row) / llama.cpp decode: " + ", ".join(
        f"{d} {v:.2f}x" for d, v in vs.items()) + "  (int8 vs Q8_0, int4 vs Q4_0)", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-3.2-1b", help="model shape (default llama-3.2-1b)")
    ap.add_argument("--model", help="a checkpoint (HF/Meta folder or .gguf) instead of random weights of --config")
    ap.add_argument("--layers", type=int, help="override n_layers (smaller runs; the output head keeps its size)")
    ap.add_argument("--dim", type=int, help="override dim (with --heads, for smoke runs)")
    ap.add_argument("--heads", type=int)
    ap.add_argument("--vocab", type=int, help="override vocab_size")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                    help="cuda: bf16 on the GPU, roofline from its copy bandwidth (herd's CPU kernels do not apply)")
    ap.add_argument("--prompt", type=int, default=128, help="decode prompt length (default 128)")
    ap.add_argument("--new", type=int, default=128, help="new tokens (default 128)")
    ap.add_argument("--prefill", type=int, default=1024, help="prefill prompt length (default 1024; 0 skips)")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bw-mib", type=int, default=2048, help="bandwidth probe buffer (default 2048 MiB)")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-quant", action="store_true", help="skip int8/int4")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp (GGUF BF16, Q8_0, Q4_0 of the same "
                                                                "weights, through llama-cpp-python)")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile (inductor, freezing)")
    ap.add_argument("--compile-default-only", action="store_true",
                    help="with --compile, only the engine's default (CPU: herd kernels; CUDA: herd's CUDA graph)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: --layers 2 --dim 256 --heads 4 --vocab 4096 "
                                                         "--prompt 16 --new 16 --prefill 64 --repeats 1 --bw-mib 256")
    ap.add_argument("--gate", type=float, default=0.0, help="before each timed run, wait until torch's sum reads "
                                                             "this many GB/s (shared machines; default 0 = off)")
    ap.add_argument("--gate-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    if a.smoke:
        a.layers, a.dim, a.heads, a.vocab = a.layers or 2, a.dim or 256, a.heads or 4, a.vocab or 4096
        a.prompt, a.new, a.prefill, a.repeats, a.bw_mib = 16, 16, 64, 1, 256
    torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")
    DEVICE["name"] = a.device
    torch.manual_seed(0)
    GATE.update(gb_s=a.gate, timeout=a.gate_timeout)

    loaded = load_model(a.model, dtype=torch.bfloat16).eval() if a.model else None
    args = loaded.args if loaded is not None else get_config(a.config)
    changes = {k: v for k, v in (("n_layers", a.layers), ("dim", a.dim), ("n_heads", a.heads),
                                 ("vocab_size", a.vocab)) if v}
    if "n_heads" in changes:
        changes["n_kv_heads"] = max(1, changes["n_heads"] // 4)
    args = args.replace(**changes) if changes else args
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{platform.processor() or platform.machine()}"
    res: dict = {"machine": f"{where}, {a.threads} threads, torch {torch.__version__}", "device": a.device,
                 "config": a.model or a.config, "overrides": changes, "kernels": cpu_kernels()}
    bw = measure_bandwidth(a.device, a.bw_mib, max(3, a.repeats))
    res["bandwidth_gb_s"] = bw
    BW = max(bw.values()) * 1e9
    print(f"# {res['machine']}; read bandwidth {', '.join(f'{k} {v:.1f}' for k, v in bw.items())} GB/s "
          f"(roofline uses {BW / 1e9:.1f})", flush=True)

    if loaded is not None and not changes:
        base = loaded
    else:
        if loaded is not None:
            print("# shape overrides given: random weights of the checkpoint's shape", flush=True)
        with torch.device(a.device):  # on a GPU, an 8B model's random init takes seconds there, minutes here
            base = Transformer(args)
            base.init_weights()
        base = base.to(torch.bfloat16).eval()
    base = base.to(a.device)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, args.vocab_size, (a.prompt,), generator=g).tolist()
    long_prompt = torch.randint(0, args.vocab_size, (a.prefill,), generator=g).tolist()
    kv_bytes = kv_cache_bytes_per_token(args) * (a.prompt + a.new)  # eager attention reads the request's slots
    rows = []

    def add(name, tok_s, nbytes, extra="", shown=None):
        """One table row, printed as `shown` (default: its name)."""
        roof = BW / nbytes
        rows.append({"name": name, "tok_s": tok_s, "bytes_per_token": nbytes, "roofline_tok_s": roof,
                     "roofline_frac": tok_s / roof, "note": extra})
        print(f"  {shown or name:<34} {tok_s:7.2f} tok/s   {nbytes / 1e9:6.3f} GB/token   "
              f"{100 * tok_s / roof:5.1f}% of roofline ({roof:.1f} tok/s) {extra}", flush=True)

    print(f"## decode: batch 1, prompt {a.prompt}, {a.new} new tokens (greedy)", flush=True)
    bf16_bytes = weight_bytes_per_token(base) + kv_bytes
    on_cpu = a.device == "cpu"
    kern = ", herd kernels" if on_cpu and cpu_kernels() else ""  # elsewhere the quantized layers run PyTorch ops
    if on_cpu:
        plain = herd_decode(base, prompt, a.new, a.repeats)
        add("herd bf16 eager, F.linear", plain["decode_tok_s"], bf16_bytes)
        base.clear_caches()
        use_cpu_kernels(base)  # swaps the linear modules in place (same weights): decode now uses the kernel
    hf = None if a.no_hf else hf_model_from(base)
    # herd and transformers alternate, one run each per round, so a slower stretch of a shared machine hits both
    herd = t = None
    engine = make_engine(base)
    for _ in range(a.repeats):
        h = herd_decode(base, prompt, a.new, 1, engine=engine)
        herd = h if herd is None or h["decode_tok_s"] > herd["decode_tok_s"] else herd
        if hf is not None:
            th = hf_decode(hf, prompt, a.new, 1)
            t = th if t is None or th["decode_tok_s"] > t["decode_tok_s"] else t
    base.clear_caches()
    add(f"herd bf16 eager{kern}", herd["decode_tok_s"], bf16_bytes)
    if hf is not None:
        add("transformers bf16 eager", t["decode_tok_s"], bf16_bytes)
        res["speedup_vs_transformers"] = herd["decode_tok_s"] / t["decode_tok_s"]
        print(f"  herd / transformers decode: {res['speedup_vs_transformers']:.2f}x", flush=True)

    if a.prefill:
        print(f"## prefill: {a.prefill}-token prompt, time to first token (alternating runs)", flush=True)
        hp = tp = 0.0
        herd_prefill(base, long_prompt, 1, engine)  # warm-up: both sides' first calls are untimed
        if hf is not None:
            hf_prefill(hf, long_prompt, 1)
        for _ in range(a.repeats):
            hp = max(hp, herd_prefill(base, long_prompt, 1, engine))
            if hf is not None:
                tp = max(tp, hf_prefill(hf, long_prompt, 1))
        base.clear_caches()
        res["prefill_tok_s"] = {"herd": hp}
        # FLOPs per prompt token: 2 per weight of the layers (the head runs on the last token only) + causal
        # attention, QK^T and PV over T/2 keys on average: 2 * 2 * n_layers * (n_heads * head_dim) * T/2
        layer_weights = sum(p.numel() for n, p in base.layers.named_parameters() if not n.endswith("norm.weight"))
        res["prefill_flops_per_token"] = 2 * layer_weights + 2 * args.n_layers * args.n_heads * args.head_dim * a.prefill
        res["prefill_tokens"] = a.prefill
        print(f"  herd bf16          {hp:8.1f} tok/s", flush=True)
        if hf is not None:
            res["prefill_tok_s"]["transformers"] = tp
            print(f"  transformers bf16  {tp:8.1f} tok/s   (herd {hp / tp:.2f}x)", flush=True)
    del hf
    gc.collect()

    if a.compile:
        print("## torch.compile (inductor" + (", freezing" if on_cpu else "") + ") of the decode step", flush=True)
        # CPU: with herd's kernels, and plain nn.Linear layers that inductor prepacks. CUDA: the engine's default
        # (herd's CudaGraphStep), torch's own CUDA graphs (mode="reduce-overhead"), and none (kernel launches).
        variants = ((("herd kernels", True, True), ("F.linear", False, True)) if on_cpu
                    else (("CUDA graph", False, True), ("torch reduce-overhead", False, "torch"),
                          ("no CUDA graphs", False, False)))
        for label, kernels, graphs in variants[:1] if a.compile_default_only else variants:
            m = base if not on_cpu else copy.deepcopy(base)  # CUDA: same weights (an 8B copy would not fit twice)
            if not kernels:  # back to plain nn.Linear layers, so inductor sees and prepacks the matmuls
                restore_linears(m)
            try:
                engine, compile_s = compiled_engine(m, prompt, cudagraphs=graphs)
                s = herd_decode(m, prompt, a.new, a.repeats, engine=engine)
            except Exception as e:  # one variant failing to compile must not lose the rest of the table
                print(f"  herd bf16 compiled, {label}: FAILED {type(e).__name__}: {str(e).splitlines()[0][:300]}",
                      flush=True)
                res.setdefault("failed", []).append(f"compiled, {label}: {type(e).__name__}")
                continue
            finally:
                m.clear_caches()
            add(f"herd bf16 compiled, {label}", s["decode_tok_s"], bf16_bytes, f"(compile {compile_s:.0f} s)")
            if not on_cpu:  # where the rest of the time goes: the host loop around the step, or the step itself
                add(f"herd bf16 compiled, {label}, step alone (no host sync)", step_alone(engine, a.prompt, a.new),
                    bf16_bytes, shown="  same, step alone (no host sync)")
                m.clear_caches()
            del engine
            if on_cpu:
                del m
            gc.collect()

    if not a.no_quant:
        print(f"## weight-only quantization (int4 group size {a.group_size})", flush=True)
        models, nbytes = {}, {}
        for dtype in ("int8", "int4"):
            m = copy.deepcopy(base)
            restore_linears(m)
            quantize_model(m, dtype, a.group_size)
            use_cpu_kernels(m)  # as herd.load does on CPU: the quantized layers' kernels + the decode attention
            models[dtype], nbytes[dtype] = m, weight_bytes_per_token(m) + kv_bytes

        def alternate(engines: dict) -> dict:
            """Best decode tok/s of each engine, one run each per round (int8 and int4 see the same machine)."""
            best = dict.fromkeys(engines, 0.0)
            for _ in range(a.repeats):
                for dtype, eng in engines.items():
                    best[dtype] = max(best[dtype], herd_decode(models[dtype], prompt, a.new, 1, engine=eng)["decode_tok_s"])
            return best

        q_rates = alternate({dtype: make_engine(m) for dtype, m in models.items()})
        for dtype in models:
            add(f"herd {dtype} eager{kern}", q_rates[dtype], nbytes[dtype])
        c_rates = {}
        if a.compile:  # smaller weights: the per-token overheads that compile removes matter more
            engines, compile_s = {}, {}
            for dtype, m in models.items():
                m.clear_caches()
                engines[dtype], compile_s[dtype] = compiled_engine(m, prompt)
            c_rates = alternate(engines)
            for dtype in models:
                add(f"herd {dtype} compiled{kern}", c_rates[dtype], nbytes[dtype],
                    f"(compile {compile_s[dtype]:.0f} s)")
        del models
        gc.collect()
        res["int4_over_int8"] = q_rates["int4"] / q_rates["int8"]
        print(f"  int4 / int8 decode: {res['int4_over_int8']:.2f}x eager", end="", flush=True)
        if c_rates:
            res["int4_over_int8_compiled"] = c_rates["int4"] / c_rates["int8"]
            print(f", {res['int4_over_int8_compiled']:.2f}x compiled", end="")
        print(flush=True)
    why_not = "--no-llama-cpp" if a.no_llama_cpp else llama_cpp_skip_reason(a.device, args.vocab_size)
    if why_not:
        print(f"## llama.cpp: skipped ({why_not})", flush=True)
    else:
        llama_cpp_rows(base, args, prompt, a, kv_bytes, add, rows, res)
    res["rows"] = rows
    bw_end = measure_bandwidth(a.device, a.bw_mib, max(3, a.repeats))
    res["bandwidth_end_gb_s"] = bw_end
    drift = max(bw_end.values()) * 1e9 / BW
    print(f"# read bandwidth at the end: {', '.join(f'{k} {v:.1f}' for k, v in bw_end.items())} GB/s"
          + ("" if drift > 0.9 else "  (WARNING: >10% below the start: other work disturbed this run; rerun)"))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
