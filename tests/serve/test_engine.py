"""The continuous-batching engine without HTTP: greedy outputs of concurrent requests equal LLM.generate of each
prompt alone; requests join a running batch; per-row sampling; cancellation, queue limit, timeouts, failures."""

import threading

import pytest

from herd.engine import ContextLengthError, GenRequest
from herd.sampling import SamplingParams
from herd.serve.engine import BatchEngine, QueueFullError

from serve_utils import gated_steps, make_llm

PROMPTS = ["Hello world", "The capital of France is", "a b c d e f g h i j k l m n o p", "x" * 70,
           "Once upon a time, there was", "1 2 3", "def f(x):\n    return", "Bonjour"]
LENGTHS = [5, 12, 20, 8, 16, 3, 9, 14]
GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def expected(oracle):
    return [oracle.generate(p, max_new_tokens=n, temperature=0) for p, n in zip(PROMPTS, LENGTHS)]


@pytest.fixture
def engine():
    engines = []

    def make(**kw):
        kw.setdefault("max_seq_len", 256)
        e = BatchEngine(make_llm(), **kw).start()
        engines.append(e)
        return e

    yield make
    for e in engines:
        e.close()


def run(handle, timeout=60):
    evs = list(handle.iter_sync(timeout))
    ids = [e.token for e in evs if e.token is not None and e.stop != e.token]
    return ids, "".join(e.text for e in evs), evs[-1]


def req(llm_or_tok, prompt: str, n: int, params=GREEDY, **kw) -> GenRequest:
    return GenRequest(llm_or_tok.encode(prompt, bos=True), n, params, skip_special=False, **kw)


def test_concurrent_greedy_equals_each_alone(engine, oracle, expected):
    # 8 requests on 3 rows: queueing, slot reuse, batched and chunked prefill (chunk 7 < most prompts)
    eng = engine(max_batch=3, prefill_chunk=7)
    handles = [eng.submit(req(oracle.tokenizer, p, n)) for p, n in zip(PROMPTS, LENGTHS)]
    for h, want in zip(handles, expected):
        ids, text, last = run(h)
        assert ids == want.token_ids and text == want.text
        assert last.finish == want.finish_reason
    assert eng.running == 0 and eng.waiting == 0


def test_new_request_joins_running_batch(engine, oracle, expected):
    eng = engine(max_batch=4)
    # the gate lets 5 + 100 model calls run before the test opens it: the late request needs ~12, the long one 230,
    # so the long request is surely still running when the late one ends
    with gated_steps(eng, allow=5) as gate:
        long = eng.submit(req(oracle.tokenizer, PROMPTS[2], 230))
        first = long.iter_sync(30)
        for _ in range(5):  # the first request is decoding
            next(first)
        late = eng.submit(req(oracle.tokenizer, PROMPTS[1], LENGTHS[1]))
        gate.allow(100)
        ids, text, _ = run(late)
        assert ids == expected[1].token_ids and text == expected[1].text
        assert late.finished_at < (long.finished_at or float("inf"))  # it ran inside the running batch
        assert gate.max_running == 2
    rest = [e.token for e in first if e.token is not None and e.stop != e.token]
    want = oracle.generate(PROMPTS[2], max_new_tokens=230, temperature=0)
    assert len(rest) + 5 == len(want.token_ids)


def test_per_row_sampling_params(engine, oracle, expected):
    eng = engine(max_batch=4)
    tok = oracle.tokenizer
    seeded = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    alone, _, _ = run(eng.submit(req(tok, "seeded prompt", 12, seeded)))
    forced = tok.encode(" yes")[0]
    handles = [
        eng.submit(req(tok, "seeded prompt", 12, seeded)),  # same seed, now in a batch
        eng.submit(req(tok, PROMPTS[0], LENGTHS[0])),  # greedy next to sampled rows
        eng.submit(req(tok, "bias", 6, logit_bias={forced: 100.0})),
        eng.submit(req(tok, PROMPTS[4], 16, SamplingParams(temperature=0, repetition_penalty=1.5))),
    ]
    batched, _, _ = run(handles[0])
    assert batched == alone
    assert run(handles[1])[0] == expected[0].token_ids
    assert run(handles[2])[0] == [forced] * 6
    want = oracle.generate(PROMPTS[4], max_new_tokens=16, temperature=0, repetition_penalty=1.5)
    assert run(handles[3])[0] == want.token_ids


