"""Generation engine: cache vs full recompute, transformers parity, ragged batches, sampling, stops, limits."""

import functools

import pytest
import torch
from conftest import herd_from_hf, hf_model
from conftest import tiny_model as _tiny_model

from herd.config import get_config
from herd.generate import ContextLengthError, Engine, StopStrings
from herd.sampling import GenerationError, SamplingParams

GREEDY = SamplingParams(temperature=0)


# a larger init than pretraining's 0.02 gives peaked logits, so greedy ids are not decided by rounding noise
tiny_model = functools.partial(_tiny_model, std=0.3, seed=0)


def run(engine, prompts, params=GREEDY, **kw) -> list[list[int]]:
    rows = [[] for _ in prompts]
    for step in engine.generate(prompts, params, **kw):
        for i, t in enumerate(step.tokens):
            if t is not None:
                rows[i].append(t)
    return rows


@torch.no_grad()
def recompute_greedy(model, prompt, n) -> tuple[list[int], list[float]]:
    """The reference: a full forward over the whole sequence for every new token (no cache)."""
    model.clear_caches()
    ids, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids], device=model.output.weight.device))[0, -1]
        ids.append(int(logits.argmax()))
        lps.append(torch.log_softmax(logits, -1)[ids[-1]].item())
    return ids[len(prompt):], lps


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_cached_greedy_equals_full_recompute(name, device):
    model = tiny_model(name).to(device)
    prompt = [5, 17, 300, 42, 9, 77, 123]
    got = run(Engine(model), [prompt], max_new_tokens=40)[0]
    ref, _ = recompute_greedy(model, prompt, 40)
    assert got == ref
    assert len(set(got)) > 5  # a non-degenerate sequence


def test_greedy_ids_equal_transformers_generate(device):
    args = get_config("tiny")
    hf = hf_model(args).to(device)
    with torch.no_grad():  # scale the random weights up so the argmax margins are far above fp32 noise
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.mul_(10)
    model = herd_from_hf(hf, args)
    prompt = [1, 20, 300, 4, 55, 6]
    n = 40
    model.to(device)
    theirs = hf.generate(torch.tensor([prompt], device=device), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         pad_token_id=0)[0, len(prompt):].tolist()
    ours = run(Engine(model.eval()), [prompt], max_new_tokens=n)[0]
    assert ours == theirs
    assert len(set(ours)) > 5


def test_ragged_batch_equals_each_prompt_alone(device):
    model = tiny_model().to(device)
    engine = Engine(model)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [100], [50, 60, 70, 80]]
    batch = run(engine, prompts, max_new_tokens=24)
    alone = [run(engine, [p], max_new_tokens=24)[0] for p in prompts]
    assert batch == alone
    # and each equals the no-cache reference
    assert batch[1] == recompute_greedy(model, prompts[1], 24)[0]


def test_ragged_batch_with_early_stop_and_penalties():
    model = tiny_model()
    engine = Engine(model)
    prompts = [[3, 4, 5, 6, 7, 8], [100, 101]]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)
    alone = [run(engine, [p], params, max_new_tokens=16)[0] for p in prompts]
    stop = alone[0][3]  # row 0 stops at its 4th token; row 1 carries on
    alone_stopped = [run(engine, [p], params, max_new_tokens=16, stop_tokens=[stop])[0] for p in prompts]
    batch = run(engine, prompts, params, max_new_tokens=16, stop_tokens=[stop])
    assert batch == alone_stopped
    assert batch[0][-1] == stop and len(batch[0]) == alone[0].index(stop) + 1


def test_seeded_sampling_is_reproducible(device):
    model = tiny_model(std=0.1).to(device)
    engine = Engine(model)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=100, min_p=0.01, seed=1234)
    a = run(engine, [[1, 2, 3]], p, max_new_tokens=30)
    b = run(engine, [[1, 2, 3]], p, max_new_tokens=30)
    c = run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.95, top_k=100, min_p=0.01, seed=99),
            max_new_tokens=30)
    assert a == b
    assert a != c
    torch.manual_seed(7)  # without a seed, torch's global seed decides
    d = run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0), max_new_tokens=10)
    torch.manual_seed(7)
    assert d == run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0), max_new_tokens=10)


def test_context_overflow_is_a_clear_error():
    model = tiny_model(max_seq_len=64)
    with pytest.raises(ContextLengthError, match=r"prompt of 50 tokens \+ max_new_tokens 20 = 70 tokens exceeds .* 64"):
        run(Engine(model), [list(range(50))], max_new_tokens=20)
    assert run(Engine(model), [list(range(50))], max_new_tokens=14)  # exactly fits
    with pytest.raises(ContextLengthError, match="limit of 32 tokens"):
        run(Engine(model, max_seq_len=32), [list(range(20))], max_new_tokens=13)


