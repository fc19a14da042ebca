"""Ollama-compatible routes: /api/chat, /api/generate (NDJSON streaming, on by default as in Ollama), /api/tags,
/api/show, /api/ps, /api/version. Errors use Ollama's body, {"error": "message"}, which its clients read.

Options map onto herd's sampling: temperature, top_p, top_k, min_p, num_predict (-1 / -2: the rest of the
context), stop, seed, repeat_penalty, presence_penalty, frequency_penalty. num_ctx and the other runner options
are accepted and ignored: the context is the server's --max-seq-len.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timezone
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import JSONResponse

from .. import __version__
from ..sampling import GenerationError, SamplingParams
from .common import (
    MAX_STOP_STRINGS, APIError, ChatAssembler, SafeRoute, ServeContext, StopStr, StreamResponse, StrictModel,
    check_model, collect, encode_chat, merged, parse_body, submit, tokens_for_request,
)
from ..engine import Event, GenRequest
from .engine import Handle
from .openai import ToolDef

router = APIRouter(route_class=SafeRoute)


class Options(StrictModel):
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, lt=1)
    num_predict: int | None = Field(None, ge=-2)
    stop: list[StopStr] | None = Field(None, max_length=MAX_STOP_STRINGS)  # the OpenAI API's caps
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    repeat_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    num_ctx: int | None = None


class ToolCallFunction(StrictModel):
    name: str
    arguments: dict = Field(default_factory=dict)


class ToolCallIn(StrictModel):
    function: ToolCallFunction


class Message(StrictModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_name: str | None = None


class _Common(StrictModel):
    model: str
    stream: bool = True
    format: str | dict | None = None
    options: Options | None = None
    keep_alive: str | int | float | None = None


class ChatRequest(_Common):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolDef] | None = Field(None, max_length=128)


class GenerateRequest(_Common):
    prompt: str = ""
    system: str | None = None
    template: str | None = None
    suffix: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list | None = None


def _ctx(request: Request) -> ServeContext:
    return request.app.state.ctx


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))


def _params(opts: Options | None) -> tuple[SamplingParams, list[str]]:
    o = opts or Options()
    kw = {"temperature": o.temperature, "top_p": o.top_p, "top_k": o.top_k, "min_p": o.min_p,
          "repetition_penalty": o.repeat_penalty, "presence_penalty": o.presence_penalty,
          "frequency_penalty": o.frequency_penalty, "seed": None if o.seed is None else o.seed % 2**63}
    try:
        return SamplingParams(**{k: v for k, v in kw.items() if v is not None}), list(o.stop or [])
    except GenerationError as e:
        raise APIError(400, str(e)) from None


def _max_tokens(opts: Options | None) -> int | None:
    n = opts.num_predict if opts else None
    if n == 0:
        raise APIError(400, "num_predict must be positive, or -1 / -2 for the rest of the context")
    return None if n is None or n < 0 else n


def _unsupported(body: _Common, images) -> None:
    if body.format:
        raise APIError(400, "format (structured output) is not supported by this server")
    if images:
        raise APIError(400, "images are not supported: this is a text model")


def _final(ctx: ServeContext, handle: Handle, finish: str) -> dict:
    end = handle.finished_at or time.perf_counter()
    first = handle.first_token_at or end
    return {"done": True, "done_reason": finish, "total_duration": _ns(end - handle.submitted_at),
            "load_duration": 0, "prompt_eval_count": handle.prompt_tokens - handle.cached_tokens,  # as Ollama: evaluated
            "prompt_eval_duration": _ns(first - handle.submitted_at), "eval_count": handle.n_generated,
            "eval_duration": _ns(end - first)}


def _ndjson(obj) -> bytes:
    return json.dumps(obj, ensure_ascii=False).encode() + b"\n"


def _raise_error(events: list[Event]) -> None:
    bad = [ev for ev in events if ev.finish == "error"]
    if bad:
        raise APIError(503 if bad[0].error_code == "queue_timeout" else 500, bad[0].error or "generation failed",
                       type_="server_error", code=bad[0].error_code)


def _load_reply(ctx: ServeContext, chat: bool) -> JSONResponse:
    """Ollama answers an empty prompt / message list by loading the model: done_reason "load"."""
    body = {"model": ctx.model_name, "created_at": _now(), "done": True, "done_reason": "load"}
    body.update({"message": {"role": "assistant", "content": ""}} if chat else {"response": ""})
    return JSONResponse(body)


# ---- /api/chat ------------------------------------------------------------------------------------------------


def _messages(body: ChatRequest) -> list[dict]:
    out = []
    for m in body.messages:
        d = {"role": m.role, "content": m.content}
        if m.tool_calls:
            d["tool_calls"] = [{"tool_name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
        out.append(d)
    return out


@router.post("/api/chat")
async def chat(request: Request):
    ctx = _ctx(request)
    body = await parse_body(request, ctx, ChatRequest)
    check_model(ctx, body.model, ollama=True)
    _unsupported(body, [im for m in body.messages for im in (m.images or [])])
    if not body.messages:
        return _load_reply(ctx, chat=True)
    tools = None
    if body.tools:
        tools = [{"type": "function", "function": t.function.model_dump(exclude_none=True)} if t.type == "function"
                 and t.function else t.type for t in body.tools]
    prompt = encode_chat(ctx, _messages(body), tools)
    params, stops = _params(body.options)
    max_tokens = tokens_for_request(ctx, prompt, _max_tokens(body.options), "num_predict")
    handle = submit(ctx, GenRequest(prompt, max_tokens, params, stops, skip_special=True), "ollama_chat")
    asm = ChatAssembler(ctx.chat_format, tools is not None)

    def message(content: str, calls=()) -> dict:
        m = {"role": "assistant", "content": content}
        if calls:
            m["tool_calls"] = [{"function": {"name": c.tool_name, "arguments": c.arguments}} for c in calls]
        return m

    if not body.stream:
        (events,) = await collect(request, [handle])
        text = "".join(asm.feed(ev) for ev in events)
        tail, calls, finish = asm.result()
        _raise_error(events)
        return JSONResponse({"model": ctx.model_name, "created_at": _now(), "message": message(text + tail, calls),
                             **_final(ctx, handle, "stop" if finish == "tool_calls" else finish)})

    async def stream():
        async for _, batch in merged([handle]):
            text = "".join(asm.feed(ev) for ev in batch)
            if text:
                yield _ndjson({"model": ctx.model_name, "created_at": _now(), "message": message(text), "done": False})
        tail, calls, finish = asm.result()
        if asm.error is not None:
            yield _ndjson({"error": asm.error.error or "generation aborted"})
            return
        if tail or calls:
            yield _ndjson({"model": ctx.model_name, "created_at": _now(), "message": message(tail, calls),
                           "done": False})
        yield _ndjson({"model": ctx.model_name, "created_at": _now(), "message": message(""),
                       **_final(ctx, handle, "stop" if finish == "tool_calls" else finish)})

    return StreamResponse(stream(), [handle], "application/x-ndjson")


# ---- /api/generate --------------------------------------------------------------------------------------------


def _generate_prompt(ctx: ServeContext, body: GenerateRequest) -> list[int]:
    tok, cf = ctx.tokenizer, ctx.chat_format
    if body.context is not None and any(not 0 <= t < tok.n_words for t in body.context):
        raise APIError(400, f"context has a token id outside the vocabulary [0, {tok.n_words})")
    if body.raw:
        return (body.context or [tok.bos_id]) + tok.encode(body.prompt)
    if not body.context:  # a one-turn chat, as Ollama's template does
        messages = ([{"role": "system", "content": body.system}] if body.system else [])
        return encode_chat(ctx, messages + [{"role": "user", "content": body.prompt}], None)
    # continue an earlier exchange: its ids (prompt + reply), the reply's end, then the new user turn
    ids = list(body.context)
    if ids[-1] not in tok.stop_tokens:
        ids.append(tok.eot_id)
    return ids + cf.encode_message({"role": "user", "content": body.prompt}) + cf.encode_header("assistant")


@router.post("/api/generate")
async def generate(request: Request):
    ctx = _ctx(request)
    body = await parse_body(request, ctx, GenerateRequest)
    check_model(ctx, body.model, ollama=True)
    _unsupported(body, body.images)
    if body.suffix or body.template:
        raise APIError(400, "suffix and template are not supported (the Llama 3.1 chat format is built in)")
    if not body.prompt and not body.context:
        return _load_reply(ctx, chat=False)
    prompt = _generate_prompt(ctx, body)
    params, stops = _params(body.options)
    max_tokens = tokens_for_request(ctx, prompt, _max_tokens(body.options), "num_predict")
    handle = submit(ctx, GenRequest(prompt, max_tokens, params, stops, skip_special=not body.raw), "ollama_generate")

    def context(events: list[Event]) -> list[int]:
        return prompt + [ev.token for ev in events if ev.token is not None]

    if not body.stream:
        (events,) = await collect(request, [handle])
        _raise_error(events)
        finish = events[-1].finish if events else "abort"
        return JSONResponse({"model": ctx.model_name, "created_at": _now(),
                             "response": "".join(ev.text for ev in events), **_final(ctx, handle, finish),
                             "context": context(events)})

    async def stream():
        seen: list[Event] = []
        async for _, batch in merged([handle]):
            seen += batch
            last = batch[-1]
            if last.finish == "error":
                yield _ndjson({"error": last.error or "generation failed"})
                return
            text = "".join(ev.text for ev in batch)
            if text:
                yield _ndjson({"model": ctx.model_name, "created_at": _now(), "response": text, "done": False})
            if last.finish is not None:
                yield _ndjson({"model": ctx.model_name, "created_at": _now(), "response": "",
                               **_final(ctx, handle, last.finish), "context": context(seen)})

    return StreamResponse(stream(), [handle], "application/x-ndjson")


# ---- model listing --------------------------------------------------------------------------------------------


def _details(ctx: ServeContext) -> dict:
    info = ctx.model_info
    return {"parent_model": "", "format": info.get("format", "pytorch"), "family": "llama", "families": ["llama"],
            "parameter_size": info.get("parameter_size", ""), "quantization_level": info.get("dtype", "")}


def _tag(ctx: ServeContext) -> str:
    return ctx.model_name if ":" in ctx.model_name else f"{ctx.model_name}:latest"


def _modified(ctx: ServeContext) -> str:
    return datetime.fromtimestamp(ctx.created, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@router.get("/api/tags")
async def tags(request: Request):
    ctx = _ctx(request)
    return {"models": [{"name": _tag(ctx), "model": _tag(ctx), "modified_at": _modified(ctx),
                        "size": ctx.model_info.get("bytes", 0), "digest": ctx.model_info.get("digest", ""),
                        "details": _details(ctx)}]}


@router.get("/api/ps")
async def ps(request: Request):
    ctx = _ctx(request)
    return {"models": [{"name": _tag(ctx), "model": _tag(ctx), "size": ctx.model_info.get("bytes", 0),
                        "digest": ctx.model_info.get("digest", ""), "details": _details(ctx),
                        "expires_at": "9999-12-31T23:59:59Z", "size_vram": 0,
                        "context_length": ctx.engine.max_seq_len}]}


class ShowRequest(StrictModel):
    model: str | None = None
    name: str | None = None  # older clients


@router.post("/api/show")
async def show(request: Request):
    ctx = _ctx(request)
    body = await parse_body(request, ctx, ShowRequest)
    check_model(ctx, body.model or body.name or "", ollama=True)
    a = ctx.llm.model.args
    return {
        "modelfile": f"# served by herd {__version__}\nFROM {ctx.model_name}\n",
        "parameters": "stop \"<|eot_id|>\"\nstop \"<|eom_id|>\"\nstop \"<|end_of_text|>\"",
        "template": "(Llama 3.1 chat format, built into herd)",
        "details": _details(ctx),
        "model_info": {"general.architecture": "llama", "general.parameter_count": ctx.model_info.get("parameters", 0),
                       "llama.context_length": ctx.engine.max_seq_len, "llama.embedding_length": a.dim,
                       "llama.block_count": a.n_layers, "llama.attention.head_count": a.n_heads,
                       "llama.attention.head_count_kv": a.n_kv_heads, "llama.vocab_size": a.vocab_size,
                       "llama.rope.freq_base": a.rope_theta},
        "capabilities": ["completion", "tools"],
        "modified_at": _modified(ctx),
    }


@router.get("/api/version")
async def version():
    return {"version": __version__}
