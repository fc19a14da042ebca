"""herd.sampling: parameter checks, the filters (top-k, min-p, top-p), the draw against the distribution,
penalties, and the chosen log-probabilities the CLI and the server share."""

import pytest
import torch

from herd.sampling import GenerationError, SamplingParams, apply_penalties, chosen_logprobs, logits_to_probs, sample


@pytest.mark.parametrize("kw, match", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"min_p": 1}, "min_p"), ({"top_k": -2}, "top_k"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"temperature": float("nan")}, "temperature"), ({"seed": 1.5}, "seed"),
])
def test_bad_sampling_params(kw, match):
    with pytest.raises(GenerationError, match=match):
        SamplingParams(**kw)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert (logits_to_probs(logits, SamplingParams(temperature=1, top_p=1, top_k=2)) > 0).tolist() == [
        [True, True, False, False, False]]
    # top-p 0.5: the first token alone holds 0.64 of the mass, so it is kept and nothing after it
    assert (logits_to_probs(logits, SamplingParams(temperature=1, top_p=0.5)) > 0).sum() == 1
    # min-p 0.3: keep p >= 0.3 * p_max; p = [.64, .24, .087, .032, .012]
    assert (logits_to_probs(logits, SamplingParams(temperature=1, top_p=1, min_p=0.3)) > 0).sum() == 2
    # top_k 1 is greedy whatever the seed
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(4, 50, generator=g)
    p = SamplingParams(temperature=2.0, top_k=1)
    assert torch.equal(sample(noisy, p, g), noisy.argmax(-1))


def test_sampling_follows_the_distribution():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    draws = sample(logits, SamplingParams(temperature=1, top_p=1), g)
    freq = torch.bincount(draws, minlength=3).float() / len(draws)
    assert freq.tolist() == pytest.approx([0.5, 0.3, 0.2], abs=0.015)


def test_penalties():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    counts = torch.tensor([[1, 0, 2, 0]], dtype=torch.int32)
    in_prompt = torch.tensor([[False, True, False, False]])
    out = apply_penalties(logits, counts, in_prompt, SamplingParams(repetition_penalty=2.0))
    assert out.tolist() == [[1.0, -4.0, 0.5, 0.5]]  # seen: positive logits halved, negative doubled
    out = apply_penalties(logits, counts, in_prompt, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25))
    assert out.tolist() == [[2.0 - 0.5 - 0.25, -2.0, 1.0 - 0.5 - 0.5, 0.5]]  # prompt tokens are not "generated"


def test_chosen_logprobs_are_the_raw_log_softmax():
    """The log-probabilities reported for a chosen token (and the top k) come from the raw logits, whatever
    penalties or temperature chose it."""
    g = torch.Generator().manual_seed(0)
    raw = torch.randn(3, 50, generator=g) * 3
    chosen = torch.tensor([4, 17, 49])
    lp, top = chosen_logprobs(raw, chosen, 5)
    ref = torch.log_softmax(raw.double(), dim=-1)
    assert torch.allclose(lp.double(), ref[torch.arange(3), chosen], atol=1e-6)
    assert torch.equal(top.indices, ref.topk(5, dim=-1).indices)
    assert torch.allclose(top.values.double(), ref.topk(5, dim=-1).values, atol=1e-6)
    lp_only, none = chosen_logprobs(raw.bfloat16(), chosen)
    assert none is None and lp_only.dtype == torch.float32