@pytest.mark.parametrize("prompts, kw, match", [
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "no prompts"),
    ([[1, 600]], {}, "outside the vocabulary"),
    ([[1, -1]], {}, "outside the vocabulary"),
    ([[1]], {"max_new_tokens": 0}, "max_new_tokens"),
    ([[1]], {"top_logprobs": 50}, "top_logprobs"),
])
def test_bad_requests(prompts, kw, match):
    with pytest.raises(GenerationError, match=match):
        run(Engine(tiny_model()), prompts, **kw)


def test_logprobs_are_the_raw_model_distribution():
    model = tiny_model()
    prompt = [7, 8, 9]
    steps = list(Engine(model).generate([prompt], GREEDY, max_new_tokens=12, logprobs=True, top_logprobs=3))
    ids = [s.tokens[0] for s in steps]
    ref_ids, ref_lps = recompute_greedy(model, prompt, 12)
    assert ids == ref_ids
    assert [s.logprobs[0] for s in steps] == pytest.approx(ref_lps, abs=1e-4)
    for s in steps:  # greedy: the chosen token is the most likely one
        top = s.top_logprobs[0]
        assert len(top) == 3 and max(top, key=top.get) == s.tokens[0]


def test_stop_rows_end_a_row_from_outside():
    model = tiny_model()
    stop_rows: set[int] = set()
    rows = [[], []]
    for step in Engine(model).generate([[1, 2], [3, 4]], GREEDY, max_new_tokens=10, stop_rows=stop_rows):
        for i, t in enumerate(step.tokens):
            if t is not None:
                rows[i].append(t)
        if len(rows[0]) == 2:
            stop_rows.add(0)
    assert len(rows[0]) == 2 and len(rows[1]) == 10


def test_stats_and_finish_reasons():
    model = tiny_model()
    engine = Engine(model)
    steps = list(engine.generate([[1, 2, 3]], GREEDY, max_new_tokens=5))
    assert [s.finish[0] for s in steps] == [None] * 4 + ["length"]
    s = engine.last_stats
    assert s["prompt_tokens"] == 3 and s["generated_tokens"] == 5 and s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0


def test_cache_is_reused_and_grown():
    model = tiny_model()
    engine = Engine(model)
    run(engine, [[1, 2, 3]], max_new_tokens=4)
    first = model.layers[0].attention.cache
    run(engine, [[1, 2]], max_new_tokens=3)
    assert model.layers[0].attention.cache is first  # big enough: kept
    run(engine, [[1, 2], [3]], max_new_tokens=30)
    assert model.layers[0].attention.cache.k.shape[:3:2] == (2, 32)


@pytest.mark.parametrize("deltas, stops, want, hit", [
    (["Hello wor", "ld! more"], ["world"], "Hello ", "world"),
    (["abc", "de", "f"], ["xyz"], "abcdef", None),
    (["a<", "/s", "> tail"], ["</s>"], "a", "</s>"),
    (["a<", "b"], ["</s>"], "a<b", None),  # held back, then released
    (["xx END yy END"], ["END", "yy"], "xx ", "END"),
])
def test_stop_strings(deltas, stops, want, hit):
    cut = StopStrings(stops)
    text = ""
    for d in deltas:
        out, found = cut.feed(d)
        text += out
        if found:
            break
    text += cut.flush()
    assert text == want and cut.hit == hit


def test_compiled_decode_matches_eager(device):
    model = tiny_model().to(device)
    prompts = [[9, 8, 7, 6], [1, 2]]
    eager = [run(Engine(model), [p], max_new_tokens=12)[0] for p in prompts]
    model.clear_caches()
    engine = Engine(model, compile=True, min_kv_bucket=32)
    assert run(engine, prompts[:1], max_new_tokens=12) == eager[:1]
    assert run(engine, prompts, max_new_tokens=12) == eager  # a new batch size: a new cache and graph


def test_overlapped_steps_give_the_same_outputs(device):
    """overlap=True (the GPU default: step n+1 is launched before step n's tokens are read) changes nothing that
    the caller sees: tokens, logprobs, finish reasons, penalties, stop tokens and rows stopped from outside."""
    model = tiny_model().to(device)
    prompts = [[3, 4, 5, 6, 7, 8], [100, 101], [9]]
    params = SamplingParams(temperature=0.8, top_k=50, repetition_penalty=1.2, presence_penalty=0.3, seed=5)
    outs = []
    for overlap in (False, True):
        engine = Engine(model, overlap=overlap)
        first = run(engine, prompts, params, max_new_tokens=12)[0]
        steps = []
        stop_rows: set[int] = set()
        for step in engine.generate(prompts, params, max_new_tokens=12, stop_tokens=[first[5]], logprobs=True,
                                    top_logprobs=3, stop_rows=stop_rows):
            steps.append(step)
            if len(steps) == 4:
                stop_rows.add(2)  # e.g. a stop string matched in row 2
        outs.append(steps)
    assert outs[0] == outs[1]
    assert any(f == "stop" for s in outs[0] for f in s.finish)
    assert outs[0][-1].tokens[2] is None and len(outs[0]) > 4
