"""Server-sent events with a sliding-window output check: nothing reaches the client before the guard read it.

Each streamed choice keeps back its last ``window`` characters. Whenever enough new text has arrived, the
guard checks *all* text generated so far and only then releases everything except the held-back tail. An
alias of length L <= window that is still being written must start inside the tail, so a forbidden phrase
split over several deltas ("Eif" + "fel Tow" + "er") is caught before any part of it is sent. The window is
twice the longest alias plus a margin, because spaced-out spellings ("E i f f e l") double an alias's length.

A violation ends that choice with ``finish_reason: "content_filter"`` (chat: the policy message in
``delta.refusal``); the HTTP status is already 200 by then. When every leaked concept is steered with an
``action.fallback`` and nothing of the choice has been released yet, the fallback is sent as the choice's text with
``finish_reason: "stop"``, exactly as a non-streamed answer; once part of the answer has been sent it cannot be
replaced, and appending the fallback would read as one garbled answer, so the choice ends with
``content_filter`` and the fallback as its refusal. A guard failure mid-stream sends an OpenAI error
frame and no ``[DONE]``, so clients see a failed stream rather than a silently truncated answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Protocol

from anyio import to_thread

from guard.decision import Guard, OutputAction, OutputDecision, PromptDecision
from guard.errors import GuardUnavailable
from guard.policy import Policy
from guard.settle import FinishReason
from serving.decisions import OUTPUT_RESULTS, RequestTrace, strongest_result
from serving.engines.base import EngineStream
from serving.errors import OpenAIError, guard_unavailable
from serving.metrics import ServerMetrics

logger = logging.getLogger("serving")

DONE_FRAME = b"data: [DONE]\n\n"


def completion_responses(body: type) -> dict[int | str, dict]:
    """OpenAPI for a completion route's 200: ``body`` as JSON, or server-sent events with ``stream: true``.

    Before OpenAPI 3.2 an event-stream ``schema`` describes one event: its ``data`` is a JSON chunk or ``[DONE]``.
    """
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "A JSON chunk object, or [DONE] at the end."},
                            "event": {"type": "string"}, "id": {"type": "string"}}}
    return {200: {"model": body, "description": "The completion; with stream=true, server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}


def window_size(policy: Policy, margin: int) -> int:
    longest = max((len(alias) for concept in policy.concepts for alias in concept.aliases), default=0)
    return 2 * longest + margin


@dataclass(frozen=True)
class WindowStep:
    release: str  # text now safe to send
    blocked: OutputDecision | None = None  # set when the output check refused; nothing more is sent


class OutputWindow:
    """The sliding-window check for one streamed choice."""

    def __init__(self, guard: Guard, decision: PromptDecision, window: int, interval: int):
        self.guard = guard
        self.decision = decision
        self.window = window
        self.interval = max(1, interval)
        self.text = ""
        self.released = 0

    def add(self, delta: str) -> None:
        self.text += delta

    @property
    def due(self) -> bool:
        """Enough unchecked text has piled up behind the window to be worth a check."""
        return len(self.text) - self.released >= self.window + self.interval

    def check(self, final: bool) -> WindowStep:
        """Run the guard over everything generated so far (blocking; call from a worker thread)."""
        checked = self.guard.check_output(self.text, self.decision, attempt=0)
        if checked.action is not OutputAction.send:
            return WindowStep("", checked)
        end = len(self.text) if final else max(self.released, len(self.text) - self.window)
        release = self.text[self.released:end]
        self.released = end
        return WindowStep(release)


def blocked_message(guard: Guard, decision: OutputDecision) -> str:
    """The policy message for a streamed block (a 'regenerate' verdict cannot regenerate text already sent)."""
    if decision.message:
        return decision.message
    return guard.refusal_message(decision.verdict.refused + decision.verdict.steered)


def blocked_concepts(decision: OutputDecision) -> list[str]:
    return decision.verdict.refused + decision.verdict.steered


class ChunkWriter(Protocol):
    """Turns stream events into the chunk dicts of one endpoint (chat or text completions)."""

    def start(self, index: int) -> dict | None:
        """The opening chunk of a choice (chat sends the assistant role), or None."""

    def text(self, index: int, text: str) -> dict: ...

    def finish(self, index: int, reason: FinishReason, refusal: str | None) -> dict: ...

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict: ...


def frame(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


async def guarded_events(guard: Guard, stream: EngineStream, writer: ChunkWriter, choices: int, window: int,
                         interval: int, include_usage: bool, metrics: ServerMetrics,
                         count: Callable[[str], None], trace: RequestTrace) -> AsyncIterator[bytes]:
    """The SSE body of a guarded stream; closes the engine stream however it ends.

    ``count`` counts the request's outcome (the endpoint handler's counter) and ``trace`` gets the output stage
    (every window check, timed) and is finished: a stream's outcome is only known once its body has been sent.
    """
    windows = {i: OutputWindow(guard, stream.decision, window, interval) for i in range(choices)}
    open_choices = set(windows)
    outcomes: list[str] = []
    checks = {"n": 0, "ms": 0.0}
    error: str | None = None

    async def settle(index: int, finish_reason: FinishReason | None) -> AsyncIterator[bytes]:
        """Check choice ``index`` (finally, when ``finish_reason`` is set) and emit what may be sent."""
        started = time.perf_counter()
        step = await to_thread.run_sync(windows[index].check, finish_reason is not None)
        elapsed = time.perf_counter() - started
        metrics.guard_latency.labels(stage="stream_output").observe(elapsed)
        checks["n"] += 1
        checks["ms"] += elapsed * 1000
        if step.release:
            yield frame(writer.text(index, step.release))
        if step.blocked is not None:
            concepts = blocked_concepts(step.blocked)
            if step.blocked.fallback and windows[index].released == 0:  # answered, as unstreamed: not a block
                logger.info("stream choice %d answered with the fallback of: %s", index, ", ".join(concepts))
                outcomes.append("fallback")
                yield frame(writer.text(index, step.blocked.message))
                yield frame(writer.finish(index, "stop", None))
            else:
                outcomes.append("block")
                metrics.record_block(concepts, stage="stream_output")
                logger.info("stream choice %d blocked by the output check: %s", index, ", ".join(concepts))
                yield frame(writer.finish(index, "content_filter", blocked_message(guard, step.blocked)))
            trace.flag(concepts)
            open_choices.discard(index)
            await stream.cancel(index)
        elif finish_reason is not None:
            outcomes.append("send")
            yield frame(writer.finish(index, finish_reason, None))
            open_choices.discard(index)

    try:
        for index in range(choices):
            if (opening := writer.start(index)) is not None:
                yield frame(opening)
        async for delta in stream:
            if delta.index not in open_choices:
                continue
            windows[delta.index].add(delta.text)
            if delta.finish_reason is not None or windows[delta.index].due:
                async for chunk in settle(delta.index, delta.finish_reason):
                    yield chunk
        # The engine stream is read to its end (not left when the last choice finishes): upstreams send
        # their token usage after the last choice.
        if open_choices:
            raise EngineStreamError(f"the engine ended the stream before choices {sorted(open_choices)} finished")
        if include_usage:
            yield frame(writer.usage(stream.prompt_tokens, stream.completion_tokens))
        count("ok")
        yield DONE_FRAME
    except GuardUnavailable as err:
        logger.error("guard failed during a stream; ending it with an error frame: %s", err)
        count("guard_unavailable")
        error = "guard_unavailable"
        yield guard_unavailable(str(err)).sse_frame()
    except (OpenAIError, EngineStreamError) as err:
        logger.error("engine failed during a stream: %s", err)
        count("error")
        failure = err if isinstance(err, OpenAIError) else OpenAIError(500, str(err), type="server_error",
                                                                        code="engine_error")
        error = failure.code
        yield failure.sse_frame()
    except (asyncio.CancelledError, GeneratorExit):  # the client went away: stop decoding for it
        count("disconnected")
        error = "client_disconnected"
        raise
    finally:
        await stream.aclose()
        result = strongest_result(outcomes, OUTPUT_RESULTS) if outcomes else "unfinished"
        trace.ran("output", f"{result} ({checks['n']} window checks)" + (f", then {error}" if error else ""),
                  checks["ms"])
        trace.finish(200, error)


class EngineStreamError(RuntimeError):
    """The engine broke the stream contract (a choice ended without a finish reason)."""
