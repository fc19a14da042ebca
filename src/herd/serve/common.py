"""What the OpenAI and Ollama routes share: the server context, errors, strict body parsing, submitting to the
engine, watching for a vanished client, the streaming response, and turning chat events into content + tool calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated

from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from ..chat_format import ChatFormat, DialogError, ToolCall, split_tools
from ..config import JSONError, parse_json
from ..engine import ContextLengthError, Event, GenRequest
from .engine import BatchEngine, EngineClosedError, Handle, QueueFullError
from .metrics import ServerMetrics
from .security import BodyTooLarge, error_payload, read_body

log = logging.getLogger("herd.serve")
MAX_JSON_DEPTH = 64
# Stop strings, the same caps on both APIs (OpenAI's documented ones: up to 4 strings of at most 512 characters).
# The engine scans each generated token against them (generate.StopStrings: linear in the new text x stops).
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 512
StopStr = Annotated[str, StringConstraints(max_length=MAX_STOP_CHARS)]
MAX_JSON_STRING_BYTES = 1 << 20  # JSON carried inside a string field (tool-call arguments)
MAX_TOKEN_ID_DIGITS = 9  # a logit_bias key: ASCII digits only (str.isdigit() also accepts "²" and "٣")


class StrictModel(BaseModel):
    """Request schemas: no type coercion ("5" is not 5, 5.0 is not an int), unknown fields ignored (as OpenAI)."""

    model_config = ConfigDict(strict=True, extra="ignore")


@dataclass
class ServeContext:
    llm: object  # herd.api.LLM
    engine: BatchEngine
    model_name: str
    metrics: ServerMetrics
    max_body_bytes: int
    model_info: dict = field(default_factory=dict)  # format, parameter count, dtype... for /api/show, /v1/models
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def tokenizer(self):
        return self.llm.tokenizer

    @property
    def chat_format(self) -> ChatFormat:
        return self.llm.chat_format


class APIError(Exception):
    """A request the server refuses: becomes `status` with an OpenAI-style (or, under /api/, Ollama) error body."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers, self.extra = headers, extra  # extra: more fields for the error object (OpenAI shape only)


def error_response(path: str, err: APIError) -> JSONResponse:
    body = error_payload(path, err.message, err.type, err.code, err.param)
    if err.extra and isinstance(body["error"], dict):
        body["error"].update(err.extra)
    return JSONResponse(body, err.status, headers=err.headers)


