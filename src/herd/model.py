"""The Llama 3.1 / 3.2 text transformer, with Meta's parameter names.

Reads top to bottom: RMSNorm -> RoPE functions -> KV cache -> Attention -> FeedForward -> TransformerBlock ->
Transformer. Only torch is imported; LoRA, quantization and parallelism are applied from outside by plain
functions that swap or wrap the nn.Linear modules below. Numerics follow Meta's reference (llama-models
`models/llama3/model.py`): RMSNorm and RoPE in float32, logits returned as float32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # annotations only: at run time the model imports torch and nothing else
    from .config import ModelArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, cast back, *then* scale by the weight (the order Meta and HF both use). The fused
        # op is x * rsqrt(mean(x^2) + eps) in one kernel (half the time of the five-op form in a CPU prefill).
        return F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).type_as(x) * self.weight


# ---- RoPE: pure functions, every constant from the config -------------------------------------------------


def apply_llama3_scaling(
    freqs: torch.Tensor, scale_factor: float, low_freq_factor: float, high_freq_factor: float, old_context_len: int
) -> torch.Tensor:
    """Llama 3.1's frequency rule: keep high frequencies, divide low ones by the factor, interpolate between."""
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * torch.pi / freqs
    new_freqs = torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, freqs)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    mid = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(mid, (1 - smooth) * new_freqs / scale_factor + smooth * new_freqs, new_freqs)


