"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models (schemas, then handlers).

Field bounds follow OpenAI's API reference (temperature 0..2, top_p (0, 1], penalties -2..2, logit_bias -100..100,
at most 4 stop strings of 512 characters (common.MAX_STOP_*, the Ollama API's too), top_logprobs 0..20). Unset
sampling fields take Meta's Llama 3.1 defaults (temperature 0.6, top_p 0.9), as vLLM does from the model's
generation_config. herd extras: top_k, min_p, repetition_penalty.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import JSONResponse

from ..sampling import GenerationError, SamplingParams
from .common import (
    MAX_STOP_STRINGS, APIError, ChatAssembler, SafeRoute, ServeContext, StopStr, StreamResponse, StrictModel,
    check_model, collect, encode_chat, merged, parse_body, parse_token_id, parse_untrusted_json, submit, token_text,
    tokens_for_request,
)
from ..engine import Event, GenRequest

router = APIRouter(route_class=SafeRoute)
Stop = StopStr | Annotated[list[StopStr], Field(max_length=MAX_STOP_STRINGS)] | None


class SamplingFields(StrictModel):
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=-1)  # -1 (vLLM's "off") or 0: off
    min_p: float | None = Field(None, ge=0, lt=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Stop = None
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = Field(None, max_length=300)
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: dict | None = None

    def params(self) -> SamplingParams:
        kw = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                            "presence_penalty", "frequency_penalty") if getattr(self, k) is not None}
        kw["top_k"] = max(kw.get("top_k", 0), 0)
        if self.seed is not None:
            kw["seed"] = self.seed % 2**63
        try:
            return SamplingParams(**kw)
        except GenerationError as e:
            raise APIError(400, str(e)) from None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def bias(self, vocab: int) -> dict[int, float] | None:
        if not self.logit_bias:
            return None
        return {parse_token_id(k, vocab, "logit_bias"): v for k, v in self.logit_bias.items()}

    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(StrictModel):
    name: str
    arguments: str | dict = "{}"


class ToolCallIn(StrictModel):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class FunctionDef(StrictModel):
    name: str
    description: str | None = None
    parameters: dict | None = None


class ToolDef(StrictModel):
    type: Literal["function", "brave_search", "wolfram_alpha", "code_interpreter"]
    function: FunctionDef | None = None


class ChatRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: str | dict | None = None
    response_format: dict | None = None


class CompletionRequest(SamplingFields):
    model: str
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's legacy default
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1, le=1)


def _ctx(request: Request) -> ServeContext:
    return request.app.state.ctx


def _new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


def _usage(prompt: int, completion: int, cached: int = 0) -> dict:
    """OpenAI's usage; `cached` prompt tokens came from the prefix cache (prompt_tokens_details.cached_tokens)."""
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _error_chunk(ev: Event) -> dict:
    return {"error": {"message": ev.error or "generation aborted", "type": "server_error", "param": None,
                      "code": ev.error_code}}


# ---- /v1/models -----------------------------------------------------------------------------------------------


def _model_card(ctx: ServeContext) -> dict:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "herd",
            "max_model_len": ctx.engine.max_seq_len}


@router.get("/v1/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(_ctx(request))]}


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str):
    ctx = _ctx(request)
    check_model(ctx, model_id)
    return _model_card(ctx)


# ---- /v1/chat/completions -------------------------------------------------------------------------------------


def _chat_messages(body: ChatRequest) -> list[dict]:
    out = []
    for m in body.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        for call in d.get("tool_calls", []):
            args = call["function"].get("arguments")
            if isinstance(args, str):  # OpenAI sends arguments as JSON in a string: untrusted, parsed with limits
                call["function"]["arguments"] = parse_untrusted_json(args, "tool call arguments", param="messages",
                                                                     code="invalid_value") if args.strip() else {}
        out.append(d)
    return out


