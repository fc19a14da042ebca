"""Distributed training on PyTorch's own engine, applied to a herd Transformer from outside.

`init_distributed` reads torchrun's environment; `build_mesh` makes a 2-D ("dp", "tp") device mesh;
`apply_tp` shards the Linear/Embedding modules with DTensor plans keyed by module FQN (Megatron-style column/row
splits plus sequence parallelism for the norms, the torchtitan recipe); `apply_ac` and `apply_compile` wrap each
block; `apply_fsdp` shards parameters with FSDP2 (`fully_shard`) over "dp". model.py never imports any of this.
The order matters and is the one torchtitan uses: TP -> activation checkpointing -> compile -> FSDP.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(spec: str = "auto") -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def init_distributed(device: str = "auto") -> DistEnv:
    """One process: rank 0 of 1. Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on GPUs, gloo
    on CPUs) and use the GPU of LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = resolve_device(device)
    if world == 1:
        return DistEnv(0, 1, 0, dev)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            dist.init_process_group("cuda:nccl,cpu:gloo", device_id=dev)
        else:
            dist.init_process_group("gloo")
    return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, dev)


def build_mesh(env: DistEnv, tp: int):
    """A ("dp", "tp") DeviceMesh of shape (world / tp, tp); None for a single process."""
    if env.world == 1:
        if tp != 1:
            raise ValueError(f"parallel.tp={tp} needs {tp} processes: launch with torchrun --nproc_per_node {tp}")
        return None
    if env.world % tp:
        raise ValueError(f"world size {env.world} is not divisible by parallel.tp={tp}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(env.device.type, (env.world // tp, tp), mesh_dim_names=("dp", "tp"))


# ---- tensor parallelism -------------------------------------------------------------------------------------


def tp_plan(n_layers: int) -> dict:
    """DTensor plan keyed by FQN. Between blocks the residual stream is sharded over the sequence (Shard(1));
    attention/FFN inputs are all-gathered to Replicate, wq/wk/wv/w1/w3 split output features, wo/w2 split input
    features and reduce-scatter back to sequence shards. Logits come out whole (Replicate) on every rank."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    # Attention.forward(x, cos, sin, input_pos, mask, kv_len): only x is distributed.
    attn_in = PrepareModuleInput(input_layouts=(Shard(1),) + (None,) * 6,  # x, then cos ... pages: left as they are
                                 desired_input_layouts=(Replicate(),) + (None,) * 6)
    for i in range(n_layers):
        p = f"layers.{i}."
        plan |= {
            p + "attention_norm": SequenceParallel(),
            p + "attention": attn_in,
            p + "attention.wq": ColwiseParallel(),
            p + "attention.wk": ColwiseParallel(),
            p + "attention.wv": ColwiseParallel(),
            p + "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            p + "ffn_norm": SequenceParallel(),
            p + "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            p + "feed_forward.w1": ColwiseParallel(),
            p + "feed_forward.w3": ColwiseParallel(),
            p + "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        }
    return plan


def apply_tp(model: nn.Module, tp_mesh) -> nn.Module:
    """Shard `model` over `tp_mesh` in place. Each rank then holds n_heads/tp query and n_kv_heads/tp KV heads."""
    from torch.distributed.tensor.parallel import parallelize_module

    args, tp = model.args, tp_mesh.size()
    for name, n in (("n_heads", args.n_heads), ("n_kv_heads", args.n_kv_heads), ("vocab_size", args.vocab_size),
                    ("ffn_hidden_dim", args.ffn_hidden_dim)):
        if n % tp:
            raise ValueError(f"tensor parallelism {tp} does not divide {name}={n}")
    parallelize_module(model, tp_mesh, tp_plan(args.n_layers))
    for block in model.layers:  # the heads each rank computes; GQA's n_heads / n_kv_heads ratio is unchanged
        block.attention.n_heads = args.n_heads // tp
        block.attention.n_kv_heads = args.n_kv_heads // tp
    if args.tie_embeddings:  # both were sharded Shard(0) on the vocabulary: re-share the one parameter
        model.output.weight = model.tok_embeddings.weight
    return model


# ---- activation checkpointing, compile, FSDP ---------------------------------------------------------------


def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_ac(model: nn.Module) -> nn.Module:
    """Recompute each block's activations in the backward pass. The block's forward is wrapped on the instance,
    not by a wrapper module, so parameter names (and checkpoints) are unchanged."""
    for block in model.layers:
        block.forward = functools.partial(_checkpointed, block.forward)
    return model


def apply_compile(model: nn.Module) -> nn.Module:
    """torch.compile each block in place (module names unchanged; one compiled graph re-used by every layer)."""
    for block in model.layers:
        block.compile()
    return model


def apply_fsdp(model: nn.Module, dp_mesh, param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2: shard every block, then the root (embeddings, final norm, output). With `param_dtype` (bf16) the
    all-gathered weights are cast for compute while gradients are reduced in float32 (mixed precision)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    n = len(model.layers)
    for i, block in enumerate(model.layers):
        # the last block's parameters are gathered again right away by the root's backward: keep them
        fully_shard(block, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=i < n - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp)
    return model


# ---- gradient norm across sharded and plain parameters -----------------------------------------------------


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float | None) -> torch.Tensor:
    """Global L2 norm of all gradients (a plain scalar tensor, identical on every rank); clips when max_norm.

    DTensor gradients (FSDP/TP shards) are grouped by mesh and placement so that each group's norm is one
    reduction; the total is the root of the summed squares. Non-finite norms are returned without clipping.
    """
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in params:
        if p.grad is not None:
            g = p.grad
            key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
            groups.setdefault(key, []).append(g)
    sq = []
    for grads in groups.values():
        n = torch.nn.utils.get_total_norm(grads, 2.0, foreach=True)
        if isinstance(n, DTensor):
            n = n.full_tensor()
        sq.append(n.float() ** 2)
    total = torch.stack(sq).sum().sqrt() if sq else torch.zeros(())
    if max_norm is not None and max_norm > 0 and math.isfinite(total.item()):
        coef = max_norm / (total.item() + 1e-6)
        if coef < 1.0:
            for grads in groups.values():
                for g in grads:
                    g.mul_(coef)
    return total
