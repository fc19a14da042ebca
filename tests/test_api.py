"""The LLM API, `herd generate` and the `herd chat` REPL on a tiny checkpoint with a byte-level tokenizer."""

import io
import json

import pytest

import herd
from herd.api import LLM, Completion, TextStream, load, random_llm
from herd.cli_chat import repl
from herd.cli import main
from herd.config import get_config
from herd.engine import ContextLengthError
from herd.sampling import GenerationError
from herd.model import Transformer
from herd.tokenizer import Tokenizer, load_tokenizer


def byte_tokenizer() -> Tokenizer:
    return Tokenizer({bytes([i]): i for i in range(256)})  # 256 byte tokens + 256 specials = the tiny vocab


@pytest.fixture(scope="module")
def llm(tiny_ckpt):
    return load(tiny_ckpt, dtype="fp32", device="cpu")


def test_generate_text_ids_and_logprobs(llm):
    c = llm.generate("Hello", max_new_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    assert isinstance(c, Completion) and c.prompt_tokens == 6  # BOS + 5 bytes
    assert len(c.token_ids) + (c.stop is not None) <= 12 and c.finish_reason in ("stop", "length")
    assert c.text == llm.tokenizer.decode(c.token_ids)
    assert len(c.logprobs) == len(c.top_logprobs) >= len(c.token_ids)
    assert all(lp <= 0 for lp in c.logprobs)
    same = llm.generate(llm.encode("Hello"), max_new_tokens=12, temperature=0)  # ids in, same result
    assert same.token_ids == c.token_ids


def test_stream_yields_the_same_text(llm):
    full = llm.generate("abc", max_new_tokens=16, temperature=0)
    stream = llm.generate("abc", max_new_tokens=16, temperature=0, stream=True)
    assert isinstance(stream, TextStream)
    deltas = list(stream)
    assert "".join(deltas) == full.text == stream.result.text
    assert stream.result.token_ids == full.token_ids


def test_stream_close_keeps_the_partial_reply(llm):
    stream = llm.generate("abc", max_new_tokens=50, temperature=0, stop_token_ids=[], stream=True)
    first = next(stream)
    stream.close()
    r = stream.result
    assert r.finish_reason == "interrupted" and r.text.startswith(first) and len(r.token_ids) < 50
    assert llm.generate("abc", max_new_tokens=3, temperature=0).token_ids  # the engine is usable again


def test_stop_strings_cut_the_text(llm):
    full = llm.generate("xyz", max_new_tokens=20, temperature=0, stop_token_ids=[])
    text = full.text
    stop = text[4:6]
    assert len(stop) == 2
    cut = llm.generate("xyz", max_new_tokens=20, temperature=0, stop_token_ids=[], stop=[stop, "never"])
    assert cut.text == text[: text.index(stop)] and cut.finish_reason == "stop" and cut.stop == stop
    streamed = llm.generate("xyz", max_new_tokens=20, temperature=0, stop_token_ids=[], stop=stop, stream=True)
    assert "".join(streamed) == cut.text


def test_stop_token_is_reported_not_returned(llm):
    full = llm.generate("q", max_new_tokens=10, temperature=0, stop_token_ids=[])
    tok = full.token_ids[2]
    c = llm.generate("q", max_new_tokens=10, temperature=0, stop_token_ids=[tok])
    assert c.token_ids == full.token_ids[: full.token_ids.index(tok)] and c.stop == tok and c.finish_reason == "stop"


def test_batch_of_prompts(llm):
    batch = llm.generate(["a", "bbbbbb"], max_new_tokens=8, temperature=0)
    alone = [llm.generate(p, max_new_tokens=8, temperature=0) for p in ("a", "bbbbbb")]
    assert [b.token_ids for b in batch] == [a.token_ids for a in alone]
    with pytest.raises(GenerationError, match="single prompt"):
        llm.generate(["a", "b"], stream=True)


def test_chat(llm):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    r = llm.chat(msgs, max_new_tokens=10, seed=3)
    assert r.message.role == "assistant" and r.message.stop_reason in ("end_of_turn", "end_of_message", "out_of_tokens")
    s = llm.chat(msgs, max_new_tokens=10, seed=3, stream=True)
    assert "".join(s) == s.result.completion.text and s.result.completion.token_ids == r.completion.token_ids


def test_errors(llm):
    with pytest.raises(ContextLengthError):
        llm.generate("hi", max_new_tokens=200_000)
    with pytest.raises(TypeError, match="unknown generation keyword"):
        llm.generate("hi", temprature=0.5)
    with pytest.raises(GenerationError, match="top_p"):
        llm.generate("hi", top_p=0)
    with pytest.raises(FileNotFoundError, match="LLM.random"):
        herd.load("tiny")
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(Transformer(get_config("tiny")), load_tokenizer(None))  # 128256 ids for a 512-token model


def test_herd_load_is_the_api_load(tiny_ckpt):
    assert herd.load is load and herd.LLM is LLM


def test_random_llm():
    llm = random_llm("tiny", tokenizer=byte_tokenizer(), dtype="fp32")
    assert llm.generate("x", max_new_tokens=3, temperature=0).prompt_tokens == 2


# ---- herd generate --------------------------------------------------------------------------------------------


def test_cli_generate_ids_and_stats(tiny_ckpt, llm, capsys):
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "0",
            "--dtype", "fp32"]
    assert main(argv + ["--ids", "--stats"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert json.loads(lines[0]) == llm.generate("Hello", max_new_tokens=12, temperature=0).token_ids
    stats = json.loads(lines[1])
    assert set(stats) == {"prompt_tokens", "generated_tokens", "prefill_tok_s", "decode_tok_s"}
    assert stats["prompt_tokens"] == 6 and stats["generated_tokens"] >= 1
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.rstrip("\n") == llm.generate("Hello", max_new_tokens=12, temperature=0).text.rstrip("\n")


def test_cli_generate_compile_warms_up_before_the_prompt(tiny_ckpt, llm, capsys, monkeypatch):
    """--compile compiles the decode step before generating (so --stats counts steady decoding, not the compile),
    and gives the eager ids."""
    from herd.engine import Engine

    order = []
    warmup, step = Engine.warmup, Engine.step
    monkeypatch.setattr(Engine, "warmup", lambda self, b: order.append("warmup") or warmup(self, b))
    monkeypatch.setattr(Engine, "step", lambda self: order.append("step") or step(self))
    argv = ["generate", "--model", str(tiny_ckpt), "--prompt", "Hello", "--max-new-tokens", "6", "--temperature", "0",
            "--dtype", "fp32", "--ids", "--compile"]
    assert main(argv) == 0
    out = capsys.readouterr()
    assert json.loads(out.out.strip()) == llm.generate("Hello", max_new_tokens=6, temperature=0).token_ids
    assert "compiling the decode step" in out.err and order[0] == "warmup" and "step" in order


def test_cli_generate_chat(tiny_ckpt, capsys):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "hi", "--chat", "--system", "s", "--max-new-tokens",
                 "5", "--seed", "1", "--ids"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out), list)


