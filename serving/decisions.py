"""What the guard did with each request, stage by stage: the check API's ``stages`` and the decision log.

Every endpoint handler records its stages in one :class:`RequestTrace` per request — a stage either ran (with
its result and milliseconds) or says why it was skipped. ``/v1/guard/checks`` answers with those records, and
``guard serve --decision-log PATH|-`` writes each finished trace as one JSON line. A stage the request never
reached (an earlier stage refused it, or the request was invalid) is recorded as skipped with the answer that
ended the request, so no line leaves a stage out silently.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, TextIO

from serving.protocol import ResponseModel

logger = logging.getLogger("serving")


class Stage(ResponseModel):
    """One guard stage: whether it ran (else why not), what it concluded and how long it took."""

    name: str
    ran: bool
    skipped: str | None = None  # why it did not run
    result: str | None = None  # e.g. prompt: its action; certify: "flagged" | "passed"; output: send | block
    ms: float = 0.0


class DecisionRecord(ResponseModel):
    """One line of the decision log. ``key_id`` names the API key (never the key itself)."""

    time: str  # ISO 8601, UTC, when the request arrived
    request_id: str  # also the response's x-request-id header
    endpoint: str
    key_id: str | None  # None: the server checks no keys
    policy: str | None  # name@fingerprint of the policy that judged the request (None: it ended before one did)
    stream: bool
    status: int  # the HTTP status (a stream that failed after its 200 headers says so in ``error``)
    error: str | None  # the error code the client read, if any
    action: str  # allow | log | steer | refuse | block (an output withheld) | error
    flagged: list[str]  # concept ids flagged at any stage
    stages: list[Stage]
    certificates: list[dict[str, Any]]  # erase-and-check certificates, one per certified text
    ms: float  # the whole request, until its last byte


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


class RequestTrace:
    """The stages of one request as they happen; ``finish`` closes it (and writes its log line, if logging)."""

    def __init__(self, endpoint: str, stages: Iterable[str], *, request_id: str, key_id: str | None,
                 stream: bool = False, log: DecisionLog | None = None):
        self.endpoint = endpoint
        self.expected = tuple(stages)  # the stages this endpoint has: each one is recorded, ran or skipped
        self.request_id = request_id
        self.key_id = key_id
        self.stream = stream
        self.policy: str | None = None
        self.action: str | None = None  # set by the handler when it knows better than ``finish`` can infer
        self.flagged: list[str] = []
        self.certificates: list[dict[str, Any]] = []
        self._stages: dict[str, Stage] = {}
        self._log = log
        self._arrived = datetime.now(timezone.utc)
        self._started = time.perf_counter()
        self._finished = False

    def ran(self, name: str, result: str, ms: float) -> None:
        self._stages[name] = Stage(name=name, ran=True, result=result, ms=round(ms, 3))

    def skipped(self, name: str, reason: str) -> None:
        """Record why stage ``name`` did not run (unless it already has a record)."""
        self._stages.setdefault(name, Stage(name=name, ran=False, skipped=reason))

    def flag(self, concept_ids: Iterable[str]) -> None:
        self.flagged = list(dict.fromkeys([*self.flagged, *concept_ids]))

    @property
    def stages(self) -> list[Stage]:
        """The recorded stages, in the endpoint's order."""
        return [self._stages[name] for name in self.expected if name in self._stages]

    def finish(self, status: int, error: str | None = None) -> DecisionRecord | None:
        """Close the trace with the answer the client got; the first call wins (a stream finishes once)."""
        if self._finished:
            return None
        self._finished = True
        ended = f"not reached: the request was answered {status}" + (f" {error}" if error else "")
        for name in self.expected:
            self.skipped(name, ended)
        record = DecisionRecord(
            time=self._arrived.isoformat(timespec="milliseconds"), request_id=self.request_id,
            endpoint=self.endpoint, key_id=self.key_id, policy=self.policy, stream=self.stream, status=status,
            error=error, action=self.action or self._inferred_action(status, error), flagged=self.flagged,
            stages=self.stages, certificates=self.certificates,
            ms=round((time.perf_counter() - self._started) * 1000, 3))
        if self._log is not None:
            self._log.write(record)
        return record

    def _inferred_action(self, status: int, error: str | None) -> str:
        if error == "content_policy_violation":
            return "refuse"
        if status != 200 or error is not None:
            return "error"
        output = self._stages.get("output")
        if output is not None and output.result is not None and "block" in output.result:
            return "block"
        prompt = self._stages.get("prompt")
        return prompt.result if prompt is not None and prompt.ran and prompt.result else "allow"


OUTPUT_RESULTS = ("send", "fallback", "block")  # an output stage's results, mildest first


def strongest_result(results: Iterable[str], order: tuple[str, ...]) -> str:
    """The most severe of ``results`` by ``order`` (e.g. send < fallback < block)."""
    return max(results, key=order.index, default=order[0])


class DecisionLog:
    """Appends one JSON line per finished request to a file, or to stdout for ``-``; lines never interleave."""

    def __init__(self, target: str | Path):
        self.target = str(target)
        self._lock = threading.Lock()
        self._stream: TextIO
        if self.target == "-":
            self._stream, self._owned = sys.stdout, False
        else:
            try:
                self._stream = open(self.target, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - closed in close()
            except OSError as err:
                raise OSError(f"cannot open the decision log {self.target}: {err.strerror or err}") from None
            self._owned = True

    def write(self, record: DecisionRecord) -> None:
        line = json.dumps(record.model_dump(), separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            try:
                self._stream.write(line + "\n")
                self._stream.flush()
            except (OSError, ValueError) as err:  # a full disk must not take the answers down with it
                logger.error("could not write the decision log %s: %s", self.target, err)

    def close(self) -> None:
        if self._owned:
            self._stream.close()

