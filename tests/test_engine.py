"""The one engine (herd.engine): cache vs full recompute, transformers parity, ragged and continuous batches,
sampling, stops, limits, the paged KV cache (paging, preemption, eviction), prefix reuse, the compiled step."""

import functools

import pytest
import torch
from conftest import herd_from_hf, hf_model
from conftest import tiny_model as _tiny_model

from herd.config import get_config
from herd.engine import ContextLengthError, Engine, GenRequest, run_stats
from herd.sampling import GenerationError, SamplingParams

GREEDY = SamplingParams(temperature=0)

# a larger init than pretraining's 0.02 gives peaked logits, so greedy ids are not decided by rounding noise
tiny_model = functools.partial(_tiny_model, std=0.3, seed=0)


def make_engine(model, **kw) -> Engine:
    from herd.tokenizer import Tokenizer

    vocab = {bytes([b]): b for b in range(256)}
    return Engine(model, Tokenizer(vocab), **kw)


def run(engine, prompts, params=GREEDY, max_tokens=16, events=False, stop_token_ids=(), **kw):
    """Token ids per prompt (all added at once, stepped until done); with events=True the events too. No stop
    tokens unless given (the tiny models' random weights would hit the byte vocabulary's specials)."""
    seqs = [engine.add(GenRequest(list(p), max_tokens, params, stop_token_ids=list(stop_token_ids), **kw))
            for p in prompts]
    evs = {s.id: [] for s in seqs}
    while any(s.finished is None for s in seqs):
        for s, ev in engine.step():
            evs[s.id].append(ev)
    rows = [[e.token for e in evs[s.id] if e.token is not None] for s in seqs]
    return (rows, [evs[s.id] for s in seqs], seqs) if events else rows


@torch.no_grad()
def recompute_greedy(model, prompt, n) -> tuple[list[int], list[float]]:
    """The reference: a full forward over the whole sequence for every new token (no cache)."""
    cache = [layer.attention.cache for layer in model.layers]
    model.clear_caches()
    ids, lps = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids], device=model.output.weight.device))[0, -1]
        ids.append(int(logits.argmax()))
        lps.append(torch.log_softmax(logits, -1)[ids[-1]].item())
    for layer, c in zip(model.layers, cache):
        layer.attention.cache = c
    return ids[len(prompt):], lps


@pytest.mark.parametrize("name", ["tiny", "tiny-tied"])
def test_cached_greedy_equals_full_recompute(name, device):
    model = tiny_model(name).to(device)
    prompt = [5, 17, 300, 42, 9, 77, 123]
    got = run(make_engine(model, block_size=4), [prompt], max_tokens=40)[0]  # 47 tokens over 12 blocks
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
    ours = run(make_engine(model.eval()), [prompt], max_tokens=n)[0]
    assert ours == theirs
    assert len(set(ours)) > 5


def test_ragged_batch_equals_each_prompt_alone(device):
    model = tiny_model().to(device)
    engine = make_engine(model, block_size=4)
    prompts = [[3, 4, 5, 6, 7, 8, 9, 10, 11], [100], [50, 60, 70, 80]]
    batch = run(engine, prompts, max_tokens=24)
    alone = [run(engine, [p], max_tokens=24)[0] for p in prompts]
    assert batch == alone
    # and each equals the no-cache reference
    assert batch[1] == recompute_greedy(model, prompts[1], 24)[0]


def test_ragged_batch_with_early_stop_and_penalties():
    model = tiny_model()
    engine = make_engine(model)
    prompts = [[3, 4, 5, 6, 7, 8], [100, 101]]
    params = SamplingParams(temperature=0, repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.1)
    alone = [run(engine, [p], params)[0] for p in prompts]
    stop = alone[0][3]  # row 0 stops at its 4th token; row 1 carries on
    alone_stopped = [run(engine, [p], params, stop_token_ids=[stop])[0] for p in prompts]
    batch = run(engine, prompts, params, stop_token_ids=[stop])
    assert batch == alone_stopped
    assert batch[0][-1] == stop and len(batch[0]) == alone[0].index(stop) + 1


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(device):
    model = tiny_model(std=0.1).to(device)
    engine = make_engine(model)
    p = SamplingParams(temperature=1.0, top_p=0.95, top_k=100, min_p=0.01, seed=1234)
    a = run(engine, [[1, 2, 3]], p, max_tokens=30)
    b = run(engine, [[1, 2, 3]], p, max_tokens=30)
    c = run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0, top_p=0.95, top_k=100, min_p=0.01, seed=99),
            max_tokens=30)
    assert a == b
    assert a != c
    # a seeded request gives the same tokens whatever else runs beside it
    mixed = run(engine, [[9, 9], [1, 2, 3], [4]], p, max_tokens=30)
    assert mixed[1] == a[0]
    torch.manual_seed(7)  # without a seed, torch's global seed decides
    d = run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0), max_tokens=10)
    torch.manual_seed(7)
    assert d == run(engine, [[1, 2, 3]], SamplingParams(temperature=1.0), max_tokens=10)


