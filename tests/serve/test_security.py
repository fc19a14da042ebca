"""Bad input and access control (the HTTP section of shared/docs/reliability-checklist.md §4): every invalid request
gets a 4xx with an error body naming the problem, never a 500, and the server keeps serving; Host / Origin checks,
API keys, body and header caps, the bind policy."""

import json
import socket

import httpx
import pytest

import herd.serve.security as security
from herd.cli import main
from herd.serve.security import check_bind

from serve_utils import MODEL, make_llm, serve

KEY = "sk-herd-test-0123456789"
MSGS = [{"role": "user", "content": "hi"}]
SERVER_OPTIONS = {"max_body_bytes": 64 << 10}  # for conftest's `server` fixture (its `client` uses it)


def assert_openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert {"message", "type", "param", "code"} <= set(err) and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    return err


def still_serving(client):
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None


RAW_BODIES = [b"not json", b'{"model": "x", "messages": [', b"[]", b'"a string"', b"", b"\xff\xfe\x00",
              b'{"model": "' + MODEL.encode() + b'", "messages": [], "temperature": NaN}',
              b"[" * 30_000 + b"]" * 30_000, b'{"a": ' + b"[" * 70 + b"]" * 70 + b"}"]


@pytest.mark.parametrize("raw", RAW_BODIES, ids=range(len(RAW_BODIES)))
def test_malformed_bodies(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_openai_error(r, 400)


def nested(depth):
    d = {"type": "string"}
    for _ in range(depth):
        d = {"type": "object", "properties": {"x": d}}
    return d


DROP = object()
BAD_CHAT = [
    ({"model": DROP}, "model"), ({"messages": DROP}, "messages"), ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
    ({"messages": [{"role": "user", "content": None}]}, "messages"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages"),
    ({"messages": [{"role": "user", "content": {"nested": "object"}}]}, "messages"),
    ({"messages": [{"role": "assistant", "content": "first"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}]}, "messages"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": -1}, "max_tokens"), ({"max_tokens": 2**31}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"), ({"max_tokens": "5"}, "max_tokens"),
    ({"n": 0}, "n"), ({"n": 10**6}, "n"),
    ({"temperature": -1}, "temperature"), ({"temperature": 1e308}, "temperature"),
    ({"temperature": "hot"}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"presence_penalty": 3}, "presence_penalty"), ({"seed": "x"}, "seed"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": "yes"}, "logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"stop": "x" * (1 << 20)}, None),
    ({"logit_bias": {"999999": 1}}, "logit_bias"), ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    # str.isdigit() is True for these, int() fails or they are not token ids: 400, never 500
    ({"logit_bias": {"\u00b2": 1}}, "logit_bias"), ({"logit_bias": {"\u0663": 1}}, "logit_bias"),
    ({"logit_bias": {"1" * 5000: 1}}, "logit_bias"), ({"logit_bias": {"": 1}}, "logit_bias"),
    ({"logit_bias": {"-1": 1}}, "logit_bias"), ({"logit_bias": {"+5": 1}}, "logit_bias"),
    ({"logit_bias": {" 5": 1}}, "logit_bias"), ({"logit_bias": {"0" * 10 + "5": 1}}, "logit_bias"),
    # tool-call arguments are JSON inside a string: the same limits as the body
    ({"messages": [*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 20_000 + "]" * 20_000}}]}]},
     "messages"),
    ({"messages": [*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": ' + "7" * 5000 + "}"}}]}]},
     "messages"),
    ({"messages": [*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": NaN}'}}]}]}, "messages"),
    ({"messages": [*MSGS, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"n": 1'}}]}]}, "messages"),
    ({"tool_choice": "auto"}, "tool_choice"), ({"tool_choice": "none"}, "tool_choice"),  # without tools, as OpenAI
    ({"tools": [{"type": "function"}]}, "tools"), ({"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
                                                   "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": nested(40)}}]}, None),
    ({"tools": [{"type": "telepathy"}]}, "tools"),
    ({"tool_choice": "required", "tools": [{"type": "code_interpreter"}]}, "tool_choice"),
    ({"response_format": {"type": "json_schema"}}, "response_format"), ({"stream": "yes"}, "stream"),
]


@pytest.mark.parametrize("fields,param", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(client, fields, param):
    body = {k: v for k, v in {"model": MODEL, "messages": MSGS, "max_tokens": 4, **fields}.items() if v is not DROP}
    status = 413 if len(json.dumps(body)) > 64 << 10 else 400
    assert_openai_error(client.post("/v1/chat/completions", json=body), status, param)


BAD_COMPLETIONS = [({"prompt": []}, "prompt"), ({"prompt": [-1]}, "prompt"), ({"prompt": [128256]}, "prompt"),
                   ({"prompt": ""}, "prompt"), ({"prompt": [[1, 2], []]}, "prompt"), ({"prompt": ["a"] * 33}, "prompt"),
                   ({"prompt": "a", "suffix": "b"}, "suffix"), ({"prompt": "a", "logprobs": 6}, "logprobs"),
                   ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": "a", "echo": True, "logprobs": 1}, "echo"),
                   ({"prompt": True}, "prompt")]


@pytest.mark.parametrize("fields,param", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(client, fields, param):
    assert_openai_error(client.post("/v1/completions", json={"model": MODEL, **fields}), 400, param)


def test_unknown_model_route_and_method(client):
    err = assert_openai_error(client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": MSGS}), 404,
                              "model")
    assert err["code"] == "model_not_found"
    r = client.get("/v1/chat/completions")
    assert_openai_error(r, 405)
    assert r.headers["allow"] == "POST"  # RFC 9110: a 405 names the methods that are allowed
    assert client.post("/health").headers["allow"] == "GET"
    assert_openai_error(client.get("/v1/nothing-here"), 404)
    still_serving(client)


@pytest.mark.parametrize("path,body", [
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"temperature": "hot"}}),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "format": "json"}),
    ("/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"num_predict": 0}}),
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"num_predict": -3}}),
    ("/api/generate", {"model": MODEL, "prompt": "x", "context": [-5]}),
    ("/api/generate", {"model": MODEL, "prompt": "x", "template": "{{ .Prompt }}"}),
    ("/api/chat", {"model": "llama3.1:8b", "messages": MSGS}),
    # the OpenAI API's stop caps apply here too (common.MAX_STOP_STRINGS / MAX_STOP_CHARS)
    ("/api/chat", {"model": MODEL, "messages": MSGS, "options": {"stop": ["a", "b", "c", "d", "e"]}}),
    ("/api/generate", {"model": MODEL, "prompt": "x", "options": {"stop": ["x" * 513]}}),
])
def test_ollama_errors_use_ollamas_body(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code in (400, 404) and isinstance(r.json()["error"], str) and r.json()["error"]


def test_body_and_header_caps(client, server):
    big = b'{"model": "x", "messages": [], "pad": "' + b"x" * (70 << 10) + b'"}'
    err = assert_openai_error(client.post("/v1/chat/completions", content=big), 413)
    assert err["code"] == "body_too_large"

    def chunked():  # no Content-Length: counted while read
        for _ in range(70):
            yield b"x" * 1024

    assert_openai_error(client.post("/v1/chat/completions", content=chunked()), 413)
    r = client.get("/health", headers=[(f"x-h{i}", "v") for i in range(1000)])
    assert r.status_code == 431
    port = server.port
    for request in (b"GET /health HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n",
                    b"GET /health HTTP/1.0\r\n\r\n"):  # a 1 MB header; no Host at all
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            try:
                s.sendall(request)
            except OSError:
                pass  # the server may close before reading all of a 1 MB header
            reply = s.recv(200)
        assert reply.split(b" ")[1] in (b"400", b"403", b"431"), reply
    still_serving(client)


@pytest.mark.parametrize("host,ok", [("evil.example", False), ("127.0.0.1.evil.example", False),
                                     ("localhost.evil.example", False), ("evil.example:{port}", False),
                                     ("localhost:{port}", True), ("127.0.0.1:{port}", True), ("[::1]:{port}", True),
                                     ("app.localhost", True)])
def test_host_header_allowlist_on_loopback(client, server, host, ok):
    r = client.get("/v1/models", headers={"host": host.format(port=server.port)})
    if ok:
        assert r.status_code == 200
    else:
        assert assert_openai_error(r, 403)["code"] == "host_not_allowed"


def test_origin_check(client, server):
    assert client.get("/v1/models", headers={"origin": "http://evil.example"}).status_code == 403
    assert client.get("/v1/models", headers={"origin": f"http://127.0.0.1:{server.port}"}).status_code == 200
    with serve(make_llm(), allow_origins=("https://app.example",)) as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"origin": "https://app.example"})
        assert r.status_code == 200


