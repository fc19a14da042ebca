"""herd.kv_cache: the block pool's bookkeeping (references, LRU, prefix keys) and the paged cache against the
contiguous one."""

import hashlib
import struct

import pytest
import torch
from conftest import tiny_model

from herd.kv_cache import SCRATCH, BlockPool, CacheFullError, block_hashes, install


def test_block_keys_are_a_sha256_chain_of_the_ids():
    ids = list(range(10))
    h = block_hashes(ids, 4)
    assert len(h) == 2  # the partial third block has no key
    first = hashlib.sha256(struct.pack("<4q", 0, 1, 2, 3)).digest()
    assert h[0] == first and h[1] == hashlib.sha256(first + struct.pack("<4q", 4, 5, 6, 7)).digest()
    # a block's key depends on everything before it: the same ids after another prefix get another key
    assert block_hashes([9, 9, 9, 9, 4, 5, 6, 7], 4)[1] != h[1]
    assert block_hashes(ids[4:8], 4, parent=first) == h[1:]


def test_allocation_references_and_scratch():
    pool = BlockPool(5, 4)
    got = [pool.allocate() for _ in range(4)]
    assert sorted(got) == [1, 2, 3, 4] and SCRATCH not in got  # block 0 is never handed out
    with pytest.raises(CacheFullError):
        pool.allocate()
    pool.release(got[:2])
    assert pool.n_free == 2
    with pytest.raises(ValueError, match="power of two"):
        BlockPool(4, 6)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        BlockPool(1, 4)


def test_prefix_match_takes_references_and_lru_evicts_the_oldest():
    pool = BlockPool(6, 4)
    a, b = block_hashes(list(range(8)), 4), block_hashes(list(range(100, 108)), 4)
    blocks_a = [pool.allocate(), pool.allocate()]
    for blk, h in zip(blocks_a, a):
        pool.register(blk, h)
    pool.release(blocks_a)
    blocks_b = [pool.allocate(), pool.allocate()]
    for blk, h in zip(blocks_b, b):
        pool.register(blk, h)
    pool.release(blocks_b)
    assert pool.n_free == 5 and pool.n_cached == 4
    hit = pool.match(a + block_hashes([7, 7, 7, 7], 4))  # a's two blocks, then a miss
    assert hit == blocks_a and all(pool.refs[x] == 1 for x in hit) and pool.n_free == 3
    assert (pool.hits, pool.queries) == (8, 12)
    pool.release(hit)
    # three allocations: the uncached block first, then the least recently used cached prefix (b, released before
    # a's second use)
    fresh = [pool.allocate() for _ in range(3)]
    assert set(fresh) >= set(blocks_b[-1:]) and pool.evictions == 2
    assert pool.match(a) == blocks_a  # a, used most recently, is still cached
    assert pool.match(b) == []


def test_prefix_cache_off_never_matches():
    pool = BlockPool(4, 4, prefix_cache=False)
    blk = pool.allocate()
    h = block_hashes([1, 2, 3, 4], 4)
    pool.register(blk, h[0])
    pool.release([blk])
    assert pool.match(h) == [] and pool.n_cached == 0


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_equals_the_contiguous_cache(block_size):
    """The same prefill + decode through a paged cache with a shuffled block table and through model.py's
    contiguous KVCache give the same logits, whatever the never-written slots hold."""
    model = tiny_model(std=0.3, seed=0)
    tokens = torch.randint(0, model.args.vocab_size, (2, 11))
    with torch.no_grad():
        model.setup_caches(2, 32)
        want_pre = model(tokens, torch.arange(11)[None].expand(2, -1), kv_len=11)
        want_dec = model(tokens[:, :1], torch.tensor([[11], [11]]), kv_len=12)
        n_blocks = 2 * (-(-12 // block_size)) + 1
        for cache in install(model, n_blocks, block_size):  # the pools are uninitialised: say they hold NaN
            cache.k_pool.fill_(float("nan"))
            cache.v_pool.fill_(float("nan"))
        g = torch.Generator().manual_seed(0)
        order = (torch.randperm(n_blocks - 1, generator=g) + 1).to(torch.int32)  # any blocks, any order
        per_row = -(-12 // block_size)
        table = torch.stack([order[:per_row], order[per_row : 2 * per_row]])
        lens = torch.tensor([11, 11], dtype=torch.int32)
        got_pre = model(tokens, torch.arange(11)[None].expand(2, -1), kv_len=11, pages=(table, lens))
        got_dec = model(tokens[:, :1], torch.tensor([[11], [11]]), pages=(table, lens + 1))
    torch.testing.assert_close(got_pre, want_pre, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_dec, want_dec, atol=1e-5, rtol=1e-5)
