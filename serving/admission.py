"""Admission control: a bounded number of requests in the server, the rest told to come back (429 Retry-After).

Without a bound, a burst queues without limit in front of the engine: every request waits longer, memory grows,
and clients time out after the server has already spent the work. With ``--max-queue N`` at most N ``POST /v1``
requests are inside the server at once (being guarded, decoded or streamed, or waiting for the engine); one
more is answered at once with 429 ``rate_limit_exceeded`` and ``Retry-After``, which the OpenAI SDKs honour
and retry. It runs after the key check (an unauthenticated request takes no place) and before the body is read.

``Retry-After`` estimates when a place frees up: with N places each held about D seconds (a running average of
recent requests), one frees every D / N seconds — at least 1 s, at most 60 (the SDKs ignore longer waits).
"""

from __future__ import annotations

import math
import time

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import PROTECTED_PREFIXES
from serving.errors import queue_full
from serving.metrics import ServerMetrics

MAX_RETRY_AFTER_S = 60
SMOOTHING = 0.2  # weight of the newest request in the running average of how long a place is held


class AdmissionMiddleware:
    """At most ``limit`` POST /v1 requests at once; the event loop is single-threaded, so a plain count works."""

    def __init__(self, app: ASGIApp, limit: int, metrics: ServerMetrics):
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.admitted = 0
        self.held_s: float | None = None  # running average of how long an admitted request stays

    @property
    def retry_after_s(self) -> int:
        if self.held_s is None:
            return 1
        return min(MAX_RETRY_AFTER_S, max(1, math.ceil(self.held_s / self.limit)))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(PROTECTED_PREFIXES):
            await self.app(scope, receive, send)
            return
        if self.admitted >= self.limit:
            self.metrics.rejected.labels(reason="queue_full").inc()
            await queue_full(self.limit, self.retry_after_s).response()(scope, receive, send)
            return
        self.admitted += 1
        self.metrics.admitted.set(self.admitted)
        started = time.monotonic()
        try:
            await self.app(scope, receive, send)  # returns when the response (a whole stream, too) is sent
        finally:
            self.admitted -= 1
            self.metrics.admitted.set(self.admitted)
            held = time.monotonic() - started
            self.held_s = held if self.held_s is None else (1 - SMOOTHING) * self.held_s + SMOOTHING * held