def test_api_key(monkeypatch):
    compared = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    with serve(make_llm(), api_key=KEY) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Bearer " + KEY[:-1] + "X"},
                        {"authorization": KEY}, {"x-api-key": KEY + "x"}):
            r = c.get("/v1/models", headers=headers)
            assert assert_openai_error(r, 401)["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert compared  # digests compared in constant time
        assert c.get("/v1/models", headers={"authorization": "Bearer " + KEY}).status_code == 200
        assert c.get("/v1/models", headers={"x-api-key": KEY}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # public: no data
        assert c.get("/metrics").status_code == 401
        r = c.post("/api/chat", json={"model": MODEL, "messages": MSGS})
        assert r.status_code == 401 and isinstance(r.json()["error"], str)
    # a non-loopback bind (key required) does not check Host: the key is the gate
    with serve(make_llm(), api_key=KEY, host="0.0.0.0") as srv:
        r = httpx.get(srv.url + "/v1/models", headers={"host": "herd.example", "authorization": "Bearer " + KEY})
        assert r.status_code == 200


def test_stop_caps_are_the_same_on_both_apis(client):
    from herd.serve.common import MAX_STOP_CHARS, MAX_STOP_STRINGS

    ok = ["x" * MAX_STOP_CHARS] + ["y"] * (MAX_STOP_STRINGS - 1)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "max_tokens": 2, "stop": ok})
    assert r.status_code == 200
    r = client.post("/api/chat", json={"model": MODEL, "messages": MSGS, "stream": False,
                                       "options": {"stop": ok, "num_predict": 2}})
    assert r.status_code == 200
    for bad in (ok + ["z"], ["x" * (MAX_STOP_CHARS + 1)]):
        assert_openai_error(client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stop": bad}),
                            400, "stop")
        r = client.post("/api/chat", json={"model": MODEL, "messages": MSGS, "options": {"stop": bad}})
        assert r.status_code == 400 and "stop" in r.json()["error"]


