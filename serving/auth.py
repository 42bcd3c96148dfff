"""API keys (``--api-key``, ``--admin-api-key``) and the request size limit, both enforced before a body is read.

The OpenAI SDK sends ``Authorization: Bearer <key>`` on every call; LiteLLM's generic guardrail client sends
``x-api-key: <key>``, so both are accepted. Checking keys and sizes in ASGI middleware (not in route
dependencies) means an unauthenticated or oversized request costs no JSON parsing. An admin key is also a
valid key; the middleware marks its requests (``request.state.admin``) for the few routes that need one.
"""

from __future__ import annotations

import hmac

from fastapi import HTTPException
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import OpenAIError, invalid_api_key, request_too_large

PROTECTED_PREFIXES = ("/v1/", "/beta/")  # the OpenAI routes and LiteLLM's guardrail route


def key_matches(token: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key without stopping early, so timing does not reveal which key nearly matched.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(token.encode(), key.encode())
    return matched


async def _send_error(error: OpenAIError, scope: Scope, receive: Receive, send: Send) -> None:
    await error.response()(scope, receive, send)


def presented_key(headers: Headers) -> str | None:
    """The key a client sent: ``Authorization: Bearer <key>``, else ``x-api-key: <key>``."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return headers.get("x-api-key")


class ApiKeyMiddleware:
    """Requires one of ``keys`` or ``admin_keys`` on every /v1 and /beta route; /health and /metrics stay open for
    probes and scrapers. Marks each request with whether an admin key sent it."""

    def __init__(self, app: ASGIApp, keys: tuple[str, ...], admin_keys: tuple[str, ...] = ()):
        self.app = app
        self.keys = keys
        self.admin_keys = admin_keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(PROTECTED_PREFIXES):
            token = presented_key(Headers(scope=scope))
            admin = token is not None and key_matches(token, self.admin_keys)
            if (self.keys or self.admin_keys) and not admin and (token is None or not key_matches(token, self.keys)):
                await _send_error(invalid_api_key(), scope, receive, send)
                return
            scope.setdefault("state", {})["admin"] = admin
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
