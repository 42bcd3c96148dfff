"""API keys (``--api-key``, ``--admin-api-key``), who is calling, and the request size limit, enforced before a body
is read.

The OpenAI SDK sends ``Authorization: Bearer <key>`` on every call; LiteLLM's generic guardrail client sends
``x-api-key: <key>``, so both are accepted. Checking keys and sizes in ASGI middleware (not in route
dependencies) means an unauthenticated or oversized request costs no JSON parsing. The middleware leaves the
caller's key id (never the key) in the request state: it picks the key's policy (``--policy-map``) and names the
caller in the decision log. An admin key is also a valid key; the middleware marks its requests
(``request.state.admin``) for the few routes that need one.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.errors import PolicyError
from guard.policy import PolicyBinding
from serving.decisions import new_request_id
from serving.errors import OpenAIError, invalid_api_key, request_too_large

PROTECTED_PREFIXES = ("/v1/", "/beta/")  # the OpenAI routes and LiteLLM's guardrail route
KEY_ID_PREFIX = "key-"
KEY_ID = re.compile(r"key-[0-9a-f]{12}")


def key_id(key: str) -> str:
    """A key's public name: ``key-`` and the first 12 hex digits of its SHA-256 (logs and maps name keys so)."""
    return KEY_ID_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:12]


def matching_key(token: str, keys: tuple[str, ...]) -> str | None:
    """The key ``token`` is, or None. Every key is compared without stopping early, so timing does not reveal
    which key nearly matched."""
    matched = None
    for key in keys:
        if hmac.compare_digest(token.encode(), key.encode()):
            matched = key
    return matched


def bind_keys(bindings: list[PolicyBinding], api_keys: tuple[str, ...], map_path: Path
              ) -> tuple[tuple[str, ...], dict[str, Path]]:
    """The accepted keys (``--api-key`` plus the keys a policy map names) and the policy file of each bound key
    id. A map entry is a key, or a key id (``key-`` + 12 hex digits) of an ``--api-key`` key, so the map itself
    need hold no secret. Errors name the map's file and line."""
    keys = list(dict.fromkeys([*api_keys, *(b.key for b in bindings if not KEY_ID.fullmatch(b.key))]))
    known = {key_id(key) for key in keys}
    bound: dict[str, Path] = {}
    first_line: dict[str, int | None] = {}
    for binding in bindings:
        kid = binding.key if KEY_ID.fullmatch(binding.key) else key_id(binding.key)
        if kid not in known:
            raise PolicyError(map_path, f"{kid} is not the key id of any --api-key key", line=binding.line)
        if kid in bound:
            raise PolicyError(map_path, f"binds the same key as line {first_line[kid]} ({kid})", line=binding.line)
        bound[kid], first_line[kid] = binding.policy_path, binding.line
    return tuple(keys), bound


@dataclass(frozen=True)
class Caller:
    """Who sent a request (its key id; None when the server checks no keys) and the id it is logged under."""

    request_id: str
    key_id: str | None
    admin: bool = False  # sent with an --admin-api-key key


async def caller(request: Request) -> Caller:
    """The route dependency naming the caller (the key id the middleware left in the request state)."""
    return Caller(new_request_id(), getattr(request.state, "key_id", None), getattr(request.state, "admin", False))


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
            admin_key = matching_key(token, self.admin_keys) if token is not None else None
            key = admin_key or (matching_key(token, self.keys) if token is not None else None)
            if (self.keys or self.admin_keys) and key is None:
                await _send_error(invalid_api_key(), scope, receive, send)
                return
            state = scope.setdefault("state", {})
            state["admin"] = admin_key is not None
            if key is not None:
                state["key_id"] = key_id(key)
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
