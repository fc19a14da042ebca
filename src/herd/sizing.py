"""Sizing arithmetic: memory, FLOPs and time to serve or train a Llama 3.1 model on given hardware.

Everything here is a formula over the config; the conventions are stated where they are chosen:
- weight bytes (`weight_bytes`, the one definition `herd info` and `herd plan` print): bf16 2 per parameter, fp8 1;
  int8 and int4 are herd's weight-only layouts (`herd quantize`): every linear layer, the output head included,
  at 1 byte per weight + one fp32 scale per output row (int8), or 0.5 byte + a bf16 scale and a bf16 minimum per group
  of `group_size` weights (int4, 128 by default), while the embedding and the norms stay bf16 (a tied model keeps a
  bf16 embedding beside its quantized head). Sizes print in decimal units (`format_bytes`: 1 GB = 10^9 bytes);
- KV cache: 2 (K and V) x layers x kv_heads x head_dim x bytes per element, per token;
- FLOPs per token (`flops_per_token`, the one formula `herd plan` and the training MFU use): 2 per weight that
  multiplies an activation (every linear of every block and the output head; not the embedding lookup, which is a
  gather; a tied head is counted once) plus attention, 2 * 2 * layers * dim * seq forward for the scores and the
  values. Training is 3x the forward (6N + 12 * layers * dim * seq: PaLM appendix B's MFU convention, as torchtitan
  counts; the causal mask's saving is not discounted); a frozen base (LoRA/QLoRA) computes no weight gradients, so
  its weights cost 2x the forward (4N) while attention still costs its full backward;
- mixed-precision AdamW state: 16 bytes per parameter (fp32 master weights 4 + fp32 gradients 4 + Adam m and v 8),
  sharded over every GPU by FSDP x TP x PP;
- activations saved for backward, per token per layer, bf16: layer input and both norm outputs, q/k/v, attention
  output, FFN gate/up/activation/product (flash attention: no seq^2 score matrix), divided by TP (sequence parallel).
  With full activation checkpointing only each layer's input is kept, plus one layer being recomputed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .config import ModelArgs, get_config, kv_cache_bytes_per_token, num_params

# Dense peak bf16 FLOP/s and memory bandwidth (vendor datasheets: H100 SXM, H200 SXM, A100 SXM 80GB).
HARDWARE = {
    "h100": {"name": "NVIDIA H100 SXM", "flops": 989e12, "bandwidth": 3.35e12, "memory": 80e9},
    "h200": {"name": "NVIDIA H200 SXM", "flops": 989e12, "bandwidth": 4.8e12, "memory": 141e9},
    "a100": {"name": "NVIDIA A100 SXM", "flops": 312e12, "bandwidth": 2.0e12, "memory": 80e9},
}
WEIGHT_DTYPES = ("bf16", "fp8", "int8", "int4")
KV_BYTES = {"bf16": 2, "fp8": 1, "int8": 1, "int4": 2}  # weight-only int8/int4 keep a bf16 cache
INT4_GROUP = 128


def weight_bytes(args: ModelArgs, dtype: str = "bf16", group_size: int = INT4_GROUP) -> int:
    """Bytes of the weights at `dtype` (bf16, fp8, or herd's int8 / int4 layouts: see the module docstring); the
    int8 / int4 numbers equal the tensors `herd quantize` writes."""
    n = num_params(args)
    if dtype in ("bf16", "fp16"):
        return 2 * n
    if dtype == "fp8":
        return n
    linear = matmul_params(args)
    float_params = n - linear + (args.vocab_size * args.dim if args.tie_embeddings else 0)
    if dtype == "int8":
        return linear + 4 * _linear_rows(args) + 2 * float_params
    if dtype == "int4":
        return linear // 2 + 2 * 2 * (linear // group_size) + 2 * float_params
    raise ValueError(f"unknown dtype {dtype!r} ({', '.join(WEIGHT_DTYPES)})")


def format_bytes(n: float) -> str:
    """A size in decimal units (1 kB = 1000 bytes, 1 GB = 10^9), the unit every herd command prints sizes in."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:,.1f} TB"


def _linear_rows(args: ModelArgs) -> int:
    per_layer = args.dim + 2 * args.n_kv_heads * args.head_dim + args.dim + 2 * args.ffn_hidden_dim + args.dim
    return args.n_layers * per_layer + args.vocab_size  # + the output head (the embedding is no linear)


def matmul_params(args: ModelArgs) -> int:
    """Weights that multiply an activation: each block's wq, wk, wv, wo, w1, w2, w3 and the output head. Not the
    norms and not the embedding lookup (a tied head is one matrix, counted here once, as the head)."""
    q, kv = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
    attention = args.dim * q + 2 * args.dim * kv + q * args.dim
    ffn = 3 * args.dim * args.ffn_hidden_dim
    return args.n_layers * (attention + ffn) + args.vocab_size * args.dim


def flops_per_token(args: ModelArgs, seq_len: int, *, train: bool = True, frozen_base: bool = False) -> float:
    """FLOPs per token of a forward (train=False) or a training step (train=True) over sequences of seq_len.

    Forward: 2 x matmul_params + 4 x layers x dim x seq_len (attention scores q.k and the weighted sum of values,
    2 FLOPs per multiply-add each, causal masking not discounted). Training: the backward is twice the forward,
    6N + 12 x layers x dim x seq_len (PaLM appendix B, torchtitan's MFU). `frozen_base` (LoRA/QLoRA): the frozen
    weights get no gradient of their own, only the input's, so 4N + 12 x layers x dim x seq_len (the adapters'
    own FLOPs, well under 1%, are left out).
    """
    weights = 2.0 * matmul_params(args)
    attention = 4.0 * args.n_layers * args.dim * seq_len
    if not train:
        return weights + attention
    return (2 if frozen_base else 3) * weights + 3 * attention


def activation_bytes_per_token_layer(args: ModelArgs, tp: int = 1) -> float:
    kv_dim = args.n_kv_heads * args.head_dim
    saved = 6 * args.dim + 2 * kv_dim + 4 * args.ffn_hidden_dim  # bf16 elements (see module docstring)
    return 2 * saved / tp


@dataclass
class Plan:
    model: str
    parameters: int
    dtype: str
    weight_bytes: int
    kv_bytes_per_token: int
    seq_len: int
    batch: int
    kv_bytes_at_seq_len: int
    serve_bytes_per_gpu: float
    decode_tok_s_upper_bound: float  # memory-bandwidth roofline for one sequence at full context
    flops_per_token_train: float
    flops_per_token_forward: float
    hardware: str = "h100"
    serve_gpus: int = 1  # tp x pp
    serve_bytes_total: float = 0.0  # weights + KV cache
    train: dict | None = None


def plan(
    name: str,
    *,
    seq_len: int | None = None,
    batch: int = 1,
    dtype: str = "bf16",
    gpus: int = 1,
    tp: int = 1,
    pp: int = 1,
    hardware: str = "h100",
    mfu: float = 0.4,
    train: bool = False,
    tokens: float | None = None,
    total_flops: float | None = None,
    micro_batch: int = 1,
) -> Plan:
    args = get_config(name)
    seq_len = seq_len or args.max_seq_len
    _check(seq_len > 0 and batch > 0 and gpus > 0 and tp > 0 and pp > 0 and micro_batch > 0, "sizes must be positive")
    _check(seq_len <= args.max_seq_len, f"seq_len {seq_len} exceeds the model context {args.max_seq_len}")
    _check(gpus % (tp * pp) == 0, f"gpus {gpus} is not a multiple of tp x pp = {tp * pp}")
    _check(0 < mfu <= 1, "mfu must be in (0, 1]")
    _check(hardware in HARDWARE, f"unknown hardware {hardware!r} ({', '.join(HARDWARE)})")
    _check(dtype in WEIGHT_DTYPES, f"unknown dtype {dtype!r} ({', '.join(WEIGHT_DTYPES)})")
    hw = HARDWARE[hardware]
    n = num_params(args)
    wb = weight_bytes(args, dtype)
    kv_tok = kv_cache_bytes_per_token(args, KV_BYTES[dtype])
    kv_total = kv_tok * seq_len * batch
    serve_gpus = tp * pp
    per_token_read = wb + kv_tok * seq_len  # one decode step of one sequence at full context
    result = Plan(
        model=name, parameters=n, dtype=dtype, weight_bytes=wb, kv_bytes_per_token=kv_tok, seq_len=seq_len,
        batch=batch, kv_bytes_at_seq_len=kv_total, serve_bytes_per_gpu=(wb + kv_total) / serve_gpus,
        decode_tok_s_upper_bound=hw["bandwidth"] * serve_gpus / per_token_read,
        flops_per_token_train=flops_per_token(args, seq_len),
        flops_per_token_forward=flops_per_token(args, seq_len, train=False),
        hardware=hardware, serve_gpus=serve_gpus, serve_bytes_total=wb + kv_total,
    )
    if train:
        result.train = _train_plan(args, seq_len, gpus, tp, pp, hw, mfu, tokens, total_flops, micro_batch)
    return result


def _train_plan(args, seq_len, gpus, tp, pp, hw, mfu, tokens, total_flops, micro_batch) -> dict:
    n = num_params(args)
    states = 16 * n / gpus  # FSDP over dp, TP and PP: every GPU holds 1/gpus of weights, grads, Adam state
    tok = micro_batch * seq_len
    # 1F1B: the first stage keeps up to pp micro-batches in flight, each of L/pp layers -> L layers' worth.
    act_full = tok * args.n_layers * activation_bytes_per_token_layer(args, tp)
    act_ckpt = tok * (args.n_layers * 2 * args.dim / tp + activation_bytes_per_token_layer(args, tp))
    logits = tok * args.vocab_size * 4 / tp  # fp32 logits for the loss
    flops_tok = flops_per_token(args, seq_len)
    if total_flops is None and tokens is not None:
        total_flops = tokens * flops_tok
    out = {
        "gpus": gpus, "tp": tp, "pp": pp, "dp": gpus // (tp * pp), "micro_batch": micro_batch, "mfu": mfu,
        "bytes_per_gpu": {
            "weights_fp32": 4 * n / gpus, "grads_fp32": 4 * n / gpus, "adam_states": 8 * n / gpus,
            "activations": act_full, "activations_checkpointed": act_ckpt, "logits": logits,
            "total": states + act_full + logits, "total_checkpointed": states + act_ckpt + logits,
        },
        "cluster_tokens_per_s": gpus * hw["flops"] * mfu / flops_tok,
    }
    if total_flops is not None:
        seconds = total_flops / (gpus * hw["flops"] * mfu)
        out.update(total_flops=total_flops, seconds=seconds, days=seconds / 86400)
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


_gb = format_bytes


def serving_gpus(p: Plan) -> int:
    """GPUs of p.hardware that weights + KV cache need, counted by memory alone (no room left for activations)."""
    return max(1, math.ceil(p.serve_bytes_total / HARDWARE[p.hardware]["memory"]))


def format_plan(p: Plan) -> str:
    hw = HARDWARE[p.hardware]
    need, fits = serving_gpus(p), p.serve_bytes_per_gpu <= hw["memory"]
    if need == 1:
        verdict = f"fits one {hw['name']} ({_gb(hw['memory'])})"
    else:
        n = 1 << (need - 1).bit_length()  # tensor parallelism within an 8-GPU node, pipeline stages across nodes
        layout = f"--tp {n}" if n <= 8 else f"--tp 8 --pp {n // 8}"
        verdict = (f"needs {need} x {hw['name']} ({_gb(hw['memory'])} each) for weights + KV cache, e.g. {layout}"
                   + ("" if fits else f"; on {p.serve_gpus} it does not fit"))
    lines = [
        f"model                {p.model}: {p.parameters:,} parameters",
        f"GPU                  {hw['name']}, {_gb(hw['memory'])}, {hw['flops'] / 1e12:,.0f} TFLOP/s bf16, "
        f"{hw['bandwidth'] / 1e12:,.2f} TB/s (--hardware {p.hardware})",
        f"weights ({p.dtype:>4})       {_gb(p.weight_bytes)}" + (" (int4: groups of 128)" if p.dtype == "int4" else ""),
        f"KV cache             {_gb(p.kv_bytes_per_token)}/token; {_gb(p.kv_bytes_at_seq_len)} at "
        f"{p.seq_len:,} tokens x batch {p.batch}",
        f"serving memory/GPU   {_gb(p.serve_bytes_per_gpu)} over {p.serve_gpus} GPU(s): {verdict}",
        f"decode upper bound   {p.decode_tok_s_upper_bound:,.1f} tok/s per sequence at full context (bandwidth roofline)",
        f"FLOPs/token          {p.flops_per_token_train:.3e} train (6N + 12 L d s), {p.flops_per_token_forward:.3e} forward",
    ]
    if p.train:
        t, b = p.train, p.train["bytes_per_gpu"]
        lines += [
            f"training layout      {t['gpus']} GPUs = dp {t['dp']} x tp {t['tp']} x pp {t['pp']}, micro-batch {t['micro_batch']}",
            f"  weights+grads+Adam {_gb(b['weights_fp32'] + b['grads_fp32'] + b['adam_states'])} per GPU (16 B/param, sharded)",
            f"  activations        {_gb(b['activations'])} (full), {_gb(b['activations_checkpointed'])} (checkpointed); "
            f"logits {_gb(b['logits'])}",
            f"  total per GPU      {_gb(b['total'])} without, {_gb(b['total_checkpointed'])} with checkpointing",
            f"  throughput         {t['cluster_tokens_per_s']:,.0f} tokens/s at {t['mfu']:.0%} MFU",
        ]
        if "days" in t:
            lines.append(f"  time               {t['total_flops']:.2e} FLOPs -> {t['days']:,.1f} days")
    return "\n".join(lines)


def plan_dict(p: Plan) -> dict:
    return asdict(p)
