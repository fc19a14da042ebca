"""Training throughput: herd's engine vs transformers' LlamaForCausalLM, same shape, same step, same run.

Each step is forward + backward + global-norm clipping + AdamW step + zero_grad on one micro-batch under bf16
autocast (fp32 master weights), with the same random token batch. herd's side uses the library's own pieces
(`pretrain.build_model`, `loop.build_optimizer`, `pretrain.loss_function`, `loop.forward_backward`,
`parallel.clip_grad_norm_`, all in herd.train), so
"compile" means exactly what `train.compile: true` does in a run config. transformers' side is what its users run:
`model(input_ids, labels=...)` with SDPA attention and fused `torch.optim.AdamW` (the Trainer's default), eager
and, as a second row, compiled. Timed steps of the engines alternate (herd, transformers, herd, ...) so a busy
machine slows all alike. Tokens/s, MFU and the ratio use each engine's best step (on a shared machine, the one
that had the cores to itself, as timeit does); the median is shown beside it.

MFU = training FLOPs per token (herd.sizing.flops_per_token: 6 x matmul params + 12 x layers x dim x seq,
PaLM/torchtitan) x tokens/s over a bf16 matmul peak measured at the start of the run.

    python benchmarks/train.py                       # ~100M Llama-shaped model (dim 768, 12 layers), seq 512
    python benchmarks/train.py --dim 128 --layers 2 --heads 4 --kv-heads 2 --vocab 2048 --seq 128 --steps 2   # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch


def herd_engine(args, compile_blocks: bool):
    from herd.train import parallel
    from herd.train.loop import build_optimizer, forward_backward
    from herd.train.pretrain import build_model, loss_function
    from herd.train.settings import settings_from_dict

    s = settings_from_dict({
        "model": {"name": "tiny", "overrides": model_overrides(args)},
        "data": {"paths": ["-"], "seq_len": args.seq},
        "optim": {"lr": 3e-4, "weight_decay": 0.1},
        "train": {"micro_batch": args.batch, "batch_size": args.batch, "compile": compile_blocks},
    })
    model = build_model(s, None, torch.device("cpu"))
    opt = build_optimizer(model, s.optim)
    params = list(model.parameters())
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    loss_fn = loss_function(s, None)

    def step(batch):
        loss_sum = forward_backward(model, [batch], 1.0 / batch.labels.numel(), autocast, torch.device("cpu"), loss_fn)
        parallel.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss_sum.item() / batch.labels.numel()

    return model.args, step


def hf_engine(args, compile_model: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from herd.config import get_config

    margs = get_config("tiny").replace(**model_overrides(args))
    cfg = LlamaConfig(**margs.to_hf("float32"))
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    if compile_model:
        model.compile()  # what TrainingArguments(torch_compile=True) does
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # fused: the Trainer's default optimizer with torch >= 2.8 ("adamw_torch_fused")
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), fused=True)

    def step(batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            # transformers shifts labels itself: pass the window's own tokens (T - 1 predicted positions)
            loss = model(input_ids=batch.inputs, labels=batch.inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


HF = "transformers LlamaForCausalLM (eager, sdpa)"


def model_overrides(args) -> dict:
    return {"dim": args.dim, "n_layers": args.layers, "n_heads": args.heads, "n_kv_heads": args.kv_heads,
            "vocab_size": args.vocab, "multiple_of": 256, "tie_embeddings": True}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1, help="sequences per step")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per engine")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per engine (compilation happens here)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--no-compile", action="store_true", help="skip the two torch.compile rows")
    ap.add_argument("--json", help="also write the results (engines, ratios, MFU) to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from herd.config import num_params
    from herd.sizing import flops_per_token
    from herd.train.data import Batch
    from herd.train.metrics import measure_matmul_peak

    peak = measure_matmul_peak(torch.device("cpu"), torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    window = torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
    batch = Batch(window[:, :-1].contiguous(), window[:, 1:].contiguous())

    engines = {}
    margs, engines["herd (eager)"] = herd_engine(args, compile_blocks=False)
    if not args.no_compile:
        engines["herd (train.compile: true)"] = herd_engine(args, compile_blocks=True)[1]
    engines[HF] = hf_engine(args, compile_model=False)
    if not args.no_compile:
        engines["transformers + torch.compile (torch_compile=True)"] = hf_engine(args, compile_model=True)
    times = {k: [] for k in engines}
    first_loss = {}
    for name, step in engines.items():
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            first_loss.setdefault(name, step(batch))
        print(f"# warm-up {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.steps):
        for name, step in engines.items():  # interleaved: machine noise hits every engine alike
            t0 = time.perf_counter()
            step(batch)
            times[name].append(time.perf_counter() - t0)

    tokens = args.batch * args.seq
    fpt = flops_per_token(margs, args.seq)
    base = min(times[HF])
    print(f"\n{num_params(margs) / 1e6:.1f}M parameters (dim {args.dim}, {args.layers} layers, "
          f"{args.heads}/{args.kv_heads} heads, vocab {args.vocab}, tied), seq {args.seq}, batch {args.batch}; "
          f"bf16 autocast, fused AdamW; {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
          f"threads, torch {torch.__version__}; measured bf16 matmul peak {peak / 1e9:.0f} GFLOP/s; "
          f"best of {args.steps} steps\n")
    print("| engine | best step (s) | median step (s) | tokens/s | MFU | vs transformers |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, ts in times.items():
        t = min(ts)
        rows.append({"engine": name, "compiled": "compile" in name, "transformers": name.startswith("transformers"),
                     "best_step_s": t, "median_step_s": statistics.median(ts), "tok_s": tokens / t,
                     "mfu": fpt * tokens / t / peak, "vs_transformers_eager": base / t, "step_s": ts})
        print(f"| {name} | {t:.3f} | {statistics.median(ts):.3f} | {tokens / t:,.0f} | {fpt * tokens / t / peak:.1%} "
              f"| {base / t:.2f}x |")
    print("\nstep times (s): " + "; ".join(f"{k.split(' (')[0]}{' compiled' if 'compile' in k else ''} "
                                          + " ".join(f"{t:.2f}" for t in ts) for k, ts in times.items()))
    print("loss at the first step (same init scale, different random weights): "
          + ", ".join(f"{k} {v:.3f}" for k, v in first_loss.items()))
    if args.json:
        res = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                          f"torch {torch.__version__}",
               "shape": {k: v for k, v in vars(args).items() if k not in ("json", "threads")},
               "params": num_params(margs), "tokens_per_step": tokens, "flops_per_token": fpt,
               "matmul_peak_flops": peak, "rows": rows, "first_loss": first_loss}
        with open(args.json, "w") as f:
            f.write(json.dumps(res, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
