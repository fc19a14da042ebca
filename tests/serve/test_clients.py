"""The official `openai` and `ollama` Python clients against a server on 127.0.0.1: chat, streaming, completions,
tool calls (a model scripted to emit a Llama 3.1 tool call), model listing."""

import json

import ollama
import openai
import pytest

from serve_utils import MODEL, ScriptedModel, make_llm, serve

USER = [{"role": "user", "content": "Tell me a story."}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
SERVER_OPTIONS = {"max_batch": 4}  # for conftest's `server` fixture


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def oll(server):
    return ollama.Client(host=server.url, timeout=60)


def test_openai_chat_and_stream(oai, oracle):
    want = "".join(oracle.chat(USER, max_new_tokens=10, temperature=0, stream=True))
    r = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 10
    stream = oai.chat.completions.create(model=MODEL, messages=USER, max_tokens=10, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.total_tokens == r.usage.total_tokens
    system = [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Once."},
              {"role": "user", "content": "Again."}]
    r = oai.chat.completions.create(model=MODEL, messages=system, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == len(oracle.chat_format.encode_dialog_prompt(system))


def test_openai_completions_and_models(oai, oracle):
    want = oracle.generate("The quick brown fox", max_new_tokens=8, temperature=0)
    r = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, logprobs=2)
    assert r.choices[0].text == want.text
    assert len(r.choices[0].logprobs.token_logprobs) == 8
    streamed = "".join(c.choices[0].text for c in oai.completions.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=8, temperature=0, stream=True))
    assert streamed == want.text
    assert [m.id for m in oai.models.list()] == [MODEL]
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        oai.chat.completions.create(model=MODEL, messages=USER, temperature=5)


def test_ollama_chat_generate_list(oll, oracle):
    want = "".join(oracle.chat(USER, max_new_tokens=6, temperature=0, stream=True))
    opts = {"temperature": 0, "num_predict": 6}
    r = oll.chat(model=MODEL, messages=USER, options=opts)
    assert r.message.content == want and r.done and r.eval_count == 6
    parts = list(oll.chat(model=MODEL, messages=USER, options=opts, stream=True))
    assert "".join(p.message.content for p in parts) == want and parts[-1].done_reason == "length"
    g = oll.generate(model=MODEL, prompt=USER[0]["content"], options=opts)
    assert g.response == want and g.context[-6:] and len(g.context) > 6
    parts = list(oll.generate(model=MODEL, prompt=USER[0]["content"], options=opts, stream=True))
    assert "".join(p.response for p in parts) == want
    listed = oll.list().models
    assert [m.model for m in listed] == [f"{MODEL}:latest"] and listed[0].details.family == "llama"
    shown = oll.show(MODEL)
    assert shown.modelinfo["llama.vocab_size"] == 128256 and "tools" in shown.capabilities
    with pytest.raises(ollama.ResponseError) as e:
        oll.chat(model="nope", messages=USER)
    assert e.value.status_code == 404 and "not found" in e.value.error


@pytest.fixture(scope="module")
def tool_server():
    llm = make_llm(model_cls=ScriptedModel)
    with serve(llm, max_batch=2) as srv:
        yield srv, llm


def script_call(llm, name: str, args: dict):
    """The ids of a Llama 3.1 JSON tool call: <|python_tag|>{...}<|eom_id|>."""
    tok = llm.tokenizer
    body = json.dumps({"type": "function", "name": name, "parameters": args})
    llm.model.script = [tok.python_tag_id, *tok.encode(body), tok.eom_id]


def test_openai_tool_calls(tool_server):
    srv, llm = tool_server
    script_call(llm, "get_weather", {"city": "Paris"})
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    ask = [{"role": "user", "content": "Weather in Paris?"}]
    r = client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"} and call.id
    # the tools were rendered into the prompt by herd's chat format
    assert r.usage.prompt_tokens == len(llm.chat_format.encode_dialog_prompt(ask, [WEATHER]))

    chunks = list(client.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER], max_tokens=60,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ""  # the call was not streamed as text
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # the result goes back as a tool message; the scripted model now answers in text
    llm.model.script = [*llm.tokenizer.encode("It is sunny."), llm.tokenizer.eot_id]
    follow = [*ask, {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
              {"role": "tool", "tool_call_id": call.id, "content": '{"sky": "sunny"}'}]
    r = client.chat.completions.create(model=MODEL, messages=follow, tools=[WEATHER], max_tokens=20)
    assert r.choices[0].message.content == "It is sunny." and r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.tool_calls is None


def test_ollama_tool_calls(tool_server):
    srv, llm = tool_server
    script_call(llm, "get_weather", {"city": "Oslo"})
    r = ollama.Client(host=srv.url, timeout=60).chat(model=MODEL, messages=[{"role": "user", "content": "Oslo?"}],
                                                     tools=[WEATHER], options={"num_predict": 60})
    assert r.message.tool_calls[0].function.name == "get_weather"
    assert r.message.tool_calls[0].function.arguments == {"city": "Oslo"}
