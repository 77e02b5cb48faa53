"""ASGI middleware: API keys before anything is read, a request-size and body-time limit enforced while reading,
a per-worker concurrency limit, and Prometheus labels that cannot grow with arbitrary paths."""

from __future__ import annotations

import asyncio
import hmac
import json
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import shown
from serving.imageio import size_text


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _send_error(send: Send, status: int, code: str, message: str, retry_after: int | None = None,
                      close: bool = True) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if close:
        headers.append((b"connection", b"close"))
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Refusal:
    """Sends the errors the middleware answers before the app sees a request (401, 413, 429, 400 content type) so
    that the client gets them: one per app, shared by its middleware.

    Such an answer went out with `Connection: close` before the body was read; the server's kernel answered the
    rest of the body with a reset and clients still sending it lost the answer (Python's urllib with a 5 MB photo
    and a wrong key got `Connection reset by peer`; httpx clients lost 17-36 of 100 429s in a burst). Now:

    - a client that keeps its connection (HTTP/1.1 without `Connection: close`) is answered at once and the
      connection stays open: the server (uvicorn) drops the rest of the body as it arrives; no slot, memory or
      concurrency permit is held meanwhile;
    - a client that asked to close (urllib does) is closed right after the answer, so the rest of its body is read
      and dropped first: up to ``max_bytes`` within ``timeout_s``, and at most ``max_draining`` such requests at
      once (each holds one of BentoML's concurrency permits while it reads; past that they are answered at once);
    - a client that sent `Expect: 100-continue` has not sent its body: it is answered at once and closed.
    """

    def __init__(self, max_bytes: int = 40 * 2**20, timeout_s: float = 10.0, max_draining: int = 8):
        self.max_bytes, self.timeout_s, self.max_draining = max_bytes, timeout_s, max_draining
        self.draining = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
                       retry_after: int | None = None) -> None:
        headers = dict(scope.get("headers") or [])
        if headers.get(b"expect", b"").lower() == b"100-continue":
            return await _send_error(send, status, code, message, retry_after, close=True)
        tokens = {t.strip() for t in headers.get(b"connection", b"").lower().split(b",")}
        keeps = b"close" not in tokens and (scope.get("http_version") != "1.0" or b"keep-alive" in tokens)
        if not keeps and self.draining < self.max_draining:
            self.draining += 1
            try:
                await self._drain(headers, receive)
            finally:
                self.draining -= 1
        await _send_error(send, status, code, message, retry_after, close=not keeps)

    async def _drain(self, headers: dict[bytes, bytes], receive: Receive) -> None:
        """Read and drop the rest of the body, unless it is declared larger than ``max_bytes``."""
        try:
            if int(headers.get(b"content-length", b"0")) > self.max_bytes:
                return
        except ValueError:
            return
        size, deadline = 0, time.monotonic() + self.timeout_s
        while size <= self.max_bytes:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            size += len(message.get("body", b""))


STARTED = "wildcheck.started"  # scope key: when the request arrived (time.monotonic), for the service's deadline


