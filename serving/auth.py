"""Bearer API keys (``--api-key``) and the request size limit, both enforced before a body is read.

The OpenAI SDK sends ``Authorization: Bearer <key>`` on every call. Checking keys and sizes in ASGI
middleware (not in route dependencies) means an unauthenticated or oversized request costs no JSON parsing.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import OpenAIError, invalid_api_key, request_too_large

PROTECTED_PREFIX = "/v1/"


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key without stopping early, so timing does not reveal which key nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


async def _send_error(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    await error.response()(scope, receive, send)


class ApiKeyMiddleware:
    """Requires one of ``keys`` on every /v1 route; /health and /metrics stay open for probes and scrapers."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...]):
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED_PREFIX):
            scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not key_matches(token.strip(), self.keys):
                await _send_error(invalid_api_key(), scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(status_code=413, detail=request_too_large(limit).message)


class BodySizeLimitMiddleware:
    """413 for bodies over ``limit`` bytes: by Content-Length up front, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_error(request_too_large(self.limit), scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # FastAPI re-raises HTTPExceptions from body reading; the app's handler renders the 413.
                    raise BodyTooLarge(self.limit)
            return message

        await self.app(scope, limited_receive, send)
