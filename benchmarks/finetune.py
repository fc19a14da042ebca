"""Fine-tuning memory and speed: full vs LoRA vs QLoRA on the same model, the same batch, in one run.

A random ~100M-parameter Llama-shaped base (dim 768, 12 layers, GQA 12/4 heads, vocab 32768, tied embeddings) is
written once as a bf16 HF checkpoint, as a downloaded model would be. Each method then runs in a fresh child
process exactly as `herd finetune` builds it (herd.train's `finetune.build_model` from `model.init_from`,
`loop.build_optimizer`, `loop.forward_backward`, global-norm clipping, fused AdamW, bf16 autocast) on one packed
row of `--seq` tokens (four dialogs, positions restarting per dialog, loss on half of the tokens).

Memory is the child's peak RSS (VmHWM from /proc/self/status) minus its RSS right after `import torch, herd`: the
loading of the checkpoint counts, as it does for a user. Speed is the best and the median of the timed steps (the
machine may be shared: the best step is the one that had the cores to itself).

    python benchmarks/finetune.py                                              # ~100M model, seq 512
    python benchmarks/finetune.py --dim 128 --layers 2 --heads 4 --kv-heads 2 --vocab 2048 --seq 128 \
        --steps 2 --warmup 1                                                   # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time

def status(key):  # kB -> bytes
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

import torch
from herd.train import finetune, loop, parallel
from herd.train.data import Batch
from herd.train.settings import settings_from_dict, validate
cfg = json.loads(sys.argv[1])
torch.set_num_threads(cfg["threads"])
base = status("VmHWM")
cpu = torch.device("cpu")
seq, n_docs = cfg["seq"], 4
g = torch.Generator().manual_seed(0)
inputs = torch.randint(0, cfg["vocab"], (1, seq), generator=g)
labels = torch.randint(0, cfg["vocab"], (1, seq), generator=g)
positions = torch.arange(seq) % (seq // n_docs)
labels[0, positions < seq // (2 * n_docs)] = -100  # the "prompt" half of each dialog carries no loss
batch = Batch(inputs, labels, positions[None].clone())
n_tok = int((labels != -100).sum())
autocast = torch.autocast("cpu", dtype=torch.bfloat16)

def engine(settings):
    s = settings_from_dict(settings)
    validate(s)
    model = finetune.build_model(s, None, cpu)
    opt = loop.build_optimizer(model, s.optim)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_fn = finetune.loss_function(s, None)

    def step():
        loss = loop.forward_backward(model, [batch], 1.0 / n_tok, autocast, cpu, loss_fn)
        parallel.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item() / n_tok

    return step, sum(p.numel() for p in params)

if cfg["mode"] == "memory":  # one method: peak RSS of the whole run, and of the training steps alone
    t0 = time.perf_counter()
    step, trained = engine(cfg["settings"][0])
    build_s, build_peak = time.perf_counter() - t0, status("VmHWM")
    after_build = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
    losses = [step() for _ in range(cfg["steps"])]
    train_peak = status("VmHWM")
    print(json.dumps({"base": base, "build_peak": build_peak, "after_build": after_build, "train_peak": train_peak,
                      "peak": max(build_peak, train_peak), "losses": losses, "build_s": build_s, "trained": trained}))
else:  # every method in this process, their steps interleaved, so that a busy machine slows all alike
    steps = [engine(st)[0] for st in cfg["settings"]]
    for st in steps:
        for _ in range(cfg["warmup"]):
            st()
    times = [[] for _ in steps]
    for _ in range(cfg["steps"]):
        for i, st in enumerate(steps):
            t0 = time.perf_counter()
            st()
            times[i].append(time.perf_counter() - t0)
    print(json.dumps({"times": times}))
"""


def make_base(args, folder: Path) -> Path:
    import torch

    from herd.checkpoint import save_hf
    from herd.config import get_config
    from herd.model import Transformer

    margs = get_config("tiny").replace(dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                                       n_kv_heads=args.kv_heads, vocab_size=args.vocab, multiple_of=256,
                                       tie_embeddings=True, max_seq_len=max(2048, args.seq))
    with torch.device("meta"):
        shape = Transformer(margs)
    g = torch.Generator().manual_seed(0)
    sd = {}
    for k, v in shape.state_dict().items():
        t = torch.ones(v.shape) if k.endswith("norm.weight") else torch.randn(v.shape, generator=g) * 0.02
        sd[k] = t.to(torch.bfloat16)
    sd["output.weight"] = sd["tok_embeddings.weight"]
    shutil.rmtree(folder, ignore_errors=True)
    save_hf(sd, margs, folder)
    return folder


