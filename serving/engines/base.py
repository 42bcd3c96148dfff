"""The one protocol every engine (in-process transformers, an upstream HTTP server, in-process vLLM) implements.

Engines receive the live :class:`~guard.decision.Guard` with each call, so a policy reload takes effect on the next
request without restarting an engine. ``generate`` returns fully guarded choices (prompt checked, penalties
applied, output checked, regenerated or blocked); ``open_stream`` checks the prompt before it returns (so a
refusal is still a plain HTTP 400) and then yields raw text deltas — the output check of a stream is the HTTP
layer's sliding window (:mod:`serving.streaming`), the same for every engine.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import AsyncIterator, Protocol

from anyio import to_thread

from guard.decision import Guard, PromptDecision
from guard.methods.token_penalty.tables import PenaltyRow
from guard.settle import (
    Attempt,
    Decoded,
    FinishReason,
    GenerationResult,
    penalty_row,
    seed_for_choice,
    settle_async,
    text_choices,
    text_judge,
)
from guard.text.generation import TextRequest


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

    async def generate(self, guard: Guard, request: TextRequest) -> GenerationResult:
        """Guarded answer with ``settings.n`` choices; raises ConceptRefused, GuardUnavailable or OpenAIError."""

    async def open_stream(self, guard: Guard, request: TextRequest) -> EngineStream:
        """Check the prompt (raising like ``generate``) and start streaming ``settings.n`` choices."""

    async def close(self) -> None: ...


@dataclass(frozen=True)
class DecodeResult:
    choices: list[Decoded]
    prompt_tokens: int


class Decode(Protocol):
    """An engine's plain decode: ``n`` choices under ``penalty`` (None: no penalties), no checks at all."""

    async def __call__(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None, n: int,
                       seed: int | None) -> DecodeResult: ...


async def guarded_generate(guard: Guard, request: TextRequest, decode: Decode) -> GenerationResult:
    """``generate`` for engines that only decode (an upstream server, vLLM): check the prompt (raising before
    anything is decoded), decode ``n`` choices, then the settle loop of :mod:`guard.settle`, as in-process."""
    decision = await to_thread.run_sync(guard.check_prompt, request.guard_texts)
    penalty = penalty_row(decision.penalized, terms=decision.terms)
    first = await decode(guard, request, penalty, request.settings.n, request.settings.seed)

    async def again(attempts: list[Attempt[PenaltyRow | None]]) -> list[Decoded]:
        results = await asyncio.gather(*(
            decode(guard, request, a.plan, 1, seed_for_choice(request.settings.seed, a.index)) for a in attempts))
        return [result.choices[0] for result in results]

    attempts = [Attempt(i, penalty) for i in range(len(first.choices))]
    settled = await settle_async(list(zip(attempts, first.choices)), text_judge(guard, lambda _: decision), again)
    return GenerationResult(text_choices(settled), first.prompt_tokens, decision)
