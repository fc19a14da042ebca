"""Who may talk to the server, and how much: bind policy, API key, Host / Origin checks, header and body caps.

`Guard` is plain ASGI middleware in front of every route, so nothing reaches a handler (or the engine) before these
checks pass:
- Host: on a loopback bind, the Host header must name a loopback address or `localhost` (`*.localhost`): a page
  from evil.example that re-resolves its name to 127.0.0.1 (DNS rebinding, CVE-2024-28224 in Ollama) is refused.
- Origin: a browser sends it on cross-site requests; it must be this server's own origin (or one allowed with
  --allow-origin), so other sites can neither read replies nor spend the machine's compute with blind POSTs.
- API key: `Authorization: Bearer KEY` (or `x-api-key: KEY`) on every route except /health and the playground
  page itself (static, no data); compared as SHA-256 digests with hmac.compare_digest (constant time).
- Caps: header count, and the body size (Content-Length up front; a chunked body is counted while it is read).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json

PUBLIC_PATHS = frozenset({"/health", "/", "/index.html", "/favicon.ico"})
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 8 << 20  # 8 MiB: ~2M tokens of text, far above any context, far below memory trouble


class BodyTooLarge(Exception):
    pass


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without an API key unless --insecure was given explicitly."""
    if not is_loopback(host) and not api_key and not insecure:
        raise ValueError(
            f"refusing to listen on {host} without an API key: anyone who can reach this address could use the "
            f"model. Give --api-key KEY (or HERD_API_KEY), or --insecure if the network is trusted")


def _host_name(value: str) -> str | None:
    """The host part of a Host header ('[::1]:8000' -> '::1', 'a.b:80' -> 'a.b'); None if malformed."""
    value = value.strip()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def error_payload(path: str, message: str, type_: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error object; under /api/ (the Ollama API) Ollama's own {"error": "message"}, which its clients read."""
    if path.startswith("/api/"):
        return {"error": message}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class Guard:
    """ASGI middleware: Host / Origin / key / header-count checks and the Content-Length cap."""

    def __init__(self, app, *, api_key: str | None, loopback_bind: bool, max_body_bytes: int = DEFAULT_MAX_BODY,
                 allow_origins: tuple[str, ...] = ()):
        self.app = app
        self.key = key_digest(api_key) if api_key else None
        self.loopback_bind = loopback_bind
        self.max_body_bytes = max_body_bytes
        self.allow_origins = {o.rstrip("/").lower() for o in allow_origins}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS:
            return await _reply(send, scope, 431, "too many request headers", "invalid_request_error",
                                "headers_too_large")
        h = {}
        for k, v in headers:  # the first of repeated headers counts
            h.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        host = h.get("host", "")
        if self.loopback_bind:
            name = _host_name(host)
            if name is None or not is_loopback(name):
                return await _reply(send, scope, 403, "host not allowed: this server listens on loopback and answers "
                                    "only requests addressed to localhost", "permission_error", "host_not_allowed")
        origin = h.get("origin")
        if origin is not None and not self._origin_ok(origin, host, scope):
            return await _reply(send, scope, 403, "cross-origin request refused (start the server with --allow-origin "
                                "to allow this origin)", "permission_error", "origin_not_allowed")
        if self.key is not None and scope["path"] not in PUBLIC_PATHS and not self._key_ok(h):
            return await _reply(send, scope, 401, "missing or invalid API key (send 'Authorization: Bearer KEY')",
                                "authentication_error", "invalid_api_key", extra=[(b"www-authenticate", b"Bearer")])
        length = h.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _reply(send, scope, 400, "invalid Content-Length", "invalid_request_error",
                                    "invalid_header")
            if int(length) > self.max_body_bytes:
                return await _reply(send, scope, 413, f"request body of {length} bytes exceeds the limit of "
                                    f"{self.max_body_bytes} bytes", "invalid_request_error", "body_too_large")
        return await self.app(scope, receive, send)

    def _origin_ok(self, origin: str, host: str, scope) -> bool:
        origin = origin.rstrip("/").lower()
        if origin in self.allow_origins or "*" in self.allow_origins:
            return True
        scheme = "https" if scope.get("scheme") == "https" else "http"
        return origin == f"{scheme}://{host.lower()}"  # same origin: the page this server served

    def _key_ok(self, h: dict) -> bool:
        auth = h.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else h.get("x-api-key")
        return given is not None and hmac.compare_digest(key_digest(given), self.key)


async def _reply(send, scope, status: int, message: str, type_: str, code: str, extra: list | None = None) -> None:
    body = json.dumps(error_payload(scope["path"], message, type_, code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               *(extra or [])]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(request, limit: int) -> bytes:
    """The request body, refusing (BodyTooLarge) as soon as more than `limit` bytes have arrived."""
    chunks, n = [], 0
    async for chunk in request.stream():
        n += len(chunk)
        if n > limit:
            raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