def _tools(body: ChatRequest) -> list | None:
    if body.tool_choice is not None and not body.tools:  # as OpenAI answers it
        raise APIError(400, "tool_choice is only allowed when tools are specified", param="tool_choice")
    if not body.tools or body.tool_choice == "none":
        return None
    if body.tool_choice not in (None, "auto"):
        raise APIError(400, "tool_choice must be 'auto' or 'none' (forcing a call is not supported)",
                       param="tool_choice")
    out = []
    for k, t in enumerate(body.tools):
        if t.type == "function":
            if t.function is None:
                raise APIError(400, f"tools.{k}: a function tool needs 'function'", param="tools")
            out.append({"type": "function", "function": t.function.model_dump(exclude_none=True)})
        else:
            out.append(t.type)  # a Llama 3.1 built-in tool
    return out


def _chat_logprobs(ctx: ServeContext, events: list[Event]) -> dict:
    tok = ctx.tokenizer

    def entry(t: int, lp: float) -> dict:
        return {"token": token_text(tok, t), "logprob": lp, "bytes": list(tok.token_bytes(t))}

    return {"content": [{**entry(ev.token, ev.logprob),
                         "top_logprobs": [entry(t, v) for t, v in (ev.top_logprobs or {}).items()]}
                        for ev in events if ev.logprob is not None]}


