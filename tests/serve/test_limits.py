"""Connection limits and shutdown: slow and idle clients are cut off by the read and keep-alive timeouts, a flood of
idle sockets neither exhausts file descriptors nor keeps /health from answering, a full house is refused with a 503,
and SIGTERM drains as docs/serving.md says (a subprocess server; every wait is a polled deadline)."""

import contextlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import httpx
import pytest

from serve_utils import MODEL, make_llm, wait_until

from herd.serve import ServerThread, create_app

USER = [{"role": "user", "content": "Write a haiku about the sea."}]


@contextlib.contextmanager
def limited_server(**limits):
    app = create_app(make_llm(), model_name=MODEL, max_seq_len=256)
    with ServerThread(app, **limits) as srv:
        yield srv


def connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def read_until_closed(sock: socket.socket, deadline: float) -> bytes:
    """Everything the server sends until it closes the connection (fails if it is still open at `deadline`)."""
    data = b""
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"the server kept the connection open; got {data[:200]!r}") from None
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


def health(srv) -> int:
    return httpx.get(srv.url + "/health", timeout=10).status_code


def no_tracebacks(caplog) -> None:
    bad = [r for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]
    assert not bad, [r.getMessage() for r in bad]


# ---- slow and idle clients --------------------------------------------------------------------------------------


def test_slow_headers_get_408_and_are_closed(caplog):
    """Slowloris: one header line at a time, never finishing the head. The head must arrive within --read-timeout
    whatever the client's pace (uvicorn alone waits forever once a byte arrived)."""
    with limited_server(read_timeout=1.0) as srv:
        s = connect(srv)
        s.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n")
        deadline = time.monotonic() + 15
        sent = 0
        with contextlib.suppress(OSError):
            while time.monotonic() < deadline:  # keep trickling until the server hangs up
                s.sendall(f"X-Slow-{sent}: 1\r\n".encode())
                sent += 1
                s.settimeout(0.3)
                try:
                    got = s.recv(65536)
                    break
                except TimeoutError:
                    continue
        assert got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert read_until_closed(s, time.monotonic() + 10) is not None
        s.close()
        assert srv.limits.timed_out >= 1 and health(srv) == 200
    no_tracebacks(caplog)


