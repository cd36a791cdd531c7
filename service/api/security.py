"""API key check for /v1 routes and /metrics, and a body-size guard that counts bytes as they arrive."""
from __future__ import annotations

import hmac

from fastapi import Request

from .errors import ApiError, error_response


async def require_api_key(request: Request) -> None:
    key = request.app.state.runtime.settings.api_key
    if not key:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if not given or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "unauthorized",
                       "missing or wrong API key (Authorization: Bearer <key> or X-API-Key)",
                       {"WWW-Authenticate": "Bearer"})


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before it is all read.

    Content-Length is checked up front; chunked bodies are counted as they stream in.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._refuse(scope, receive, send)

    async def _refuse(self, scope, receive, send):
        response = error_response(413, "too_large", f"request body exceeds the limit of {self.limit} bytes",
                                  {"Connection": "close"})
        await response(scope, receive, send)


class _TooLarge(ApiError):
    """Raised from `receive`: the route's error handling answers 413 (or this middleware does)."""

    def __init__(self, limit: int):
        super().__init__(413, "too_large", f"request body exceeds the limit of {limit} bytes",
                         {"Connection": "close"})
