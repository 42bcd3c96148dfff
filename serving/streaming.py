"""Server-sent events with an incremental output check: each piece of text is sent once every check guarding it
has passed, and the checks cost time in proportion to the new text, not the whole answer.

What each check guarantees (:class:`StreamCheck`):

* **Aliases** (however disguised: case, spacing, leetspeak, homoglyphs) are never sent, not even partly: the
  letters where an alias may still be under way are held back (a few characters, the longest pending alias
  prefix), and an alias that may have been completed is judged by the full output check before anything more is
  sent. A forbidden name split over several deltas ("Eif" + "fel Tow" + "er") never leaves the server.
* **Near misses** ("Dumbeldore") are checked as each word ends; the stream stops before the next text is sent.
* **Meaning** (exemplars, the harmful-request semantics of refused concepts) is checked per finished sentence;
  the stream stops before any text after that sentence is sent (the sentence itself may have been sent).
* **The whole answer** gets exactly the output check of a non-streamed answer before the held-back rest is
  sent, so a stream is never judged more leniently than the same answer unstreamed.

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
import re
import time
from typing import AsyncIterator, Callable, Protocol

from anyio import to_thread

from detectors.pieces import SENTENCE_END
from guard.decision import Guard, OutputAction, OutputDecision, PromptDecision
from guard.errors import GuardUnavailable
from guard.settle import FinishReason
from serving.decisions import OUTPUT_RESULTS, RequestTrace, strongest_result
from serving.engines.base import EngineStream
from serving.errors import OpenAIError, guard_unavailable
from serving.metrics import ServerMetrics

logger = logging.getLogger("serving")

DONE_FRAME = b"data: [DONE]\n\n"
RUN_ON_UNIT_WORDS = 20  # a sentence without an end is checked in units of this many words
_FINISHED_WORD = re.compile(r"\S+(?=\s)")


def completion_responses(body: type) -> dict[int | str, dict]:
    """OpenAPI for a completion route's 200: ``body`` as JSON, or server-sent events with ``stream: true``.

    Before OpenAPI 3.2 an event-stream ``schema`` describes one event: its ``data`` is a JSON chunk or ``[DONE]``.
    """
    event = {"type": "object", "required": ["data"],
             "properties": {"data": {"type": "string", "description": "A JSON chunk object, or [DONE] at the end."},
                            "event": {"type": "string"}, "id": {"type": "string"}}}
    return {200: {"model": body, "description": "The completion; with stream=true, server-sent events.",
                  "content": {"text/event-stream": {"schema": event}}}}


class StreamCheck:
    """The incremental output check of one streamed choice: work in proportion to each new piece of text.

    * Aliases: an automaton over the squashed text (:class:`detectors.alias.AliasStream`) holds back only the
      letters where an alias may still be under way; when one may have been completed, the full output check of
      the text so far decides before anything more is released.
    * Near misses: every finished word (with the word before it) is compared with the steered concepts' aliases;
      a near miss is judged by the full output check.
    * Meaning: every finished sentence (a run-on one every ``RUN_ON_UNIT_WORDS`` words) goes through the output
      check before any text after it is released; sentences read together are judged by the end's full check.
    * The end: the full output check of the whole answer, the same check a non-streamed answer gets, before the
      held-back rest is released.
    """

    def __init__(self, guard: Guard, decision: PromptDecision):
        self.guard = guard
        self.decision = decision
        self.aliases = guard.alias_automaton.stream()
        self.released = 0
        self._safe_end = 0
        self._word_end = 0  # text[:_word_end] has been read for near misses
        self._previous_word = ""
        self._unit_start = 0  # the sentence under way starts here

    @property
    def text(self) -> str:
        return self.aliases.text

    def add(self, delta: str) -> tuple[bool, list[tuple[int, str]]]:
        """Read a new piece (cheap, no model): whether the full check must run now, and the finished units
        (end offset, text to check) in order."""
        try:
            scan = self.aliases.feed(delta)
            self._safe_end = scan.safe_end
            return scan.completed or self._near_miss(), self._finished_units()
        except Exception as err:  # noqa: BLE001 - a matcher fault fails closed like the classifier's
            raise GuardUnavailable(f"stream check failed: {type(err).__name__}: {err}") from err

    def _near_miss(self) -> bool:
        end = self.text.rfind(" ", self._word_end) + 1
        if end <= self._word_end:
            return False
        words = self.text[self._word_end:end].split()
        self._word_end = end
        if not words:
            return False
        span = " ".join([self._previous_word, *words]).strip()
        self._previous_word = words[-1]
        return bool(self.guard.near_misses.detect([span]).flagged)

    def _finished_units(self) -> list[tuple[int, str]]:
        units = []
        while True:
            ended = SENTENCE_END.search(self.text, self._unit_start)
            if ended is not None:
                unit, end, self._unit_start = self.text[self._unit_start:ended.start()].strip(), ended.start(), \
                    ended.end()
            else:
                words = list(_FINISHED_WORD.finditer(self.text, self._unit_start))
                if len(words) < RUN_ON_UNIT_WORDS:
                    return units
                end = words[RUN_ON_UNIT_WORDS - 1].end()
                unit, self._unit_start = self.text[self._unit_start:end].strip(), end
            if unit:
                units.append((end, unit))

    def check(self, text: str) -> OutputDecision | None:
        """The output check of ``text`` (blocking: call from a worker thread); None when it may be sent."""
        checked = self.guard.check_output(text, self.decision, attempt=0)
        return None if checked.action is OutputAction.send else checked

    def release(self, end: int | None = None) -> str:
        """The text up to ``end`` (default: as far as the alias scan allows) not sent yet."""
        end = self._safe_end if end is None else min(end, self._safe_end)
        if end <= self.released:
            return ""
        piece, self.released = self.text[self.released:end], end
        return piece

    def release_all(self) -> str:
        self._safe_end = len(self.text)
        return self.release()


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


async def guarded_events(guard: Guard, stream: EngineStream, writer: ChunkWriter, choices: int,
                         include_usage: bool, metrics: ServerMetrics,
                         count: Callable[[str], None], trace: RequestTrace) -> AsyncIterator[bytes]:
    """The SSE body of a guarded stream; closes the engine stream however it ends.

    ``count`` counts the request's outcome (the endpoint handler's counter) and ``trace`` gets the output stage
    (every incremental check, timed) and is finished: a stream's outcome is only known once its body has been sent.
    """
    checks = {i: StreamCheck(guard, stream.decision) for i in range(choices)}
    open_choices = set(checks)
    outcomes: list[str] = []
    timing = {"n": 0, "ms": 0.0}
    error: str | None = None

    async def checked(index: int, text: str) -> OutputDecision | None:
        started = time.perf_counter()
        try:
            return await to_thread.run_sync(checks[index].check, text)
        finally:
            elapsed = time.perf_counter() - started
            metrics.guard_latency.labels(stage="stream_output").observe(elapsed)
            timing["n"] += 1
            timing["ms"] += elapsed * 1000

    async def blocked(index: int, decision: OutputDecision) -> AsyncIterator[bytes]:
        concepts = blocked_concepts(decision)
        if decision.fallback and checks[index].released == 0:  # answered, as unstreamed: not a block
            logger.info("stream choice %d answered with the fallback of: %s", index, ", ".join(concepts))
            outcomes.append("fallback")
            yield frame(writer.text(index, decision.message))
            yield frame(writer.finish(index, "stop", None))
        else:
            outcomes.append("block")
            metrics.record_block(concepts, stage="stream_output")
            logger.info("stream choice %d blocked by the output check: %s", index, ", ".join(concepts))
            yield frame(writer.finish(index, "content_filter", blocked_message(guard, decision)))
        trace.flag(concepts)
        open_choices.discard(index)
        await stream.cancel(index)

    async def advance(index: int, delta: str, finish_reason: FinishReason | None) -> AsyncIterator[bytes]:
        """Read one delta of choice ``index`` and send what every check guarding it has passed."""
        check = checks[index]
        full_check, units = check.add(delta)
        verdict = await checked(index, check.text) if finish_reason is not None or full_check else None
        if finish_reason is None:  # the end's full check covers the last units
            for end, unit in units:
                if verdict is not None:
                    break
                if piece := check.release(end):
                    yield frame(writer.text(index, piece))
                verdict = await checked(index, unit)
        if verdict is not None:
            async for chunk in blocked(index, verdict):
                yield chunk
            return
        if piece := check.release_all() if finish_reason is not None else check.release():
            yield frame(writer.text(index, piece))
        if finish_reason is not None:
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
            async for chunk in advance(delta.index, delta.text, delta.finish_reason):
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
        trace.ran("output", f"{result} ({timing['n']} incremental checks)" + (f", then {error}" if error else ""),
                  timing["ms"])
        trace.finish(200, error)


class EngineStreamError(RuntimeError):
    """The engine broke the stream contract (a choice ended without a finish reason)."""