@pytest.mark.parametrize("declared, sent", [(1000, 10), (10_000, 0)])
def test_slow_or_short_body_is_cut_and_logged_in_one_line(caplog, declared, sent):
    caplog.set_level(logging.INFO)
    with limited_server(read_timeout=1.0) as srv:
        s = connect(srv)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {declared}\r\n\r\n".encode() + b"{" * sent)
        got = read_until_closed(s, time.monotonic() + 15)  # the body never completes: closed after ~1 s
        s.close()
        assert got == b"" or got.startswith(b"HTTP/1.1 408 "), got[:100]
        assert health(srv) == 200
        assert wait_until(lambda: any("disconnected while sending the body" in r.getMessage()
                                      for r in caplog.records), timeout=10)
    no_tracebacks(caplog)


def test_client_that_disconnects_mid_upload_is_one_log_line(caplog):
    caplog.set_level(logging.INFO)
    with limited_server() as srv:
        s = connect(srv)
        s.sendall(b"POST /api/chat HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n" + b'{"model": ' * 50)
        assert wait_until(lambda: any(not p._idle() for p in srv.limits.open))  # the route is reading the body
        s.close()
        assert wait_until(lambda: any("disconnected while sending the body of POST /api/chat" in r.getMessage()
                                      for r in caplog.records), timeout=10)
        assert health(srv) == 200
    no_tracebacks(caplog)


def test_idle_sockets_and_keep_alive_are_closed():
    with limited_server(read_timeout=1.0, timeout_keep_alive=0.5) as srv:
        idle = connect(srv)  # never sends a byte: closed silently
        assert read_until_closed(idle, time.monotonic() + 15) == b""
        idle.close()
        ka = connect(srv)
        ka.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
        got = read_until_closed(ka, time.monotonic() + 15)  # the response, then the keep-alive timeout
        ka.close()
        assert got.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in got


# ---- floods ----------------------------------------------------------------------------------------------------


def test_flood_of_idle_connections_keeps_health_answering():
    """2,000 idle sockets against a cap of 50: the server never holds more than 50 (evicting the longest idle), so
    file descriptors stay bounded and /health answers at once, long before any read timeout."""
    import resource

    n = 2000
    assert n + 200 < resource.getrlimit(resource.RLIMIT_NOFILE)[0]  # both ends live in this process
    with limited_server(max_connections=50, read_timeout=600.0) as srv:
        socks = []
        try:
            for _ in range(n):
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", srv.port))
                socks.append(s)
            assert wait_until(lambda: srv.limits.evicted >= n - 50, timeout=60), srv.limits.evicted
            assert len(srv.limits.open) <= 50
            t0 = time.monotonic()
            for _ in range(5):
                assert health(srv) == 200  # each /health connection evicts one idle flood socket
            assert time.monotonic() - t0 < 30  # (a hang guard, not a speed check: the read timeout is 600 s)
            assert srv.limits.refused == 0 and len(srv.limits.open) <= 50
        finally:
            for s in socks:
                s.close()


def test_all_connections_busy_gets_503_then_recovers():
    """When every connection runs a request (here: bodies still arriving), a newcomer gets a 503 and is closed."""
    with limited_server(max_connections=2, read_timeout=30.0) as srv:
        busy = [connect(srv) for _ in range(2)]
        try:
            for s in busy:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{")
            assert wait_until(lambda: len(srv.limits.open) == 2 and not any(p._idle() for p in srv.limits.open))
            extra = connect(srv)
            got = read_until_closed(extra, time.monotonic() + 15)
            extra.close()
            assert got.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in got and b"too many connections" in got
            assert srv.limits.refused == 1
        finally:
            for s in busy:
                s.close()
        assert wait_until(lambda: len(srv.limits.open) == 0)
        assert health(srv) == 200


# ---- SIGTERM drains ---------------------------------------------------------------------------------------------

SERVER = textwrap.dedent("""
    import logging, sys, time
    from herd.api import random_llm
    from herd.serve import run

    llm = random_llm("tiny-llama3-vocab", dtype="fp32")
    forward = llm.model.forward
    def slow(*a, **kw):  # 20 ms per model call: a reply of N tokens takes about N x 20 ms
        time.sleep(0.02)
        return forward(*a, **kw)
    llm.model.forward = slow
    logging.basicConfig(level=logging.INFO)  # as `herd serve` does
    run(llm, port=0, model_name="m", max_seq_len=2048, max_batch=8, compile=False,
        shutdown_timeout=float(sys.argv[1]), log_level="info")
""")


@contextlib.contextmanager
def subprocess_server(tmp_path, shutdown_timeout: float):
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(shutdown_timeout)], stdout=subprocess.DEVNULL,
                            stderr=log, env={**os.environ, "HERD_API_KEY": ""})
    try:
        port = None

        def started():
            nonlocal port
            m = re.search(r"playground  http://localhost:(\d+)/", (tmp_path / "stderr.txt").read_text())
            port = m and int(m.group(1))
            return port is not None or proc.poll() is not None

        assert wait_until(started, timeout=120) and port, (tmp_path / "stderr.txt").read_text()
        url = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _status(url + "/health") == 200, timeout=60)
        yield proc, url, lambda: (tmp_path / "stderr.txt").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _status(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def _lines(resp):
    return (ln for ln in resp.iter_lines() if ln)


def test_sigterm_lets_running_requests_finish_and_refuses_new_ones(tmp_path):
    with subprocess_server(tmp_path, shutdown_timeout=120) as (proc, url, stderr):
        with httpx.Client(base_url=url, timeout=60) as c:
            body = {"model": "m", "messages": USER, "max_tokens": 150, "temperature": 0, "stream": True}
            with c.stream("POST", "/v1/chat/completions", json=body) as r:
                lines = _lines(r)
                first = next(lines)
                assert first.startswith("data: {")
                proc.send_signal(signal.SIGTERM)
                # draining: the listener stays open; /health and new work are 503 while the stream goes on
                assert wait_until(lambda: _status(url + "/health") == 503, timeout=30)
                late = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False}, timeout=30)
                assert late.status_code == 503 and late.json()["error"]["code"] == "unavailable"
                rest = list(lines)
        events = [json.loads(ln[6:]) for ln in rest[:-1]]
        assert rest[-1] == "data: [DONE]" and events[-1]["choices"][0]["finish_reason"] == "length"
        n = sum(1 for e in events if e["choices"][0]["delta"].get("content"))
        assert n >= 100  # it ran to its max_tokens, long after the signal (~3 s of decoding at 20 ms a token)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    err = stderr()
    assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]
    assert "Finished server process" in err