def test_logprobs_match_the_oracle(engine, oracle):
    eng = engine(max_batch=2)
    want = oracle.generate(PROMPTS[1], max_new_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    evs = list(eng.submit(req(oracle.tokenizer, PROMPTS[1], 6, logprobs=True, top_logprobs=3)).iter_sync(30))
    assert [e.logprob for e in evs] == pytest.approx(want.logprobs, abs=1e-4)
    assert [list(e.top_logprobs) for e in evs] == [list(t) for t in want.top_logprobs]


def test_stop_token_and_stop_string(engine, oracle, expected):
    eng = engine(max_batch=2)
    want = expected[2]
    third = want.token_ids[2]
    ids, text, last = run(eng.submit(req(oracle.tokenizer, PROMPTS[2], 20, stop_token_ids=[third])))
    assert ids == want.token_ids[:2] and last.finish == "stop" and last.stop == third
    stop = want.text[len(want.text) // 2 : len(want.text) // 2 + 3]
    ids, text, last = run(eng.submit(req(oracle.tokenizer, PROMPTS[2], 20, stop=[stop])))
    assert text == want.text[: want.text.index(stop)] and last.finish == "stop" and last.stop == stop


def test_cancel_frees_the_row_within_one_step(engine, oracle):
    eng = engine(max_batch=2)
    with gated_steps(eng, allow=2) as gate:  # the prefill and one decode step; the engine then waits at the gate
        h = eng.submit(req(oracle.tokenizer, PROMPTS[0], 240))
        it = h.iter_sync(30)
        next(it), next(it)
        assert gate.wait_parked(calls=2)  # at the third call
        steps, made = eng.steps, h.n_generated
        h.cancel()
        gate.open()  # the step that was waiting runs; the next one must not
        assert list(it)[-1].finish == "abort"
    assert h.n_generated - made <= 1 and eng.steps - steps <= 1  # at most the step already running
    assert eng.running == 0 and h.n_generated < 240


class FakeClock:
    """Stands in for the engine module's `time`: perf_counter() returns `now`, which only the test moves."""

    def __init__(self):
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


def test_queue_limit_timeout_and_context(engine, oracle, monkeypatch):
    eng = engine(max_batch=1, max_queue=1, queue_timeout=0.1)
    tok = oracle.tokenizer
    clock = FakeClock()
    monkeypatch.setattr("herd.serve.engine.time", clock)
    # the busy request's prefill and first decode step (its first event comes after both); it then holds its row
    # until the gate opens
    with gated_steps(eng, allow=2) as gate:
        busy = eng.submit(req(tok, PROMPTS[0], 250))
        next(busy.iter_sync(30))  # it has the row
        waiting = eng.submit(req(tok, PROMPTS[1], 5))
        with pytest.raises(QueueFullError):
            eng.submit(req(tok, PROMPTS[2], 5))
        gate.allow(3)  # steps while the clock stands still: the waiting request stays queued
        assert gate.wait_parked(calls=5)
        assert eng.waiting == 1 and not waiting.finished
        clock.now += 0.2  # past queue_timeout: the next loop fails it, and hands the error over after its step
        gate.allow(2)
        last = list(waiting.iter_sync(30))[-1]
        assert last.finish == "error" and last.error_code == "queue_timeout"
        busy.cancel()
    with pytest.raises(ContextLengthError, match="260 tokens exceed"):
        eng.submit(GenRequest(list(range(50)), 210))
    assert eng.check_length(50, None) == 256 - 50  # unset max_tokens: the rest of the context
    with pytest.raises(ContextLengthError, match="256 tokens"):
        eng.check_length(256, None)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        eng.submit(GenRequest([1, tok.n_words], 3))


def test_a_failing_step_fails_its_rows_not_the_engine(engine, oracle, expected, monkeypatch):
    eng = engine(max_batch=2)
    calls = {"n": 0}
    real = eng.model.forward

    def flaky(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("boom")
        return real(*a, **kw)

    monkeypatch.setattr(eng.model, "forward", flaky)
    last = list(eng.submit(req(oracle.tokenizer, PROMPTS[0], 20)).iter_sync(30))[-1]
    assert last.finish == "error" and "boom" in last.error
    assert eng.alive
    ids, _, _ = run(eng.submit(req(oracle.tokenizer, PROMPTS[0], LENGTHS[0])))
    assert ids == expected[0].token_ids


def test_close_aborts_everything(oracle):
    eng = BatchEngine(make_llm(), max_batch=1, max_seq_len=256).start()
    running = eng.submit(req(oracle.tokenizer, PROMPTS[0], 200))
    queued = eng.submit(req(oracle.tokenizer, PROMPTS[1], 200))
    next(running.iter_sync(30))
    closer = threading.Thread(target=eng.close)
    closer.start()
    closer.join(20)
    assert list(queued.iter_sync(5))[-1].finish == "abort"
    assert [e for e in running.iter_sync(5)][-1].finish == "abort"
    assert not eng.alive
    assert eng.model.layers[0].attention.cache is None


def test_cancel_during_a_long_prefill(engine, oracle):
    eng = engine(max_batch=2, prefill_chunk=8)
    with gated_steps(eng) as gate:  # the engine waits at the gate before its first prefill chunk
        h = eng.submit(GenRequest(oracle.encode("word " * 200, bos=True), 10, GREEDY))  # 201 tokens: 26 chunks of 8
        assert gate.wait_parked()
        h.cancel()
        gate.open()
        assert list(h.iter_sync(30))[-1].finish == "abort" and h.n_generated == 0
    assert gate.calls == 1 and eng.running == 0  # the chunk already under way, no more
