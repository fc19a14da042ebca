"""The FastAPI app (create_app), the uvicorn runner behind `herd serve` (run), and ServerThread for tests,
benchmarks and notebooks.

    llm = herd.load("Llama-3.1-8B-Instruct/")
    app = create_app(llm)                               # or: run(llm, port=8000)
    with ServerThread(app) as srv:                      # 127.0.0.1, a free port
        openai.OpenAI(base_url=srv.url + "/v1", api_key="-").chat.completions.create(...)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import sys
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

from .common import APIError, ServeContext, error_response, log
from .engine import BatchEngine
from .metrics import ServerMetrics
from .security import (
    DEFAULT_KEEP_ALIVE, DEFAULT_MAX_BODY, DEFAULT_MAX_CONNECTIONS, DEFAULT_READ_TIMEOUT, ConnectionLimits, Guard,
    check_bind, is_loopback, limited_h11,
)

STATIC = Path(__file__).parent / "static"


def create_app(llm, *, model_name: str | None = None, host: str = "127.0.0.1", api_key: str | None = None,
               max_batch: int = 64, max_queue: int = 64, max_seq_len: int | None = None, prefill_chunk: int = 512,
               queue_timeout: float = 600.0, max_body_bytes: int = DEFAULT_MAX_BODY, allow_origins: tuple = (),
               model_info: dict | None = None, kv_cache_gb: float | None = None, prefix_cache: bool = True,
               compile: bool = False) -> Guard:
    """An ASGI app serving `llm` (the engine thread starts with the app's lifespan and stops with it).

    `host` is where it will listen: on a loopback address, Host headers must be loopback names (DNS rebinding).
    With `compile`, the decode step is compiled for every batch-size bucket before the app starts serving.
    Returns the app wrapped in the security Guard; the FastAPI app itself is `.app`, its context `.app.state.ctx`.
    """
    metrics = ServerMetrics()
    engine = BatchEngine(llm, max_batch=max_batch, max_queue=max_queue, max_seq_len=max_seq_len,
                         prefill_chunk=prefill_chunk, queue_timeout=queue_timeout, metrics=metrics,
                         kv_cache_gb=kv_cache_gb, prefix_cache=prefix_cache, compile=compile)
    engine.warmup()
    metrics.slots.set(max_batch)
    metrics.kv_blocks_total.set(engine.core.pool.usable)
    metrics.kv_block_bytes.set(engine.core.block_bytes)
    ctx = ServeContext(llm, engine, model_name or "herd", metrics, max_body_bytes, model_info or describe(llm))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="herd", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    from . import ollama, openai  # noqa: PLC0415 (routes import common, which must not import app)

    app.include_router(openai.router)
    app.include_router(ollama.router)
    _add_routes(app, ctx)
    _add_error_handlers(app)
    return Guard(app, api_key=api_key, loopback_bind=is_loopback(host), max_body_bytes=max_body_bytes,
                 allow_origins=tuple(allow_origins))


def describe(llm, path: str | None = None) -> dict:
    """Facts for /api/tags and /api/show: format, parameter count and size, dtype."""
    model = llm.model
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    fmt = "pytorch"
    if path:
        p = Path(path)
        fmt = "gguf" if p.suffix == ".gguf" else "safetensors" if (p / "config.json").exists() else "pth"
    dtype = str(model.tok_embeddings.weight.dtype).replace("torch.", "").upper().replace("BFLOAT16", "BF16")
    return {"format": fmt, "parameters": n, "parameter_size": f"{n / 1e9:.1f}B" if n >= 1e8 else f"{n / 1e6:.1f}M",
            "bytes": nbytes, "dtype": dtype, "digest": hashlib.sha256(f"{path}:{n}".encode()).hexdigest()}


def _add_routes(app: FastAPI, ctx: ServeContext) -> None:
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    headers = {
        # The page builds the DOM with textContent only; these headers keep it from being framed or sniffed.
        "content-security-policy": "default-src 'self'; script-src 'self' 'unsafe-inline'; "
                                   "style-src 'self' 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'",
        "x-content-type-options": "nosniff", "x-frame-options": "DENY", "referrer-policy": "no-referrer",
    }

    @app.get("/", include_in_schema=False)
    async def playground():
        return HTMLResponse(page, headers=headers)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response(status_code=204)

    @app.get("/health")
    async def health():
        if not ctx.engine.alive:
            return JSONResponse({"status": "error", "detail": "the generation engine is not running"}, 503)
        if ctx.engine.draining:
            return JSONResponse({"status": "draining"}, 503)
        return {"status": "ok", "model": ctx.model_name, "running": ctx.engine.running,
                "waiting": ctx.engine.waiting}

    @app.get("/metrics")
    async def metrics():
        ctx.metrics.running.set(ctx.engine.running)
        ctx.metrics.waiting.set(ctx.engine.waiting)
        return PlainTextResponse(ctx.metrics.render(), media_type="text/plain; version=0.0.4")


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return error_response(request.url.path, exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        msg = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else str(exc.detail)
        # a 405 carries Starlette's Allow header (the route's methods), as RFC 9110 requires
        return error_response(request.url.path, APIError(exc.status_code, msg, code=code, headers=exc.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        return error_response(request.url.path, APIError(400, "invalid request", code="invalid_value"))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):  # never a traceback or a path to the client
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(request.url.path, APIError(500, "internal server error", type_="server_error",
                                                         code="internal_error"))


# ---- running it ---------------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _uvicorn_config(app, limits: ConnectionLimits, timeout_keep_alive: float = DEFAULT_KEEP_ALIVE, **kw):
    import uvicorn

    # h11 caps one header block at 64 KiB: a 1 MB header or a flood of headers is a 400 before any route runs;
    # limited_h11 adds the read timeouts and the connection cap (security.py).
    return uvicorn.Config(app, http=limited_h11(limits), ws="none", lifespan="on",
                          h11_max_incomplete_event_size=64 << 10, timeout_keep_alive=timeout_keep_alive,
                          server_header=False, **kw)


def _fd_headroom(max_connections: int) -> int:
    """max_connections, lowered (with a warning) to what the open-files limit leaves after 64 for the process's own
    files; the soft limit is raised towards the hard one first when that is needed and allowed."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        if soft < need:
            log.warning("--max-connections %d lowered to %d: the open-files limit (ulimit -n) is %d",
                        max_connections, max(1, soft - 64), soft)
            return max(1, soft - 64)
    return max_connections


class ServerThread:
    """Run an app in a background thread on `host` (default 127.0.0.1) and a free port; `.url`, `.stop()`;
    `.limits` (a ConnectionLimits) counts the connections refused, evicted and timed out."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", *,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS, read_timeout: float = DEFAULT_READ_TIMEOUT,
                 timeout_keep_alive: float = DEFAULT_KEEP_ALIVE):
        import uvicorn

        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        self.limits = ConnectionLimits(max_connections, read_timeout)
        self.server = uvicorn.Server(_uvicorn_config(app, self.limits, timeout_keep_alive, log_level=log_level,
                                                     timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def run(llm, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None, insecure: bool = False,
        shutdown_timeout: float = 10.0, log_level: str = "info", max_connections: int = DEFAULT_MAX_CONNECTIONS,
        read_timeout: float = DEFAULT_READ_TIMEOUT, timeout_keep_alive: float = DEFAULT_KEEP_ALIVE, **app_kw) -> None:
    """Serve until SIGINT / SIGTERM, then drain (docs/serving.md): the listener stays open and new requests get
    503 while running ones have `shutdown_timeout` seconds to finish; the rest then end in-band with finish_reason
    "abort" (a last SSE chunk and [DONE], an NDJSON `done: true`, or the non-streaming response)."""
    import uvicorn

    check_bind(host, api_key, insecure)
    limits = ConnectionLimits(_fd_headroom(max_connections), read_timeout)
    sock = _bind(host, port)
    app = create_app(llm, host=host, api_key=api_key, **app_kw)
    engine = app.app.state.ctx.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame):
            engine.draining = True  # /health -> 503, new requests -> 503
            super().handle_exit(sig, frame)

        async def shutdown(self, sockets=None):
            await drain(engine, shutdown_timeout, self)
            await super().shutdown(sockets=sockets)

    url = f"http://{'localhost' if is_loopback(host) else host}:{sock.getsockname()[1]}"
    _banner(url, app.app.state.ctx, api_key)
    # (uvicorn's own graceful wait comes after the drain, for connections whose last bytes are still in flight)
    server = Server(_uvicorn_config(app, limits, timeout_keep_alive, log_level=log_level, timeout_graceful_shutdown=3))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()


async def drain(engine, timeout: float, server, settle: float = 5.0) -> None:
    """The graceful part of a shutdown, on the server's event loop before uvicorn closes its listener: keep serving
    (new generation requests get 503 `unavailable`, /health 503 "draining") until nothing runs or waits in the
    engine, at most `timeout` s; then close the engine, which ends every request still there with finish "abort",
    and give their handlers up to `settle` s to send that ending (uses only engine.running / waiting / draining /
    close, and uvicorn's server_state.tasks)."""
    engine.draining = True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    busy = lambda: engine.running + engine.waiting  # noqa: E731
    if busy():
        log.info("shutting down: %d request(s) running or waiting get up to %g s to finish", busy(), timeout)
    while busy() and loop.time() < deadline and not server.force_exit:
        await asyncio.sleep(0.05)
    if busy():
        log.info("shutdown timeout: %d request(s) end now with finish_reason \"abort\"", busy())
    await asyncio.to_thread(engine.close)
    this, end = asyncio.current_task(), loop.time() + settle
    while any(t is not this and not t.done() for t in server.server_state.tasks) and loop.time() < end \
            and not server.force_exit:
        await asyncio.sleep(0.02)


def _banner(url: str, ctx: ServeContext, api_key: str | None) -> None:
    key = "$HERD_API_KEY" if api_key else "none"
    auth = ' -H "Authorization: Bearer $HERD_API_KEY"' if api_key else ""
    e = ctx.engine
    kv = e.core.kv_tokens
    print(f"""herd serving {ctx.model_name}: up to {e.max_batch} sequences, {e.max_seq_len} tokens of context each, \
KV cache {kv:,} tokens ({e.core.pool.usable * e.core.block_bytes / 2**30:.2f} GiB{", prefix caching" if e.core.pool.prefix_cache else ""}), \
queue {e.max_queue}{", compiled decode" if e.core.compiled else ""}

  playground  {url}/
  OpenAI API  {url}/v1      Ollama API  {url}/api      metrics  {url}/metrics

  curl {url}/v1/chat/completions{auth} -H "Content-Type: application/json" \\
    -d '{{"model": "{ctx.model_name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key="{key}")
  r = c.chat.completions.create(model="{ctx.model_name}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(r.choices[0].message.content)'
""", file=sys.stderr, flush=True)


def run_cli(args) -> int:
    """`herd serve`: load the model named by the flags and serve it (see cli.add_serve)."""
    from ..api import load, random_llm
    from ..config import CONFIGS

    if not args.model:
        if args.random_weights:
            raise ValueError("--random-weights needs --model CONFIG (e.g. tiny-llama3-vocab)")
        from ..default_model import resolve

        args.model = resolve(None)
        args.served_model_name = args.served_model_name or "herd-shakespeare"
    api_key = args.api_key or os.environ.get("HERD_API_KEY") or None
    check_bind(args.host, api_key, args.insecure)  # before the (slow) load
    if args.random_weights:
        if args.model not in CONFIGS:
            raise ValueError(f"--random-weights takes a config name ({', '.join(sorted(CONFIGS))}), got {args.model!r}")
        llm = random_llm(args.model, device=args.device, dtype=args.dtype or "bf16")
        name, info = args.served_model_name or args.model, describe(llm)
    else:
        print(f"loading {args.model} ...", file=sys.stderr, flush=True)
        llm = load(args.model, device=args.device, dtype=args.dtype, tokenizer=args.tokenizer)
        name = args.served_model_name or Path(args.model.rstrip("/")).name
        info = describe(llm, args.model)
    logging.basicConfig(level=logging.INFO)
    run(llm, host=args.host, port=args.port, api_key=api_key, insecure=args.insecure, model_name=name,
        max_batch=args.max_batch, max_queue=args.max_queue, max_seq_len=args.max_seq_len,
        queue_timeout=args.queue_timeout, max_body_bytes=args.max_body_bytes,
        allow_origins=tuple(args.allow_origin or ()), model_info=info, shutdown_timeout=args.shutdown_timeout,
        max_connections=args.max_connections, read_timeout=args.read_timeout,
        timeout_keep_alive=args.timeout_keep_alive,
        kv_cache_gb=args.kv_cache_gb, prefix_cache=not args.no_prefix_cache, compile=not args.no_compile)
    return 0
