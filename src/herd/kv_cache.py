"""The paged KV cache: one pool of fixed-size blocks per layer, block tables per sequence, automatic prefix caching.

Memory is a pool of `num_blocks` blocks of `block_size` token slots (every layer has its own keys/values pool with
the same block ids). A sequence owns a list of block ids, its block table: token position p lives in block
`table[p // block_size]` at offset `p % block_size`. So the number of sequences that fit is bounded by the tokens
they hold, not by `max_batch x max_seq_len`.

Prefix caching: a block whose slots are all written is *full*, and is keyed by a chained hash of the token ids it
holds, h_i = sha256(h_(i-1) + ids of block i) (a cryptographic hash: vLLM's use of Python's hash() for this key was
CVE-2025-25183, a collision lets one user's prompt read another's cache). A new sequence whose prompt starts with
the same tokens takes those blocks instead of recomputing them (reference-counted, never written again); a block
nobody references stays cached until its slot is needed, least recently used first.

Block 0 is scratch: never handed out, it takes the writes of padding rows and positions no sequence owns.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .kernels import paged_decode_attention

SCRATCH = 0


class CacheFullError(RuntimeError):
    """The pool has no free block (the engine then preempts a sequence)."""


def block_hashes(ids: Sequence[int], block_size: int, parent: bytes = b"") -> list[bytes]:
    """Chained sha256 keys of the full blocks of `ids` (a trailing partial block has none)."""
    out = []
    for i in range(0, len(ids) - block_size + 1, block_size):
        parent = hashlib.sha256(parent + struct.pack(f"<{block_size}q", *ids[i : i + block_size])).digest()
        out.append(parent)
    return out


class BlockPool:
    """Block ids, reference counts and the prefix cache (host-side bookkeeping; the tensors are PagedKVCache's).

    A block is in use (refcount > 0), or free: free blocks wait in LRU order, and a free block that still holds a
    cached prefix keeps its hash until it is handed out again (eviction)."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_cache: bool = True):
        if num_blocks < 2:
            raise ValueError(f"the KV cache needs at least 2 blocks (1 is scratch), got {num_blocks}")
        if block_size < 1 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        self.num_blocks, self.block_size, self.prefix_cache = num_blocks, block_size, prefix_cache
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, bytes] = {}
        self.by_hash: dict[bytes, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))  # LRU first
        self.hits = self.queries = self.evictions = 0  # prefix-cache counters (tokens hit / asked, blocks evicted)
        self.n_cached = 0  # free blocks that still hold a reusable prefix (kept as a count: other threads read it)

    @property
    def usable(self) -> int:
        return self.num_blocks - 1

    @property
    def n_free(self) -> int:
        return len(self.free)

    def allocate(self) -> int:
        if not self.free:
            raise CacheFullError("no free KV-cache block")
        block, _ = self.free.popitem(last=False)
        h = self.hash_of.pop(block, None)
        if h is not None:
            del self.by_hash[h]
            self.evictions += 1
            self.n_cached -= 1
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference to each block; unreferenced ones become free (most recently used last)."""
        for b in reversed(blocks):  # a sequence's last blocks are the least likely to be shared: evicted first
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free[b] = None  # a cached prefix goes to the most recently used end
                if b in self.hash_of:
                    self.n_cached += 1
                else:  # nothing to reuse in it: handed out first
                    self.free.move_to_end(b, last=False)

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The blocks of the longest cached prefix of `hashes`, each now referenced once more."""
        out = []
        if self.prefix_cache:
            for h in hashes:
                b = self.by_hash.get(h)
                if b is None:
                    break
                out.append(b)
        for b in out:
            if self.refs[b] == 0:
                del self.free[b]
                self.n_cached -= 1
            self.refs[b] += 1
        self.queries += len(hashes) * self.block_size
        self.hits += len(out) * self.block_size
        return out

    def register(self, block: int, h: bytes) -> None:
        """Key a block that has just become full (a block with the same key already cached stays the one)."""
        if self.prefix_cache and h not in self.by_hash and block not in self.hash_of:
            self.by_hash[h] = block
            self.hash_of[block] = h


class PagedKVCache(nn.Module):
    """One layer's keys/values pool, (num_blocks, n_kv_heads, block_size, head_dim); `attend` is model.py's cache
    interface (KVCache.attend) for a paged cache: `pages` = (block_table (B, max_blocks) int32, seq_lens (B,) int32)."""

    def __init__(self, num_blocks: int, block_size: int, n_kv_heads: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (num_blocks, n_kv_heads, block_size, head_dim)
        self.block_size = block_size
        # uninitialised: the memory of a block is committed when it is first written, and no read ever looks past a
        # sequence's length (the decode kernel stops there; the gathers below and in the reference zero those slots)
        self.register_buffer("k_pool", torch.empty(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_pool", torch.empty(shape, dtype=dtype, device=device), persistent=False)

    @property
    def capacity(self) -> int:
        return self.k_pool.shape[0] * self.block_size

    def attend(self, q, k, v, input_pos, mask, kv_len, pages, sdpa):
        """Write k, v (B, T, n_kv, hd) at input_pos (B, T) through the block tables, then attend: a one-token step
        reads the blocks in place (herd.kernels.paged_decode_attention); a longer chunk gathers its rows' blocks
        and runs SDPA with "key position <= query position" (positions past a row's length are never read)."""
        table, seq_lens = pages
        bs = self.block_size
        blocks = table.long().gather(1, torch.div(input_pos, bs, rounding_mode="floor"))
        offsets = input_pos % bs
        self.k_pool[blocks, :, offsets] = k.to(self.k_pool.dtype)
        self.v_pool[blocks, :, offsets] = v.to(self.v_pool.dtype)
        if q.shape[2] == 1 and mask is None:
            return paged_decode_attention(q, self.k_pool, self.v_pool, table, seq_lens)
        kv_len = kv_len or int(seq_lens.max())
        n = -(-kv_len // bs)
        ids = table[:, :n].long()
        slots = torch.arange(kv_len, device=q.device)
        valid = (slots[None, :] < seq_lens[:, None])[:, None, :, None]  # (B, 1, kv_len, 1): written slots
        kk = self.k_pool[ids].transpose(1, 2).flatten(2, 3)[:, :, :kv_len]  # (B, n_kv, n*bs, hd) -> kv_len slots
        vv = self.v_pool[ids].transpose(1, 2).flatten(2, 3)[:, :, :kv_len]
        kk, vv = kk.masked_fill(~valid, 0), vv.masked_fill(~valid, 0)  # never-written slots may hold NaN
        if mask is None:
            mask = valid[:, :, None, :, 0] & (slots[None, None, None, :] <= input_pos[:, None, :, None])
        return F.scaled_dot_product_attention(q, kk.to(q.dtype), vv.to(q.dtype), attn_mask=mask,
                                              enable_gqa=kk.shape[1] != q.shape[1])


def kv_bytes_per_block(model, block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers (keys and values)."""
    a = model.layers[0].attention
    return 2 * len(model.layers) * a.n_kv_heads * block_size * a.head_dim * dtype.itemsize


def install(model, num_blocks: int, block_size: int, dtype=None, device=None) -> list[PagedKVCache]:
    """Give every attention layer of `model` a paged cache of `num_blocks` blocks (replacing any cache)."""
    p = model.tok_embeddings.weight
    caches = []
    for layer in model.layers:
        a = layer.attention
        a.cache = PagedKVCache(num_blocks, block_size, a.n_kv_heads, a.head_dim, dtype or p.dtype, device or p.device)
        caches.append(a.cache)
    return caches