class BodyLimitMiddleware:
    """413 when Content-Length is over the limit, or as soon as a streamed body passes it; 408 when the whole
    body has not arrived within ``timeout_s`` (a slow sender must not hold a slot for the request timeout).

    The body is buffered up to the limit and replayed to the app, so nothing larger is ever held.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = 10.0, refuse: Refusal | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.refuse = refuse or Refusal(2 * max_bytes, timeout_s)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        scope.setdefault(STARTED, time.monotonic())
        content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
        if not content_type.isascii():  # parsers further in raise UnicodeDecodeError on it
            return await self.refuse(scope, receive, send, 400, "invalid_content_type",
                                     "the Content-Type header is not ASCII")
        if scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = size_text(self.max_bytes)  # not '0 MB' for a limit under 1 MiB
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _send_error(send, 400, "invalid_request", "Content-Length is not a number")
            if too_big:
                return await self.refuse(scope, receive, send, 413, "body_too_large",
                                         f"request body over the {limit} limit")
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return await _send_error(send, 408, "body_timeout",
                                         f"the request body did not arrive within {self.timeout_s:g} s; send it at once")
            if message["type"] == "http.disconnect":
                # answered although nobody reads it (the server drops it): a request left without an answer kept
                # the worker from stopping on SIGTERM until it was killed (20 s and more) after one client left
                # mid-upload
                return await _send_error(send, 400, "disconnected", "the client closed the connection")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self.refuse(scope, receive, send, 413, "body_too_large",
                                         f"request body over the {limit} limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        # one copy of the body while the app runs: the chunks go once joined, and the joined body once handed
        # over (the app's request keeps its own); holding both doubled a 20 MB upload's cost (3 copies in all)
        body = b"".join(chunks)
        chunks.clear()
        sent = False

        async def replay() -> Message:
            nonlocal sent, body
            if not sent:
                sent = True
                message, body = {"type": "http.request", "body": body, "more_body": False}, b""
                return message
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """When keys are configured, ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` is required (docs stay open)."""

    OPEN_PATHS = frozenset({"/docs", "/openapi.json", "/docs/oauth2-redirect"})

    def __init__(self, app: ASGIApp, keys: frozenset[str], refuse: Refusal | None = None):
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.refuse = refuse or Refusal()

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        offered = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            offered = auth[7:].strip()
        if not offered:
            return False
        return any(hmac.compare_digest(offered, key) for key in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or app_path(scope) in self.OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not self._authorised(dict(scope.get("headers") or [])):
            return await self.refuse(scope, receive, send, 401, "unauthorized",
                                     "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        await self.app(scope, receive, send)


def app_path(scope: Scope) -> str:
    """The path inside the mounted app (``/docs`` for ``/v1/docs``), whichever way the server filled the scope."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class ConcurrencyLimitMiddleware:
    """At most ``limit`` requests at once in this worker; more get 429 ``too_many_requests`` in our error shape
    (BentoML's own limit, kept higher as a backstop, answers in its own shape)."""

    def __init__(self, app: ASGIApp, limit: int, refuse: Refusal | None = None):
        self.app = app
        self.limit = limit
        self.active = 0
        self.refuse = refuse or Refusal()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            return await self.refuse(scope, receive, send, 429, "too_many_requests",
                                     f"more than {self.limit} requests at once; retry shortly", retry_after=1)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1


class JsonErrorsMiddleware:
    """BentoML's own routes outside /v1 (``/readyz``, ``/metrics``, ...) and its router answered a wrong path or
    method in plain text (``Not Found``, ``Method Not Allowed``); a client parsing our error shape got a
    JSONDecodeError. Such answers leave here in the error shape of /v1 (``Allow`` kept); JSON answers pass as
    they are. HEAD answers have no body and pass too."""

    CODES = {404: "not_found", 405: "method_not_allowed"}

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "HEAD":
            return await self.app(scope, receive, send)
        replaced = False

        async def json_errors(message: Message) -> None:
            nonlocal replaced
            if replaced:
                return  # the plain-text body of an answer already sent as JSON
            if message["type"] == "http.response.start" and message["status"] in self.CODES:
                headers = message.get("headers", [])
                if not dict(headers).get(b"content-type", b"").startswith(b"application/json"):
                    replaced = True
                    kept = [(k, v) for k, v in headers if k.lower() == b"allow"]
                    path, allowed = shown(scope.get("path", "")), b", ".join(v for _, v in kept).decode("latin-1")
                    text = (f"no endpoint {path}; see /v1/docs" if message["status"] == 404 else
                            f"{scope.get('method', '')} is not allowed on {path}; use {allowed}")
                    body = json.dumps({"error": {"code": self.CODES[message["status"]], "message": text}}).encode()
                    await send({"type": "http.response.start", "status": message["status"],
                                "headers": [(b"content-type", b"application/json"),
                                            (b"content-length", str(len(body)).encode()), *kept]})
                    await send({"type": "http.response.body", "body": body})
                    return
            await send(message)

        await self.app(scope, receive, json_errors)


def metrics_label(path: str, known: frozenset[str]) -> str:
    """A Prometheus ``endpoint`` label: the path when it is one of ours, else ``other``, so 3,000 random
    paths do not create 3,000 series (each one grows /metrics and the worker's memory until restart)."""
    return path if path in known else "other"


class RouteLabelMiddleware:
    """Wraps BentoML's traffic-metrics middleware so that it sees ``metrics_label(path)`` as the path; the
    app behind it gets the original scope back."""

    ORIGINAL = "wildcheck.original_path"

    def __init__(self, metrics_cls, app: ASGIApp, known: frozenset[str], **kwargs):
        self.known = known
        self.inner = metrics_cls(self._restore(app), **kwargs)

    @classmethod
    def _restore(cls, app: ASGIApp) -> ASGIApp:
        async def restored(scope: Scope, receive: Receive, send: Send) -> None:
            if cls.ORIGINAL in scope:
                scope = dict(scope)
                path = scope.pop(cls.ORIGINAL)
                scope["path"] = path
                scope["raw_path"] = path.encode()
            await app(scope, receive, send)

        return restored

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            label = metrics_label(scope.get("path", ""), self.known)
            if label != scope.get("path"):
                scope = {**scope, "path": label, self.ORIGINAL: scope.get("path", "")}
        await self.inner(scope, receive, send)