@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    ctx = _ctx(request)
    body = await parse_body(request, ctx, ChatRequest)
    check_model(ctx, body.model)
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "response_format other than 'text' is not supported", param="response_format")
    if body.top_logprobs and not body.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs")
    tools = _tools(body)
    prompt = encode_chat(ctx, _chat_messages(body), tools)
    max_tokens = tokens_for_request(ctx, prompt, body.max_completion_tokens or body.max_tokens, "max_tokens")
    req = GenRequest(prompt, max_tokens, body.params(), body.stops(), None, body.logprobs, body.top_logprobs or 0,
                     body.bias(ctx.llm.model.args.vocab_size), skip_special=True)
    handle = submit(ctx, req, "chat")
    rid, created = _new_id("chatcmpl"), int(time.time())
    head = {"id": rid, "created": created, "model": ctx.model_name, "system_fingerprint": "herd"}
    asm = ChatAssembler(ctx.chat_format, tools is not None)

    if not body.stream:
        (events,) = await collect(request, [handle])
        content = "".join(asm.feed(ev) for ev in events)
        tail, calls, finish = asm.result()
        if asm.error is not None:
            raise APIError(503 if asm.error.error_code in ("queue_timeout", "shutdown") else 500,
                           asm.error.error or "generation aborted", type_="server_error", code=asm.error.error_code)
        message: dict[str, Any] = {"role": "assistant", "content": (content + tail) or (None if calls else "")}
        if calls:
            message["tool_calls"] = [c.to_openai() for c in calls]
        choice = {"index": 0, "message": message, "finish_reason": finish,
                  "logprobs": _chat_logprobs(ctx, asm.events) if body.logprobs else None}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice],
                             "usage": _usage(len(prompt), handle.n_generated, handle.cached_tokens)})

    chunk_head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict, finish=None, logprobs=None) -> bytes:
        return _sse({**chunk_head, "choices": [{"index": 0, "delta": delta, "logprobs": logprobs,
                                                "finish_reason": finish}]})

    async def stream():
        yield chunk({"role": "assistant", "content": ""})
        async for _, batch in merged([handle]):
            text = "".join(asm.feed(ev) for ev in batch)
            lp = _chat_logprobs(ctx, [ev for ev in batch if ev.token is not None]) if body.logprobs else None
            if text or (lp and lp["content"]):
                yield chunk({"content": text}, logprobs=lp)
        tail, calls, finish = asm.result()
        if asm.error is not None:
            yield _sse(_error_chunk(asm.error))
        else:
            if tail:
                yield chunk({"content": tail})
            if calls:
                yield chunk({"tool_calls": [{"index": i, **c.to_openai()} for i, c in enumerate(calls)]})
            yield chunk({}, finish)
            if body.include_usage():
                usage = _usage(len(prompt), handle.n_generated, handle.cached_tokens)
                yield _sse({**chunk_head, "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    return StreamResponse(stream(), [handle], "text/event-stream")


# ---- /v1/completions ------------------------------------------------------------------------------------------


def _prompts(ctx: ServeContext, body: CompletionRequest) -> list[list[int]]:
    p, tok = body.prompt, ctx.tokenizer
    items = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else p
    if not items or len(items) > 32:
        raise APIError(400, "prompt must be a string, a list of token ids, or a list of 1 to 32 of either",
                       param="prompt")
    out = []
    for x in items:
        ids = tok.encode(x, bos=True) if isinstance(x, str) else list(x)
        if not ids or (isinstance(x, str) and not x):
            raise APIError(400, "empty prompt", param="prompt", code="invalid_prompt")
        if min(ids) < 0 or max(ids) >= tok.n_words:
            raise APIError(400, f"prompt has a token id outside the vocabulary [0, {tok.n_words})", param="prompt",
                           code="invalid_prompt")
        out.append(ids)
    return out


def _completion_logprobs(ctx: ServeContext, events: list[Event], offset: int) -> dict:
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        if ev.logprob is None:
            continue
        text = token_text(ctx.tokenizer, ev.token)
        tokens.append(text)
        lps.append(ev.logprob)
        tops.append({token_text(ctx.tokenizer, t): v for t, v in (ev.top_logprobs or {}).items()})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


@router.post("/v1/completions")
async def completions(request: Request):
    ctx = _ctx(request)
    body = await parse_body(request, ctx, CompletionRequest)
    check_model(ctx, body.model)
    if body.suffix:
        raise APIError(400, "suffix is not supported", param="suffix")
    if body.echo and body.logprobs is not None:
        raise APIError(400, "echo with logprobs (prompt logprobs) is not supported", param="echo")
    prompts = _prompts(ctx, body)
    params, stops, bias = body.params(), body.stops(), body.bias(ctx.tokenizer.n_words)
    reqs = [GenRequest(p, tokens_for_request(ctx, p, body.max_tokens, "max_tokens"), params, stops, None,
                       body.logprobs is not None, body.logprobs or 0, bias, skip_special=False) for p in prompts]
    handles = []
    try:
        for r in reqs:
            handles.append(submit(ctx, r, "completions"))
    except APIError:
        for h in handles:
            h.cancel()
        raise
    rid, created = _new_id("cmpl"), int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": ctx.model_name,
            "system_fingerprint": "herd"}
    echoes = [ctx.tokenizer.decode(p) if body.echo else "" for p in prompts]
    usage = lambda: _usage(sum(len(p) for p in prompts), sum(h.n_generated for h in handles),  # noqa: E731
                           sum(h.cached_tokens for h in handles))

    def finish_of(events: list[Event]) -> str:
        return events[-1].finish if events else "abort"

    if not body.stream:
        results = await collect(request, handles)
        choices = []
        for i, (h, events) in enumerate(zip(handles, results)):
            bad = [ev for ev in events if ev.finish == "error"]
            if bad:
                raise APIError(503 if bad[0].error_code == "queue_timeout" else 500, bad[0].error or "failed",
                               type_="server_error", code=bad[0].error_code)
            text = echoes[i] + "".join(ev.text for ev in events)
            lp = _completion_logprobs(ctx, events, len(echoes[i])) if body.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish_of(events)})
        return JSONResponse({**head, "choices": choices, "usage": usage()})

    async def stream():
        offsets = [len(e) for e in echoes]
        for i, e in enumerate(echoes):
            if e:
                yield _sse({**head, "choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}]})
        async for i, batch in merged(handles):
            last = batch[-1]
            if last.finish == "error":
                yield _sse(_error_chunk(last))
                continue
            text = "".join(ev.text for ev in batch)
            lp = _completion_logprobs(ctx, batch, offsets[i]) if body.logprobs is not None else None
            offsets[i] += len(text)
            if text or last.finish is not None:
                yield _sse({**head, "choices": [{"index": i, "text": text, "logprobs": lp,
                                                 "finish_reason": last.finish}]})
        if body.include_usage():
            yield _sse({**head, "choices": [], "usage": usage()})
        yield b"data: [DONE]\n\n"

    return StreamResponse(stream(), handles, "text/event-stream")
