"""herd's GGUF files in the real peer: llama.cpp (through llama-cpp-python, built from PyPI by scripts/setup.sh)."""

import llama_cpp
import numpy as np
import pytest
import torch
from conftest import TINY_LLAMA3, tiny_model

from herd import gguf as hg
from herd.chat_format import LLAMA31_CHAT_TEMPLATE

TRICKY = [
    "Hello, world!",
    "This is a test sentence.",
    "  leading spaces and trailing   ",
    "CRLF\r\nlines\r\n\r\nand tabs\t\tand\u00a0nbsp",
    "numbers 1 12 123 1234 12345 3.14159 -42 1e10",
    "ünïcödé, Ελληνικά, русский, 日本語のテキスト, हिन्दी, العربية",
    "emoji 🦙👩‍👩‍👧‍👦 🇫🇷 ❤️",
    "code: def f(x):\n    return x**2  # comment\n",
    "<|eot_id|> typed by a user stays text <|start_header_id|>",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tok):
    tmp = tmp_path_factory.mktemp("gguf")
    model = tiny_model(TINY_LLAMA3, seed=0, std=0.2)  # spread-out logits, so that greedy choices are not near-ties
    paths = {}
    for dtype in ("f32", "q8_0"):
        paths[dtype] = hg.write_gguf(model.state_dict(), model.args, tok, tmp / f"m-{dtype}.gguf", dtype=dtype,
                                     chat_template=LLAMA31_CHAT_TEMPLATE)
    return tok, model, paths


def _llama(path):
    return llama_cpp.Llama(model_path=str(path), n_ctx=128, n_batch=128, n_threads=2, logits_all=True, verbose=False)


def test_llama_cpp_tokenizes_like_herd(setup):
    tok, _, paths = setup
    llm = _llama(paths["f32"])
    for text in TRICKY:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
    assert llm.token_bos() == tok.bos_id
    assert llm.metadata["tokenizer.chat_template"] == LLAMA31_CHAT_TEMPLATE


def _llama_greedy(llm, prompt, n):
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _herd_greedy(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_continuation_equals_herd_f32(setup):
    tok, model, paths = setup
    prompt = tok.encode("The quick brown fox", bos=True)
    assert _llama_greedy(_llama(paths["f32"]), prompt, 32) == _herd_greedy(model, prompt, 32)


def test_q8_0_logits_within_tolerance(setup, tmp_path):
    from herd.loading import load_model

    tok = setup[0]
    model = tiny_model(TINY_LLAMA3, seed=1)  # the pretraining init (std 0.02)
    path = hg.write_gguf(model.state_dict(), model.args, tok, tmp_path / "q8.gguf", dtype="q8_0")
    prompt = tok.encode("Shall I compare thee to a summer's day?", bos=True)
    llm = _llama(path)
    llm.reset()
    llm.eval(prompt)
    theirs = torch.from_numpy(np.array(llm.scores[: len(prompt)]))
    with torch.no_grad():
        ours_f32 = model(torch.tensor([prompt]))[0]
        ours_q8 = load_model(path).eval()(torch.tensor([prompt]))[0]  # herd reading the same Q8_0 file

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    # Stated tolerances (relative RMS error of all logits): llama.cpp also rounds activations to 8 bits in its
    # Q8_0 dot products, so it sits ~0.6% from herd's dequantized Q8_0 and ~1% from herd's f32 on this model.
    assert rel(theirs, ours_q8) < 0.02
    assert rel(theirs, ours_f32) < 0.03
    assert (theirs.argmax(-1) == ours_f32.argmax(-1)).float().mean() >= 0.9


DIALOGS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write a line."},
     {"role": "assistant", "content": "Shall I compare thee?"}, {"role": "user", "content": "More, ünïcödé 🦙"}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
     {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 21}'}],
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]


@pytest.mark.parametrize("k", range(len(DIALOGS)))
@pytest.mark.parametrize("with_tools", [False, True])
def test_gguf_chat_template_in_llama_cpp_renders_herds_format(k, with_tools, tok):
    """The template herd writes into GGUF files, rendered by llama-cpp-python's own jinja formatter, gives
    exactly the prompt herd's ChatFormat encodes."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    from herd.chat_format import ChatFormat

    fmt = Jinja2ChatFormatter(LLAMA31_CHAT_TEMPLATE, eos_token="<|eot_id|>", bos_token="<|begin_of_text|>")
    tools = TOOLS if with_tools else None
    rendered = fmt(messages=DIALOGS[k], tools=tools, date_string="26 July 2024").prompt
    ids = ChatFormat(tok).encode_dialog_prompt(DIALOGS[k], tools=tools, today="26 July 2024")
    assert rendered == tok.decode(ids)