METHODS = {  # row name -> finetune settings
    "full (fp32 weights + AdamW)": {"method": "full"},
    "LoRA r16, fp32 base": {"method": "lora", "base_dtype": "fp32"},
    "LoRA r16, bf16 base": {"method": "lora", "base_dtype": "bf16"},
    "QLoRA r16, int8 base": {"method": "qlora", "qlora_dtype": "int8", "base_dtype": "bf16"},
    "QLoRA r16, int4 base (g64)": {"method": "qlora", "qlora_dtype": "int4", "qlora_group_size": 64,
                                   "base_dtype": "bf16"},
}


def child_settings(args, base: Path, ft_settings: dict) -> dict:
    return {
        "model": {"init_from": str(base)},
        "data": {"paths": ["-"], "seq_len": args.seq},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "weight_decay": 0.0},
        "train": {"batch_size": 1, "micro_batch": 1, "mixed_precision": "bf16"},
        "finetune": {"lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0, **ft_settings},
    }


def run_child(args, mode: str, settings: list[dict], steps: int) -> dict:
    cfg = {"mode": mode, "settings": settings, "seq": args.seq, "vocab": args.vocab, "warmup": args.warmup,
           "steps": steps, "threads": args.threads}
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per method (interleaved, one process)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per method before the timed ones")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps per method in the memory runs")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per child (1: steady timings when the "
                                                            "cores are shared; 2 threads on 2 busy cores thrash)")
    ap.add_argument("--workdir", default="/tmp/herd-finetune-bench")
    ap.add_argument("--only", nargs="*", help="row names (prefixes) to run; full always runs")
    args = ap.parse_args(argv)

    import torch

    from herd.loading import load_model
    from herd.config import num_params

    t0 = time.perf_counter()
    base = make_base(args, Path(args.workdir) / "base")
    n = num_params(load_model(base).args)
    size = sum(f.stat().st_size for f in base.iterdir() if f.suffix == ".safetensors")
    print(f"# base: {n / 1e6:.1f}M parameters, bf16 HF checkpoint {size / 1e6:.0f} MB "
          f"(written in {time.perf_counter() - t0:.0f} s)", flush=True)
    names = [m for m in METHODS if m.startswith("full") or not args.only or any(m.startswith(o) for o in args.only)]
    rows = {}
    for name in names:  # memory: each method alone in a fresh process
        t0 = time.perf_counter()
        rows[name] = r = run_child(args, "memory", [child_settings(args, base, METHODS[name])], args.memory_steps)
        print(f"# {name}: peak {(r['peak'] - r['base']) / 2**20:,.0f} MiB over imports (training steps "
              f"{(r['train_peak'] - r['base']) / 2**20:,.0f}), losses {' '.join(f'{x:.3f}' for x in r['losses'])} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    t0 = time.perf_counter()
    times = run_child(args, "speed", [child_settings(args, base, METHODS[n]) for n in names], args.steps)["times"]
    print(f"# speed: {args.steps} interleaved steps per method ({time.perf_counter() - t0:.0f} s)", flush=True)

    full = rows[names[0]]
    full_mem, full_train, full_t = full["peak"] - full["base"], full["train_peak"] - full["base"], min(times[0])
    print(f"\n{n / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, {args.heads}/{args.kv_heads} heads, "
          f"vocab {args.vocab}, tied), from a bf16 HF checkpoint; one packed row of {args.seq} tokens (4 dialogs, loss "
          f"on half the tokens), bf16 autocast, fused AdamW; LoRA rank 16 on all 7 linears of every block; "
          f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}; "
          f"speed: best of {args.steps} interleaved steps after {args.warmup} warm-up\n")
    print("| method | trained params | peak RSS - imports | vs full | training-step peak | vs full | best step (s) "
          "| median step (s) | tokens/s | vs full |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, ts in zip(names, times):
        r = rows[name]
        mem, train_mem, t = r["peak"] - r["base"], r["train_peak"] - r["base"], min(ts)
        print(f"| {name} | {r['trained'] / 1e6:.2f}M | {mem / 2**20:,.0f} MiB | {mem / full_mem:.2f}x "
              f"| {train_mem / 2**20:,.0f} MiB | {train_mem / full_train:.2f}x | {t:.3f} | {statistics.median(ts):.3f} "
              f"| {args.seq / t:,.0f} | {full_t / t:.2f}x |")
    print(f"\nimport RSS (subtracted): {statistics.median([r['base'] for r in rows.values()]) / 2**20:,.0f} MiB; "
          "peak RSS = whole child (loading the checkpoint included); training-step peak = VmHWM reset after the model "
          "and optimizer are built; targets: LoRA <= 0.50x full, QLoRA <= 0.35x full")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
