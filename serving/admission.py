"""Admission control: a bounded number of requests in the server, the rest told to come back (429 Retry-After).

Without a bound, a burst queues without limit in front of the engine: every request waits longer, memory grows,
and clients time out after the server has already spent the work. With ``--max-queue N`` at most N ``POST /v1``
requests are inside the server at once (being guarded, decoded or streamed, or waiting for the engine); one
more is answered at once with 429 ``rate_limit_exceeded`` and ``Retry-After``, which the OpenAI SDKs honour
and retry. It runs after the key check (an unauthenticated request takes no place) and before the body is read.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from serving.auth import PROTECTED_PREFIX
from serving.errors import queue_full
from serving.metrics import ServerMetrics

RETRY_AFTER_S = 1  # a batch of the in-process engine takes about this long on a CPU


class AdmissionMiddleware:
    """At most ``limit`` POST /v1 requests at once; the event loop is single-threaded, so a plain count works."""

    def __init__(self, app: ASGIApp, limit: int, metrics: ServerMetrics):
        self.app = app
        self.limit = limit
        self.metrics = metrics
        self.admitted = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.admitted >= self.limit:
            self.metrics.rejected.labels(reason="queue_full").inc()
            await queue_full(self.limit, RETRY_AFTER_S).response()(scope, receive, send)
            return
        self.admitted += 1
        self.metrics.admitted.set(self.admitted)
        try:
            await self.app(scope, receive, send)  # returns when the response (a whole stream, too) is sent
        finally:
            self.admitted -= 1
            self.metrics.admitted.set(self.admitted)