def test_context_overflow_is_a_clear_error():
    model = tiny_model(max_seq_len=64)
    with pytest.raises(ContextLengthError, match=r"50 tokens and max_tokens is 20: 70 tokens exceed .* limit of 64"):
        run(make_engine(model), [list(range(50))], max_tokens=20)
    assert run(make_engine(model), [list(range(50))], max_tokens=14)  # exactly fits
    with pytest.raises(ContextLengthError, match="limit of 32 tokens"):
        run(make_engine(model, max_seq_len=32), [list(range(20))], max_tokens=13)
    # the KV pool is a limit too: 4 blocks of 4 slots (one is scratch) hold 12 tokens
    small = make_engine(model, block_size=4, kv_cache_gb=4 * make_engine(model, block_size=4).block_bytes / 2**30)
    with pytest.raises(ContextLengthError, match="limit of 12 tokens"):
        run(small, [list(range(10))], max_tokens=3)


@pytest.mark.parametrize("prompt, kw, match", [
    ([], {}, "empty prompt"),
    ([1, 600], {}, "outside the vocabulary"),
    ([1, -1], {}, "outside the vocabulary"),
    ([1], {"max_tokens": 0}, "max_tokens"),
    ([1], {"top_logprobs": 50}, "top_logprobs"),
])
def test_bad_requests(prompt, kw, match):
    engine = make_engine(tiny_model())
    with pytest.raises(GenerationError, match=match):
        engine.add(GenRequest(prompt, **{"max_tokens": 4, **kw}))
    assert not engine.has_work  # nothing was queued


def test_logprobs_are_the_raw_model_distribution():
    model = tiny_model()
    prompt = [7, 8, 9]
    rows, events, _ = run(make_engine(model), [prompt], max_tokens=12, logprobs=True, top_logprobs=3, events=True)
    ref_ids, ref_lps = recompute_greedy(model, prompt, 12)
    assert rows[0] == ref_ids
    assert [e.logprob for e in events[0]] == pytest.approx(ref_lps, abs=1e-4)
    for e in events[0]:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and max(e.top_logprobs, key=e.top_logprobs.get) == e.token


def test_abort_ends_a_sequence_from_outside_and_frees_its_blocks():
    engine = make_engine(tiny_model(), block_size=4)
    free = engine.pool.n_free
    a = engine.add(GenRequest([1, 2], 10, GREEDY, stop_token_ids=[]))
    b = engine.add(GenRequest([3, 4], 10, GREEDY, stop_token_ids=[]))
    got = {a.id: 0, b.id: 0}
    while b.finished is None:
        for s, ev in engine.step():
            got[s.id] += ev.token is not None
        if got[a.id] == 2 and a.finished is None:
            engine.abort(a)
    assert got == {a.id: 2, b.id: 10} and a.finished == "abort" and b.finished == "length"
    assert engine.pool.n_free == free and not engine.has_work


def test_stats_and_finish_reasons():
    engine = make_engine(tiny_model())
    rows, events, seqs = run(engine, [[1, 2, 3]], max_tokens=5, events=True)
    assert [e.finish for e in events[0]] == [None] * 4 + ["length"]
    s = run_stats(seqs)
    assert s["prompt_tokens"] == 3 and s["generated_tokens"] == 5 and s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0


def test_chunked_prefill_of_a_long_prompt_equals_one_pass():
    model = tiny_model()
    prompt = list(range(1, 60))
    whole = run(make_engine(model, block_size=8), [prompt], max_tokens=10)
    chunked = run(make_engine(model, block_size=8, prefill_chunk=7), [prompt], max_tokens=10)
    assert whole == chunked == [recompute_greedy(model, prompt, 10)[0]]


# ---- paging, preemption, prefix caching ----------------------------------------------------------------------


def test_concurrency_is_bounded_by_tokens_in_use_not_by_max_len():
    """A pool of 40 blocks x 4 slots (160 tokens) runs 12 short sequences at once even though one sequence may
    be 64 tokens long: a row-per-sequence cache of max_batch x max_seq_len would need 768 slots."""
    model = tiny_model(max_seq_len=64)
    probe = make_engine(model, block_size=4)
    engine = make_engine(model, block_size=4, max_batch=12, kv_cache_gb=41 * probe.block_bytes / 2**30)
    assert engine.pool.usable == 40
    prompts = [[i + 1, i + 2] for i in range(12)]
    seqs = [engine.add(GenRequest(p, 6, GREEDY, stop_token_ids=[])) for p in prompts]
    engine.step()
    assert len(engine.running) == 12 and engine.pool.n_free == 40 - 12  # one block each
    while engine.has_work:
        engine.step()
    assert engine.preemptions == 0 and all(s.finished == "length" for s in seqs)


