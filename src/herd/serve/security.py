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

`limited_h11` is the HTTP protocol under all of it (uvicorn's h11 protocol plus what uvicorn lacks): each request's
head and then its body must arrive within `read_timeout` seconds (slowloris, a short body), and at most
`max_connections` sockets are open; above that the longest-idle one (no request running) is closed to make room,
and when every connection is busy the newcomer gets a 503 and is closed. So thousands of idle sockets neither
exhaust file descriptors nor keep /health from answering. Keep-alive idling is uvicorn's timeout_keep_alive.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json

PUBLIC_PATHS = frozenset({"/health", "/", "/index.html", "/favicon.ico"})
MAX_HEADERS = 100
DEFAULT_MAX_BODY = 8 << 20  # 8 MiB: ~2M tokens of text, far above any context, far below memory trouble
DEFAULT_MAX_CONNECTIONS = 512  # open sockets (a file descriptor each); above: the longest idle is closed, else 503
DEFAULT_READ_TIMEOUT = 30.0  # seconds for a request's head, and again for its body (8 MiB at 2 Mbit/s fits)
DEFAULT_KEEP_ALIVE = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's default)


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


def check_api_key(api_key: str | None) -> None:
    """An API key must be printable ASCII without spaces: header values travel as latin-1 bytes, so any other key
    (a non-latin-1 one above all) could never match what a client sends, and the server would refuse everyone."""
    if api_key is not None and not (api_key and all("!" <= c <= "~" for c in api_key)):
        raise ValueError("the API key must be printable ASCII without spaces (letters, digits, punctuation): HTTP "
                         "headers cannot carry other characters, so no client could send it")


def check_bind(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse a non-loopback bind without an API key unless --insecure was given explicitly, and a key that no
    client could send."""
    check_api_key(api_key)
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
        check_api_key(api_key or None)
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
            if not (length.isascii() and length.isdigit() and len(length) <= 20):  # (h11 checks it too)
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


# ---- connections: timeouts and a cap (the HTTP protocol under the app) --------------------------------------------


class ConnectionLimits:
    """Shared by one server's connections: the cap, the read timeout, the open connections (oldest first), and
    counters of what was closed and why."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS, read_timeout: float = DEFAULT_READ_TIMEOUT):
        if max_connections < 1 or not read_timeout > 0:
            raise ValueError("max_connections >= 1 and read_timeout > 0 are required")
        self.max_connections, self.read_timeout = max_connections, read_timeout
        self.open: dict = {}  # protocol -> None, in the order the connections were made
        self.refused = self.evicted = self.timed_out = 0


def _raw_response(status: int, reason: str, message: str, retry_after: str | None = None) -> bytes:
    body = json.dumps(error_payload("/", message, "server_error" if status >= 500 else "invalid_request_error",
                                    reason.lower().replace(" ", "_"))).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}",
            "connection: close"] + ([f"retry-after: {retry_after}"] if retry_after else [])
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


TOO_MANY = _raw_response(503, "Service Unavailable", "too many connections: every connection is busy; retry later",
                         "1")
REQUEST_TIMEOUT = _raw_response(408, "Request Timeout", "the request did not arrive in time")


def limited_h11(limits: ConnectionLimits):
    """uvicorn's H11Protocol with a read timeout per request head and body, and the connection cap (see the top)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class LimitedH11Protocol(H11Protocol):
        _timer = _seen = _waiting = None
        _refused = _got_bytes = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(limits.open) >= limits.max_connections:
                idle = next((p for p in limits.open if p._idle()), None)
                if idle is None:  # every connection is running a request: refuse this one politely
                    limits.refused += 1
                    self._refused = True
                    transport.write(TOO_MANY)
                    transport.close()
                    return
                limits.evicted += 1
                limits.open.pop(idle, None)  # now, not when its connection_lost runs (after this burst, maybe)
                idle._close()
            limits.open[self] = None
            self._await_head()

        def connection_lost(self, exc) -> None:
            limits.open.pop(self, None)
            self._cancel()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._got_bytes = True
            super().data_received(data)
            self._progress()

        def on_response_complete(self) -> None:
            self._await_head()  # the next request's head (a pipelined one may be parsed right below)
            super().on_response_complete()
            self._progress()

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _close(self) -> None:
            self._cancel()
            if not self.transport.is_closing():
                self.transport.close()

        def _cancel(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _await_head(self) -> None:
            self._cancel()
            self._waiting, self._seen, self._got_bytes = "head", self.cycle, False
            self._timer = self.loop.call_later(limits.read_timeout, self._expire)

        def _progress(self) -> None:
            if self._waiting == "head" and self.cycle is not self._seen and self.cycle is not None:
                self._cancel()  # a new request's head arrived; now its body has read_timeout seconds
                self._waiting = "body"
                self._timer = self.loop.call_later(limits.read_timeout, self._expire)
            if self._waiting == "body" and not self.cycle.more_body:
                self._cancel()
                self._waiting = None

        def _expire(self) -> None:
            self._timer = None
            if self.transport.is_closing():
                return
            limits.timed_out += 1
            # a head that never started is an idle socket: closed silently; a partial head, or a body that stops
            # coming before any response began, gets a 408 first
            if (self._waiting == "head" and self._got_bytes) or (
                    self._waiting == "body" and not self.cycle.response_started):
                self.transport.write(REQUEST_TIMEOUT)
            self.transport.close()

    return LimitedH11Protocol
