"""What the server checks on every request before any route runs or any body is read (an ASGI middleware).

In order: the Host header against an allow-list (a page on another site that resolves its own name to
127.0.0.1, DNS rebinding, is refused); for state-changing requests without a configured token, the Origin
(a page elsewhere cannot drive a local server from a visitor's browser); the bearer token on /v1 routes
(compared in constant time; the scheme in any case, RFC 9110); then the body size: a Content-Length over the
route's limit is a 413 at once, and a body sent without one is counted as it streams in and cut off at the
limit. Routes never see a request that failed any of these. Below that, `header_timeout_protocol` gives each
request's head a deadline. This module knows nothing about jobs or models.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

from starlette.exceptions import HTTPException

from .responses import error_body

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

Scope = dict
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


def host_name(value: str) -> str:
    """'Example.com:8000' -> 'example.com'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """`allowed_hosts`: Host names served (None: any); `token`: the bearer token of /v1 routes (None: open, then
    state-changing requests must come from the server's own origin or one of `origins`); `body_limit(path)`:
    the most bytes a request body to `path` may have."""

    def __init__(
        self,
        app,
        *,
        token: str | None,
        allowed_hosts: Iterable[str] | None,
        origins: Iterable[str] = (),
        body_limit: Callable[[str], int],
    ) -> None:
        self.app, self.token = app, token
        self.allowed = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.origins = {o.rstrip("/").lower() for o in origins}
        self.body_limit = body_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        origin = headers.get("origin")
        listed = origin is not None and ("*" in self.origins or origin.rstrip("/").lower() in self.origins)
        send = _secured(send, ("*" if "*" in self.origins else origin) if listed else None)
        host = headers.get("host", "")
        if self.allowed is not None and host_name(host) not in self.allowed:
            return await _refuse(send, 400, f"host {host!r} is not served here; allowed: {sorted(self.allowed)} "
                                            "(add names with --allowed-host)")  # fmt: skip
        path, method = scope["path"], scope["method"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):  # mounted under a prefix (--root-path, a Ray route prefix): routes
            path = path[len(root) :] or "/"  # match what follows it, and so must every check here
        if self.token is None and method not in SAFE_METHODS and origin is not None:
            own = {f"{s}://{host}".lower() for s in ("http", "https")}
            if origin.rstrip("/").lower() not in own | self.origins:
                return await _refuse(send, 403, f"cross-origin request from {origin!r} refused (no token is set; "
                                                "allow the origin with --cors)")  # fmt: skip
        if self.token is not None and path.startswith("/v1/") and method != "OPTIONS":  # preflights carry none
            scheme, _, given = headers.get("authorization", "").partition(" ")
            if not (scheme.lower() == "bearer" and secrets.compare_digest(given.strip().encode(), self.token.encode())):
                return await _refuse(send, 401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
        limit = self.body_limit(path)
        length = headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return await _refuse(send, 400, f"Content-Length {length!r} is not a byte count")
            if int(length) > limit:
                return await _refuse(send, 413, f"request body of {int(length)} bytes is over this route's "
                                                f"limit of {limit} bytes")  # fmt: skip
        return await self.app(scope, _counted(receive, limit), send)


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"SAMEORIGIN")]


def _secured(send: Send, cors_origin: str | None) -> Send:
    """`send` that adds SECURITY_HEADERS to every response (no sniffing an upload as HTML, the page framed only
    by itself) and, for an origin allowed by --cors, lets that origin read the guard's own refusals (the CORS
    middleware, inside, answers only for requests that reach it)."""
    extra = list(SECURITY_HEADERS)

    async def secured(message: dict) -> None:
        if message["type"] == "http.response.start":
            present = {k.lower() for k, _ in message.get("headers", [])}
            added = [(k, v) for k, v in extra if k not in present]
            if cors_origin and b"access-control-allow-origin" not in present:
                added += [(b"access-control-allow-origin", cors_origin.encode("latin-1")), (b"vary", b"Origin")]
            message = {**message, "headers": [*message.get("headers", []), *added]}
        await send(message)

    return secured


BODY_GRACE_S = 30.0  # a body's first seconds, at any rate
BODY_MIN_RATE = 16 * 1024  # bytes a second a body must average after them (128 kbit/s: a poor mobile link)


def _counted(receive: Receive, limit: int, grace: float = BODY_GRACE_S, rate: float = BODY_MIN_RATE) -> Receive:
    """`receive` that stops a body at `limit` bytes (413 to the route reading it; FastAPI passes it on), and one
    that arrives slower than `rate` bytes a second after `grace` seconds (408): uvicorn has no body timeout, so
    clients sending a byte a second held connections for as long as they liked."""
    seen, start, whole = 0, time.monotonic(), False

    async def counted() -> dict:
        nonlocal seen, whole
        if whole:  # the body is in: later receives wait for a disconnect (`Request.is_disconnected`), untimed
            return await receive()
        left = start + grace + seen / rate - time.monotonic()
        try:
            message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
        except asyncio.TimeoutError:  # (3.10: not the builtin TimeoutError)
            raise HTTPException(408, f"request body too slow: {seen} bytes in {time.monotonic() - start:.0f} s "
                                     f"(at least {rate // 1024:.0f} KiB/s after {grace:.0f} s)") from None  # fmt: skip
        whole = message["type"] != "http.request" or not message.get("more_body", False)
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body is over this route's limit of {limit} bytes")
        return message

    return counted


async def _refuse(send: Send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    """An error in the routes' shape (`detail`, and OpenAI's `error`), with `headers`."""
    body = json.dumps({"detail": detail, "error": error_body(detail, "invalid_request_error")}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


def header_timeout_protocol(seconds: float = 10.0):
    """uvicorn's h11 protocol with a deadline for each request's head: a connection that has not sent a whole
    request line and headers `seconds` after it opened (or after the first byte of its next request) gets a
    408 and is closed. uvicorn has no such timeout (its keep-alive timer stops at the first byte), so a client
    sending headers a byte at a time could hold connections forever. Pass as `uvicorn.run(..., http=...)`."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeout(H11Protocol):
        _head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._head_timer = self.loop.call_later(seconds, self._too_slow)

        def data_received(self, data: bytes) -> None:
            if self._head_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._head_timer = self.loop.call_later(seconds, self._too_slow)  # the next request's head begins
            super().data_received(data)
            if self._head_timer is not None and self.cycle is not None and not self.cycle.response_complete:
                self._head_timer.cancel()  # the head is in: the request runs
                self._head_timer = None

        def connection_lost(self, exc) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

        def _too_slow(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

    return HeaderTimeout
