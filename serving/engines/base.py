"""The one protocol every engine (in-process transformers, an upstream HTTP server, in-process vLLM) implements.

Engines receive the live :class:`~guard.decision.Guard` with each call, so a policy reload takes effect on the next
request without restarting an engine. ``generate`` returns fully guarded choices (prompt checked, penalties
applied, output checked, regenerated or blocked); ``open_stream`` checks the prompt before it returns (so a
refusal is still a plain HTTP 400) and then yields raw text deltas — the output check of a stream is the HTTP
layer's sliding window (:mod:`serving.streaming`), the same for every engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from guard.decision import Guard, PromptDecision
from guard.text.generation import FinishReason, GenerationResult, SamplingSettings


@dataclass(frozen=True)
class EngineRequest:
    """A chat conversation (``messages``) or a raw text prompt (``prompt``), with its sampling settings."""

    settings: SamplingSettings
    messages: list[dict[str, str]] | None = None
    prompt: str | None = None
    user: str | None = None  # the client's end-user id: forwarded upstream, named in block logs

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("an engine request has either messages or a prompt")

    @property
    def guard_texts(self) -> list[str]:
        """What the prompt check reads: every message (history included, so earlier turns cannot smuggle)."""
        if self.messages is not None:
            return [m["content"] for m in self.messages if m["content"]]
        return [self.prompt or ""]


@dataclass(frozen=True)
class ChoiceDelta:
    """New text of one choice of a stream; the last delta of a choice carries its finish reason."""

    index: int
    text: str
    finish_reason: FinishReason | None = None


class EngineStream(Protocol):
    """A running stream whose prompt passed the guard."""

    decision: PromptDecision

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def completion_tokens(self) -> int: ...

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]: ...

    async def cancel(self, index: int) -> None:
        """Stop producing choice ``index`` (its output was blocked); other choices go on."""

    async def aclose(self) -> None:
        """Stop everything (client gone, stream finished); idempotent."""


class Engine(Protocol):
    model_id: str  # the name clients put in "model" and /v1/models lists
    description: str  # for logs and /health
    vocab_size: int | None  # bounds client logit_bias token ids; None when the tokenizer is unknown

    async def prepare(self, guard: Guard) -> None:
        """Build whatever a guard needs for this engine (penalty tables) before it serves traffic."""

    async def generate(self, guard: Guard, request: EngineRequest) -> GenerationResult:
        """Guarded answer with ``settings.n`` choices; raises ConceptRefused, GuardUnavailable or OpenAIError."""

    async def open_stream(self, guard: Guard, request: EngineRequest) -> EngineStream:
        """Check the prompt (raising like ``generate``) and start streaming ``settings.n`` choices."""

    async def close(self) -> None: ...