class SafeRoute(APIRoute):
    """Routes whose unexpected exceptions become a generic 500 APIError (logged here, never shown to the client),
    so the connection stays usable: Starlette's last-resort handler would re-raise and drop it."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def safe(request):
            try:
                return await handler(request)
            except (APIError, HTTPException):
                raise
            except Exception:
                log.exception("internal error on %s %s", request.method, request.url.path)
                raise APIError(500, "internal server error", type_="server_error", code="internal_error") from None

        return safe


def parse_untrusted_json(text: str | bytes, what: str, *, param: str | None = None, code: str = "invalid_json",
                         max_bytes: int | None = MAX_JSON_STRING_BYTES):
    """The one parser for JSON the server receives, the body and JSON inside its strings (tool-call arguments):
    UTF-8, at most `max_bytes`, strict (no NaN / Infinity), nested at most MAX_JSON_DEPTH levels (checked before
    parsing: no RecursionError), numbers of at most 100 digits. Any failure is a 400 naming `what`."""
    if max_bytes is not None and len(text) > max_bytes:
        raise APIError(400, f"{what} is over {max_bytes} bytes", param=param, code=code)
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return parse_json(text, max_depth=MAX_JSON_DEPTH)
    except UnicodeDecodeError as e:
        raise APIError(400, f"{what} is not valid UTF-8 (byte {e.start})", param=param, code=code) from None
    except JSONError as e:
        where = f" (line {e.line})" if e.line and e.line > 1 else ""
        raise APIError(400, f"{what} is not valid JSON: {e.reason[:200]}{where}", param=param, code=code) from None


def parse_token_id(key: str, vocab: int, param: str) -> int:
    """A token id given as a string (a logit_bias key): ASCII digits only, at most MAX_TOKEN_ID_DIGITS, < vocab."""
    if not (0 < len(key) <= MAX_TOKEN_ID_DIGITS and key.isascii() and key.isdigit()) or int(key) >= vocab:
        raise APIError(400, f"{param} key {key[:20]!r} is not a token id in [0, {vocab})", param=param,
                       code="invalid_value")
    return int(key)


async def parse_body(request, ctx: ServeContext, schema: type[BaseModel]):
    """Read (capped), parse (parse_untrusted_json), and validate a JSON object body into `schema`."""
    try:
        raw = await read_body(request, ctx.max_body_bytes)
    except BodyTooLarge as e:
        raise APIError(413, str(e), code="body_too_large") from None
    except ClientDisconnect:  # the client went away mid-upload: one line, no traceback, nobody to answer
        log.info("client disconnected while sending the body of %s %s", request.method, request.url.path)
        raise APIError(400, "the client disconnected", code="client_disconnected") from None
    obj = parse_untrusted_json(raw, "request body", max_bytes=None)
    if not isinstance(obj, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(obj).__name__}", code="invalid_json")
    try:
        return schema.model_validate(obj)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        loc = ".".join(str(p) for p in first["loc"] if not str(p).startswith(("function-", "tagged-union")))
        param = loc.split(".")[0] if loc else None
        raise APIError(400, f"{loc or 'body'}: {first['msg']}", param=param, code="invalid_value") from None


def check_model(ctx: ServeContext, name: str, ollama: bool = False) -> None:
    names = {ctx.model_name, f"{ctx.model_name}:latest"} if ollama else {ctx.model_name}
    if name not in names:
        msg = f"model '{name}' not found" if ollama else (f"the model '{name}' does not exist; this server serves "
                                                          f"'{ctx.model_name}' (see /v1/models)")
        raise APIError(404, msg, param="model", code="model_not_found")


def tokens_for_request(ctx: ServeContext, prompt: list[int], max_tokens: int | None, param: str) -> int:
    """The context policy (engine.check_length) as an HTTP 400 carrying the counts."""
    try:
        return ctx.engine.check_length(len(prompt), max_tokens)
    except ContextLengthError as e:  # the counts as fields too, as llama.cpp's exceed_context_size_error has them
        extra = {"n_prompt_tokens": len(prompt), "max_tokens": max_tokens, "n_ctx": ctx.engine.max_seq_len}
        raise APIError(400, str(e), param=param, code="context_length_exceeded", extra=extra) from None


def submit(ctx: ServeContext, req: GenRequest, endpoint: str) -> Handle:
    try:
        handle = ctx.engine.submit(req, asyncio.get_running_loop())
    except QueueFullError as e:
        ctx.metrics.rejected.inc(reason="queue_full")
        raise APIError(503, str(e), type_="server_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineClosedError as e:
        ctx.metrics.rejected.inc(reason="shutting_down")
        raise APIError(503, str(e), type_="server_error", code="unavailable", headers={"Retry-After": "5"}) from None
    except ContextLengthError as e:
        raise APIError(400, str(e), code="context_length_exceeded") from None
    except ValueError as e:
        raise APIError(400, str(e), param="prompt", code="invalid_prompt") from None
    ctx.metrics.prompt_tokens.inc(len(req.prompt))
    handle.endpoint = endpoint
    return handle


def encode_chat(ctx: ServeContext, messages: list, tools: list | None) -> list[int]:
    """Chat-format prompt ids. Tools are checked first so their errors name `tools`; special-token text in any
    content stays text (the chat format inserts control tokens by id only)."""
    if tools is not None:
        try:
            split_tools(tools)
        except DialogError as e:
            raise APIError(400, str(e), param="tools", code="invalid_tools") from None
    try:
        return ctx.chat_format.encode_dialog_prompt(messages, tools)
    except DialogError as e:
        raise APIError(400, str(e), param="messages", code="invalid_messages") from None


# ---- a client that goes away ---------------------------------------------------------------------------------


async def _watch(receive, handles: list[Handle]) -> None:
    """Cancel the handles as soon as the client disconnects (the body has been read, so receive() waits for that)."""
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return


async def collect(request, handles: list[Handle]) -> list[list[Event]]:
    """All events of each handle (non-streaming replies); a disconnect cancels them within one engine step."""
    watcher = asyncio.ensure_future(_watch(request.receive, handles))

    async def drain(h: Handle) -> list[Event]:
        return [ev async for batch in h.batches() for ev in batch]

    try:
        return await asyncio.gather(*(drain(h) for h in handles))
    finally:
        watcher.cancel()
        for h in handles:
            h.cancel()


class StreamResponse(Response):
    """Streams `chunks` (SSE or NDJSON) and cancels `handles` when the client disconnects, when sending fails, or
    when the stream ends for any other reason, so a row never outlives its client by more than one step."""

    def __init__(self, chunks: AsyncIterator[bytes], handles: list[Handle], media_type: str):
        # no Response.__init__: it would declare Content-Length 0 for the empty body
        self.status_code, self.background, self.media_type = 200, None, media_type
        self.raw_headers = [(b"content-type", media_type.encode()), (b"cache-control", b"no-cache"),
                            (b"x-accel-buffering", b"no")]
        self.chunks, self.handles = chunks, handles

    async def __call__(self, scope, receive, send) -> None:
        watcher = asyncio.ensure_future(_watch(receive, self.handles))
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # uvicorn's ClientDisconnected: the client is gone
            pass
        except Exception:  # headers are sent: log it and end the body (the stream lacks its final marker)
            log.exception("internal error while streaming")
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            for h in self.handles:
                h.cancel()
            await self.chunks.aclose()


async def merged(handles: list[Handle]) -> AsyncIterator[tuple[int, list[Event]]]:
    """(index, event batch) from several handles as they arrive, until all have finished."""
    if len(handles) == 1:
        async for batch in handles[0].batches():
            yield 0, batch
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, h: Handle):
        async for batch in h.batches():
            await queue.put((i, batch))

    tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
    left = len(handles)
    try:
        while left:
            i, batch = await queue.get()
            left -= batch[-1].finish is not None
            yield i, batch
    finally:
        for t in tasks:
            t.cancel()


# ---- chat replies: content deltas, then tool calls ----------------------------------------------------------


class ChatAssembler:
    """Follows one chat reply. With tools, text that may be a tool call (a leading <|python_tag|>, `{` or
    `<function=`) is held back instead of streamed; at the end `ChatFormat.decode_assistant_message` parses the
    generated ids, and a call becomes `tool_calls` with finish reason "tool_calls"."""

    def __init__(self, chat_format: ChatFormat, tools: bool):
        self.cf, self.tools = chat_format, tools
        self.ids: list[int] = []  # generated ids, without a stop token
        self.stop_token: int | None = None
        self.finish: str | None = None
        self.error: Event | None = None
        self.events: list[Event] = []  # those carrying a token (for logprobs)
        self.mode = "undecided" if tools else "text"  # -> "text" (streaming) or "held" (a tool call)
        self.held = ""

    def feed(self, ev: Event) -> str:
        """-> content to emit now."""
        if ev.token is not None:
            self.events.append(ev)
            if ev.finish == "stop" and ev.stop == ev.token:
                self.stop_token = ev.token
            else:
                self.ids.append(ev.token)
        if ev.finish is not None:
            self.finish = ev.finish
            if ev.finish == "error" or (ev.error and ev.error_code != "shutdown"):
                self.error = ev  # (a request cut by the server's shutdown ends normally, with finish "abort")
        if self.mode == "text":
            return ev.text
        self.held += ev.text
        if self.mode == "undecided":
            if self.ids and self.ids[0] == self.cf.tokenizer.python_tag_id:
                self.mode = "held"
            else:
                s = self.held.lstrip()
                if s.startswith(("{", "<function")):
                    self.mode = "held"
                elif s and not "<function".startswith(s):
                    self.mode, out, self.held = "text", self.held, ""
                    return out
        return ""

    def result(self) -> tuple[str, list[ToolCall], str]:
        """After the last event -> (content not yet emitted, tool calls, finish reason)."""
        calls, content = [], self.held
        if self.tools and self.finish in ("stop", "length"):
            tail = [self.stop_token] if self.stop_token is not None else []
            msg = self.cf.decode_assistant_message(self.ids + tail)
            if msg.tool_calls:
                calls = msg.tool_calls
                content = msg.content if self.mode != "text" else ""
        self.held = ""
        return content, calls, "tool_calls" if calls else (self.finish or "abort")


def token_text(tokenizer, token: int) -> str:
    return tokenizer.token_bytes(token).decode("utf-8", errors="replace")
