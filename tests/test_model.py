"""Parity of herd's model with transformers' LlamaForCausalLM on tiny random weights (the oracle)."""

import pytest
import torch
from conftest import herd_from_hf, hf_model

from herd.config import get_config
from herd.model import Transformer, rope_frequencies

# GQA, llama3 rope scaling with factor 8 and 32, tied and untied, plain MHA.
PARITY_CONFIGS = {
    "gqa-factor8-untied": get_config("tiny"),
    "gqa-factor32-tied": get_config("tiny-tied"),
    "mha-3layers": get_config("tiny").replace(n_heads=2, n_kv_heads=2, n_layers=3, dim=48),
    "gqa-8to1-hd32": get_config("tiny").replace(dim=128, n_heads=4, n_kv_heads=1, multiple_of=64),
    "no-rope-scaling": get_config("tiny").replace(use_scaled_rope=False, rope_theta=10000.0),
}


@pytest.mark.parametrize("name", list(PARITY_CONFIGS))
def test_logits_match_transformers(name, device):
    args = PARITY_CONFIGS[name]
    hf = hf_model(args).to(device)
    ours = herd_from_hf(hf, args).to(device)
    tokens = torch.randint(0, args.vocab_size, (2, 33), device=device)
    with torch.no_grad():
        ref = hf(tokens).logits
        got = ours(tokens)
        assert got.dtype == torch.float32
        assert (got - ref).abs().max() <= 1e-5
        # positions past the original 8192 context, up to the 131,072 limit
        for start in (8190, 65536, 131072 - 33):
            pos = torch.arange(start, start + 33, device=device)[None].expand(2, -1)
            ref = hf(tokens, position_ids=pos).logits
            assert (ours(tokens, input_pos=pos) - ref).abs().max() <= 1e-5, start


@pytest.mark.parametrize("name", ["gqa-factor8-untied", "gqa-factor32-tied"])
def test_kv_cache_at_long_offsets(name):
    """Prefill then one-token decode steps at positions beyond 8192 equal the full forward of transformers."""
    args = PARITY_CONFIGS[name]
    hf = hf_model(args)
    ours = herd_from_hf(hf, args)
    start, n, prefill = 100_000, 20, 12
    tokens = torch.randint(0, args.vocab_size, (1, n))
    pos = torch.arange(start, start + n)[None]
    with torch.no_grad():
        ref = hf(tokens, position_ids=pos).logits
        # cache slots are positions: allocate up to start + n, prefill at the offset, then decode
        ours.setup_caches(1, start + n)
        # earlier slots stay zero and are masked out only if they are after the query; give the prompt its own
        # context by attending from `start` on with an explicit mask
        slots = torch.arange(start + n)
        outs = []
        mask = (slots[None, None, None, :] >= start) & (slots[None, None, None, :] <= pos[:, None, :prefill, None])
        outs.append(ours(tokens[:, :prefill], input_pos=pos[:, :prefill], mask=mask))
        for t in range(prefill, n):
            m = (slots >= start) & (slots <= start + t)
            outs.append(ours(tokens[:, t : t + 1], input_pos=pos[:, t : t + 1], mask=m[None, None, None, :]))
        got = torch.cat(outs, dim=1)
        ours.clear_caches()
    assert (got - ref).abs().max() <= 1e-5


def test_cached_decode_equals_full_forward_ragged_rows():
    args = get_config("tiny")
    model = Transformer(args).eval()
    model.init_weights()
    a, b = torch.randint(0, 512, (1, 14)), torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        full_a, full_b = model(a), model(b)
        # one batch, rows of different lengths: right-padded prefill, each row at its own positions
        model.setup_caches(2, 32)
        batch = torch.zeros(2, 6, dtype=torch.long)
        batch[0], batch[1] = a[0, :6], b[0, :6]
        model(batch, input_pos=torch.arange(6))
        pos = torch.tensor([[6], [6]])
        steps_a, steps_b = [], []
        for t in range(6, 9):
            out = model(torch.stack([a[:, t], b[:, t]]), input_pos=pos, kv_len=t + 1)
            steps_a.append(out[0, -1])
            steps_b.append(out[1, -1])
            pos = pos + 1
    assert (torch.stack(steps_a) - full_a[0, 6:9]).abs().max() < 1e-5
    assert (torch.stack(steps_b) - full_b[0, 6:9]).abs().max() < 1e-5


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "llama-3.2-3b"])
def test_rope_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    args = get_config(name)
    cfg = LlamaConfig(**args.to_hf())
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scale == 1.0
    torch.testing.assert_close(rope_frequencies(args), ref.float(), rtol=0, atol=0)
    # the 3.2 factor matters: 32 and 8 give different low frequencies
    if args.rope_scale_factor == 32.0:
        assert not torch.equal(rope_frequencies(args), rope_frequencies(args.replace(rope_scale_factor=8.0)))


def test_trainable_and_bf16():
    args = get_config("tiny")
    model = Transformer(args)
    model.init_weights()
    tokens = torch.randint(0, 512, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    with torch.no_grad():
        ref = model(tokens)
        out = model.to(torch.bfloat16)(tokens)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1


def test_logits_idx_selects_positions():
    args = get_config("tiny")
    model = Transformer(args).eval()
    tokens = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        full = model(tokens)
        part = model(tokens, logits_idx=torch.tensor([[9], [4]]))
    # same rows up to matmul blocking (a different batch shape may reorder the float sums)
    torch.testing.assert_close(part[:, 0], torch.stack([full[0, 9], full[1, 4]]), rtol=0, atol=1e-6)