@pytest.mark.parametrize("extra, match", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be positive"),
    (["--max-new-tokens", "200000"], "exceed the context limit"),
    (["--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--temperature", "-0.1"], "temperature must be >= 0"),
    (["--system", "x"], "--system needs --chat"),
    (["--dtype", "fp32", "--max-seq-len", "8", "--max-new-tokens", "4"], "limit of 8 tokens"),
])
def test_cli_generate_bad_input_is_one_line_exit_2(tiny_ckpt, capsys, extra, match):
    assert main(["generate", "--model", str(tiny_ckpt), "--prompt", "Hello"] + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("herd generate: error:") and match in err[0]


def test_cli_generate_missing_model(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint" in err[0]


def test_cli_generate_argparse_errors_exit_2(tiny_ckpt):
    for argv in (["generate", "--model", str(tiny_ckpt)], ["generate", "--model", str(tiny_ckpt), "--prompt", "x",
                                                           "--top-k", "many"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


# ---- herd chat (the REPL driven by a script) ----------------------------------------------------------------


class Recorder:
    """Wraps an LLM, recording the dialog each chat call receives."""

    def __init__(self, llm):
        self.llm, self.calls = llm, []

    def chat(self, messages, **kw):
        self.calls.append([dict(m) for m in messages])
        return self.llm.chat(messages, **kw)


def script(lines):
    it = iter(lines)

    def input_fn(prompt):
        try:
            return next(it)
        except StopIteration:
            raise EOFError from None

    return input_fn


def test_repl_history_and_commands(llm):
    rec, out, err = Recorder(llm), io.StringIO(), io.StringIO()
    code = repl(rec, input_fn=script(["hello", "/system be terse", "again", "/reset", "fresh", "/bogus", "/quit",
                                      "never read"]), out=out, err=err, max_new_tokens=6, temperature=0)
    assert code == 0
    assert [m["role"] for m in rec.calls[0]] == ["user"]
    assert [m["role"] for m in rec.calls[1]] == ["system", "user", "assistant", "user"]
    assert rec.calls[1][0]["content"] == "be terse" and rec.calls[1][1]["content"] == "hello"
    assert [m["role"] for m in rec.calls[2]] == ["system", "user"] and rec.calls[2][1]["content"] == "fresh"
    log = err.getvalue()
    assert "tok/s" in log or "tokens in" in log
    assert "conversation cleared" in log and "unknown command /bogus" in log
    assert len(rec.calls) == 3


def test_repl_ctrl_c_stops_the_reply_not_the_chat(llm):
    class InterruptingOut(io.StringIO):
        def __init__(self):
            super().__init__()
            self.writes = 0

        def write(self, s):
            self.writes += 1
            if self.writes == 2:  # Ctrl-C arrives while the first reply is streaming
                raise KeyboardInterrupt
            return super().write(s)

    rec, out, err = Recorder(llm), InterruptingOut(), io.StringIO()
    code = repl(rec, input_fn=script(["first question", "second question"]), out=out, err=err, max_new_tokens=30,
                temperature=0)
    assert code == 0  # ended by end of input, not by the interrupt
    assert "interrupted" in err.getvalue()
    second = rec.calls[1]
    assert [m["role"] for m in second] == ["user", "assistant", "user"]  # the partial reply stays in the history
    assert second[2]["content"] == "second question"


def test_repl_reports_context_overflow_and_continues(tiny_ckpt):
    small = load(tiny_ckpt, dtype="fp32", device="cpu", max_seq_len=40)
    rec, out, err = Recorder(small), io.StringIO(), io.StringIO()
    assert repl(rec, input_fn=script(["x" * 60, "ok"]), out=out, err=err, max_new_tokens=4, temperature=0) == 0
    assert "83 tokens, which exceeds the context limit of 40" in err.getvalue()
    assert [m["content"] for m in rec.calls[1]] == ["ok"]  # the failed turn was dropped