def rope_frequencies(args: ModelArgs, device: torch.device | None = None) -> torch.Tensor:
    """Inverse frequencies f_i = theta^(-2i/head_dim), float32, shape (head_dim/2,)."""
    hd = args.head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, device=device)[: hd // 2].float() / hd))
    if args.use_scaled_rope:
        freqs = apply_llama3_scaling(
            freqs, args.rope_scale_factor, args.rope_low_freq_factor,
            args.rope_high_freq_factor, args.rope_original_max_seq_len,
        )
    return freqs


def rope_cos_sin(positions: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (B, T) int -> cos, sin: (B, T, 1, head_dim/2) float32.

    Angles are computed per call from the positions (the same float32 products as Meta's outer(t, freqs)),
    so there is no 131072-row table to allocate or to be cast to bf16 by `model.to(dtype)`.
    """
    angles = positions.float()[..., None] * freqs
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd). Rotates the interleaved pairs (2i, 2i+1) by the angles: (x0 + i x1) * (cos + i sin)."""
    xf = x.float().unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():  # inductor fuses the real form but has no code generation for complex ops
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:  # eager: one complex multiply (Meta's form) instead of seven kernels, ~4x faster in a prefill
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


# ---- KV cache ---------------------------------------------------------------------------------------------


class KVCache(nn.Module):
    """Preallocated keys/values (after RoPE) indexed by absolute position, one row per sequence slot.

    A cache decides how attention reads it (`attend`); herd.kv_cache.PagedKVCache is the paged form the serving
    engine uses, with the same methods."""

    def __init__(self, batch: int, max_seq_len: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_len: int):
        # input_pos: (B, T); k, v: (B, T, n_kv, hd) -> cache views (B, n_kv, kv_len, hd)
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        self.k[rows, :, input_pos] = k.to(self.k.dtype)
        self.v[rows, :, input_pos] = v.to(self.v.dtype)
        return self.k[: k.shape[0], :, :kv_len], self.v[: k.shape[0], :, :kv_len]

    def attend(self, q, k, v, input_pos, mask, kv_len, pages, sdpa):
        """Write this step's k, v (B, T, n_kv, hd) at their positions, then q (B, H, T, hd) attends over the first
        kv_len slots under `mask` (`pages` is the paged cache's; unused here)."""
        k, v = self.update(input_pos, k, v, kv_len)  # (B, n_kv, S, hd)
        return sdpa(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                    enable_gqa=k.shape[1] != q.shape[1])


# ---- the blocks -------------------------------------------------------------------------------------------


class Attention(nn.Module):
    # the attention function, SDPA's signature; code outside the model may set another on an instance (herd's CPU
    # decode kernel does, in kernels.use_cpu_kernels)
    sdpa = staticmethod(F.scaled_dot_product_attention)

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * self.head_dim, args.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x, cos, sin, input_pos=None, mask=None, kv_len=None, pages=None):
        bsz, seqlen, _ = x.shape
        q = self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q = q.transpose(1, 2)  # (B, H, T, hd)
        # GQA: KV head j serves query heads j*n_rep ... (j+1)*n_rep-1, Meta's repeat_kv order.
        if self.cache is not None:
            out = self.cache.attend(q, k, v, input_pos, mask, kv_len, pages, self.sdpa)
        else:
            out = self.sdpa(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                            is_causal=mask is None and seqlen > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attention = Attention(args)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x, cos, sin, input_pos=None, mask=None, kv_len=None, pages=None):
        h = x + self.attention(self.attention_norm(x), cos, sin, input_pos, mask, kv_len, pages)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        kv_len: int | None = None,
        logits_idx: torch.Tensor | None = None,
        pages: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits (float32) for `tokens`.

        Args:
            tokens: (B, T) token ids.
            input_pos: absolute positions, (B, T) or (T,); defaults to 0..T-1. With a KV cache these are also the
                cache slots written, so ragged batches simply give each row its own positions.
            mask: optional attention mask, bool (B, 1, T, S), True = may attend. Without a cache, or with a cache
                and no input_pos (a prefill from position 0), the default is causal; with a cache and input_pos it
                is "key position <= query position" over the first kv_len slots.
            kv_len: number of cache slots to attend over (default: all; T for a prefill without input_pos);
                decode passes max(position) + 1.
            logits_idx: optional (B, K) indices along T; only those positions go through the output head.
            pages: for a paged cache (herd.kv_cache): (block_table (B, max_blocks) int32, seq_lens (B,) int32);
                the cache builds its own masks from them and input_pos.
        Returns:
            (B, T, vocab) or (B, K, vocab) float32 logits.
        """
        bsz, seqlen = tokens.shape
        from_start = input_pos is None
        if from_start:
            input_pos = torch.arange(seqlen, device=tokens.device)
        if input_pos.dim() == 1:
            input_pos = input_pos[None].expand(bsz, seqlen)
        cos, sin = rope_cos_sin(input_pos, rope_frequencies(self.args, tokens.device))
        caching = self.layers[0].attention.cache is not None
        if caching and pages is None:
            kv_len = kv_len or self.layers[0].attention.cache.capacity
            if from_start and mask is None:  # a prefill from position 0: causal over the slots just written
                kv_len = seqlen
            elif mask is None:
                slots = torch.arange(kv_len, device=tokens.device)
                mask = slots[None, None, None, :] <= input_pos[:, None, :, None]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, input_pos if caching else None, mask, kv_len, pages)
        if logits_idx is not None:
            h = h.gather(1, logits_idx[..., None].expand(-1, -1, h.shape[-1]))
        return self.output(self.norm(h)).float()

    def setup_caches(self, max_batch_size: int, max_seq_len: int, dtype=None, device=None) -> None:
        """Allocate a KV cache of (max_batch_size, max_seq_len) in every attention layer."""
        if max_seq_len > self.args.max_seq_len:
            raise ValueError(f"cache length {max_seq_len} exceeds the model context {self.args.max_seq_len}")
        p = self.tok_embeddings.weight
        for layer in self.layers:
            attn = layer.attention
            attn.cache = KVCache(
                max_batch_size, max_seq_len, attn.n_kv_heads, attn.head_dim, dtype or p.dtype, device or p.device
            )

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Fresh weights for pretraining: normal(0, std), output projections scaled by depth (GPT-2 / torchtitan)."""
        out_std = std / (2 * self.args.n_layers) ** 0.5
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                s = out_std if name.endswith(("wo.weight", "w2.weight")) else std
                p.normal_(0.0, s, generator=generator)