def test_sigterm_after_the_timeout_ends_every_request_in_band(tmp_path):
    """--shutdown-timeout 1 against replies that need ~40 s: each ends in-band with finish_reason / done_reason
    "abort": the last SSE chunk then [DONE] (chat and completions), NDJSON done: true (Ollama chat and generate),
    and the non-streaming ones get their response (partial text, finish_reason "abort")."""
    with subprocess_server(tmp_path, shutdown_timeout=1) as (proc, url, stderr):
        results = {}
        with httpx.Client(base_url=url, timeout=60) as c, contextlib.ExitStack() as stack:
            long = {"model": "m", "max_tokens": 2000, "temperature": 0}
            streams = {
                "chat": ("/v1/chat/completions", {**long, "messages": USER, "stream": True}),
                "completions": ("/v1/completions", {**long, "prompt": "Once upon a time", "stream": True}),
                "ollama_chat": ("/api/chat", {"model": "m", "messages": USER, "options": {"num_predict": 2000}}),
                "ollama_generate": ("/api/generate", {"model": "m", "prompt": "Hi", "options": {"num_predict": 2000}}),
            }
            opened = {}
            for name, (path, body) in streams.items():
                r = stack.enter_context(c.stream("POST", path, json=body))
                lines = _lines(r)
                opened[name] = (lines, [next(lines)])  # generating
            pool = httpx.Client(base_url=url, timeout=60)
            stack.callback(pool.close)
            import concurrent.futures

            ex = stack.enter_context(concurrent.futures.ThreadPoolExecutor(2))
            plain = {"chat": ex.submit(pool.post, "/v1/chat/completions", json={**long, "messages": USER}),
                     "ollama": ex.submit(pool.post, "/api/chat", json={"model": "m", "messages": USER,
                                                                       "stream": False,
                                                                       "options": {"num_predict": 2000}})}
            assert wait_until(lambda: _running(url) >= 6, timeout=60)
            proc.send_signal(signal.SIGTERM)
            for name, (lines, got) in opened.items():
                results[name] = got + list(lines)
            answers = {k: f.result(timeout=60) for k, f in plain.items()}
        for name in ("chat", "completions"):
            tail = results[name]
            assert tail[-1] == "data: [DONE]", (name, tail[-3:])
            assert json.loads(tail[-2][6:])["choices"][0]["finish_reason"] == "abort", (name, tail[-3:])
        for name in ("ollama_chat", "ollama_generate"):
            last = json.loads(results[name][-1])
            assert last["done"] is True and last["done_reason"] == "abort", (name, last)
        assert answers["chat"].status_code == 200
        assert answers["chat"].json()["choices"][0]["finish_reason"] == "abort"
        assert answers["ollama"].status_code == 200 and answers["ollama"].json()["done_reason"] == "abort"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    err = stderr()
    assert "Traceback" not in err and "CancelledError" not in err, err[-3000:]
    assert "shutdown timeout: 6 request(s) end now" in err


def _running(url: str) -> int:
    try:
        return httpx.get(url + "/health", timeout=5).json().get("running", 0)
    except (httpx.HTTPError, ValueError):
        return 0