def test_preempted_sequences_resume_to_the_same_output():
    """When the pool runs dry the youngest sequence is preempted, recomputed later, and its output is unchanged."""
    model = tiny_model()
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    alone = run(make_engine(model, block_size=4), prompts, max_tokens=20)
    probe = make_engine(model, block_size=4)
    tight = make_engine(model, block_size=4, kv_cache_gb=10 * probe.block_bytes / 2**30)  # 9 usable blocks
    assert run(tight, prompts, max_tokens=20) == alone
    assert tight.preemptions > 0 and tight.pool.n_free == tight.pool.usable


def test_prefix_cache_hit_gives_identical_greedy_ids_and_counts_cached_tokens():
    model = tiny_model()
    system = list(range(1, 41))  # a shared "system prompt" of 40 tokens = 10 full blocks of 4
    a, b = system + [100, 101], system + [200]
    cold = make_engine(model, block_size=4, prefix_cache=False)
    want = run(cold, [a], max_tokens=12) + run(cold, [b], max_tokens=12)
    warm = make_engine(model, block_size=4)
    rows, _, seqs = run(warm, [a], max_tokens=12, events=True)
    rows2, _, seqs2 = run(warm, [b], max_tokens=12, events=True)
    assert rows + rows2 == want
    assert seqs[0].cached_tokens == 0 and seqs2[0].cached_tokens == 40
    # a prompt that is entirely cached still computes its last token (its logits give the first new token)
    rows3, _, seqs3 = run(warm, [system], max_tokens=12, events=True)
    assert seqs3[0].cached_tokens == 36 and rows3 == run(cold, [system], max_tokens=12)
    # the generated tokens are cached too: the next turn of a chat reuses the reply
    turn2 = a + rows[0] + [7, 8, 9]
    _, _, seqs4 = run(warm, [turn2], max_tokens=4, events=True)
    assert seqs4[0].cached_tokens == (len(a) + len(rows[0])) // 4 * 4


def test_lru_eviction_frees_the_oldest_cached_prefix_first():
    model = tiny_model()
    probe = make_engine(model, block_size=4)
    engine = make_engine(model, block_size=4, kv_cache_gb=9 * probe.block_bytes / 2**30)  # 8 usable blocks
    p1, p2 = list(range(1, 17)), list(range(101, 117))  # 4 full blocks each (3 reusable + the last token's)
    run(engine, [p1], max_tokens=1)
    run(engine, [p2], max_tokens=1)
    assert engine.pool.n_cached >= 6
    run(engine, [list(range(201, 217))], max_tokens=4)  # needs 5 blocks: p1's (older) are evicted first
    _, _, s1 = run(engine, [p1], max_tokens=1, events=True)
    assert engine.pool.evictions > 0 and s1[0].cached_tokens < 12


def test_shared_blocks_are_referenced_not_copied():
    model = tiny_model()
    engine = make_engine(model, block_size=4)
    system = list(range(1, 33))
    run(engine, [system + [50]], max_tokens=1)
    s1 = engine.add(GenRequest(system + [60], 8, GREEDY, stop_token_ids=[]))
    s2 = engine.add(GenRequest(system + [70], 8, GREEDY, stop_token_ids=[]))
    engine.step()
    assert s1.blocks[:8] == s2.blocks[:8] and all(engine.pool.refs[b] == 2 for b in s1.blocks[:8])
    while engine.has_work:
        engine.step()
    assert engine.pool.n_free == engine.pool.usable


def test_compiled_decode_matches_eager_across_batch_buckets(device):
    model = tiny_model().to(device)
    prompts = [[9, 8, 7, 6], [1, 2], [3]]
    eager = run(make_engine(model), prompts, max_tokens=12)
    engine = make_engine(model, compile=True, max_batch=4)
    assert engine.warmup_buckets() == [1, 2, 4] if device == "cuda" else [1, 2]
    assert make_engine(model, compile=True, max_batch=64).warmup_buckets() == (
        [1, 2, 4, 8, 16, 32, 64] if device == "cuda" else [1, 2, 5, 17])
    assert run(engine, prompts[:1], max_tokens=12) == eager[:1]
    assert run(engine, prompts, max_tokens=12) == eager  # CUDA: 3 rows in the bucket of 4 (one padding row)
    assert run(engine, prompts[:2], max_tokens=12) == eager[:2]
