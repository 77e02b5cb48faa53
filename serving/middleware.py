"""ASGI middleware: API keys before anything is read, and a request-size limit enforced while reading."""

from __future__ import annotations

import hmac
import json

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def error_response(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


async def _send_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class BodyLimitMiddleware:
    """413 when Content-Length is over the limit, or as soon as a streamed body passes it.

    The body is buffered up to the limit and replayed to the app, so nothing larger is ever held.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit_mb = self.max_bytes / 1024 / 1024
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                return await _send_error(send, 400, "invalid_request", "Content-Length is not a number")
            if too_big:
                return await _send_error(send, 413, "body_too_large", f"request body over the {limit_mb:.0f} MB limit")
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _send_error(send, 413, "body_too_large", f"request body over the {limit_mb:.0f} MB limit")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


class ApiKeyMiddleware:
    """When keys are configured, ``Authorization: Bearer KEY`` or ``X-API-Key: KEY`` is required (docs stay open)."""

    OPEN_PATHS = ("/docs", "/openapi.json")

    def __init__(self, app: ASGIApp, keys: frozenset[str]):
        self.app = app
        self.keys = [k.encode() for k in keys]

    def _authorised(self, headers: dict[bytes, bytes]) -> bool:
        offered = headers.get(b"x-api-key")
        auth = headers.get(b"authorization", b"")
        if auth[:7].lower() == b"bearer ":
            offered = auth[7:].strip()
        if not offered:
            return False
        return any(hmac.compare_digest(offered, key) for key in self.keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys or scope.get("path", "").endswith(self.OPEN_PATHS):
            return await self.app(scope, receive, send)
        if not self._authorised(dict(scope.get("headers") or [])):
            return await _send_error(send, 401, "unauthorized",
                                     "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
        await self.app(scope, receive, send)