def test_api_key_that_no_client_can_send_is_refused_at_start(capsys):
    for bad in ("\u043a\u043b\u044e\u0447", "caf\u00e9", "two words", "tab\tkey", ""):
        with pytest.raises(ValueError, match="printable ASCII"):
            check_bind("127.0.0.1", bad or "x\x00", False)
        with pytest.raises(ValueError, match="printable ASCII"):
            security.Guard(None, api_key=bad or "\x7f", loopback_bind=True)
    assert main(["serve", "--model", MODEL, "--random-weights", "--api-key", "\u043a\u043b\u044e\u0447"]) == 2
    err = capsys.readouterr().err
    assert "printable ASCII" in err and "Traceback" not in err


def test_bind_policy_and_cli_flags(capsys):
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", KEY, False)
    check_bind("0.0.0.0", None, True)
    with pytest.raises(ValueError, match="without an API key"):
        check_bind("0.0.0.0", None, False)
    assert main(["serve", "--model", MODEL, "--random-weights", "--host", "0.0.0.0"]) == 2
    assert "without an API key" in capsys.readouterr().err
    assert main(["serve", "--random-weights"]) == 2 and "--model" in capsys.readouterr().err
    assert main(["serve", "--model", "not-a-config", "--random-weights"]) == 2
    for bad in (["--port", "0"], ["--port", "70000"], ["--max-batch", "0"], ["--max-seq-len", "-1"],
                ["--max-connections", "0"], ["--read-timeout", "0"], ["--timeout-keep-alive", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", "--model", MODEL, "--random-weights", *bad])
        assert e.value.code == 2


def test_internal_errors_are_generic(client, server, monkeypatch):
    def broken(*a, **kw):
        raise RuntimeError("/home/alice/secret/path.py exploded")

    monkeypatch.setattr(server.ctx.llm.chat_format, "encode_dialog_prompt", broken)
    r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": MSGS})
    err = assert_openai_error(r, 500)
    assert err["message"] == "internal server error" and "alice" not in r.text
    monkeypatch.undo()
    still_serving(client)
