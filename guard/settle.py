"""The one settle loop: judge what a model produced, regenerate what leaked with stronger erasure, block the rest.

Every engine (in-process transformers, an upstream server, vLLM) and the diffusion pipeline settle their outputs
here, so "how many regenerations", "what a blocked choice says" and "which seed choice i uses" are decided once.
The loop is written once, as a generator that yields the attempts it wants decoded next; :func:`settle` drives it
with a blocking decoder, :func:`settle_async` with an async one (judging off the event loop). A caller supplies
only what differs: how to decode a batch of attempts and how to judge them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Generator, Sequence
from dataclasses import dataclass, replace
from typing import Generic, Literal, TypeVar

from anyio import to_thread

from guard.decision import Guard, OutputAction, OutputDecision, PromptDecision
from guard.methods.token_penalty.tables import PenaltyRow

FinishReason = Literal["stop", "length", "content_filter"]
# The policy schema caps max_regenerations at 5; this bound holds even if a judge kept asking for more.
REGENERATION_LIMIT = 5

Plan = TypeVar("Plan")  # how one attempt is produced (text: the penalty row; images: the erasure plan)
Output = TypeVar("Output")  # what one attempt produced (text: decoded text; images: an image)
Judgement = TypeVar("Judgement")  # what the judge found (text: the OutputDecision)


def seed_for_choice(seed: int | None, index: int) -> int | None:
    """Choice (or image) ``index`` of a seeded request uses ``seed + index``: batched, streamed or regenerated."""
    return None if seed is None else seed + index


@dataclass(frozen=True)
class Attempt(Generic[Plan]):
    """One decode of one choice: which choice, how it is produced, how many regenerations came before it.

    A regeneration may keep the first ``keep`` characters of the leaked output ``resume`` and decode on from there
    (the text before the leak was accepted); an engine that cannot resume decodes the whole answer again.
    """

    index: int
    plan: Plan
    regenerations: int = 0
    resume: object | None = None  # the output it resumes (an Output of the same loop)
    keep: int = 0


@dataclass(frozen=True)
class Step(Generic[Plan, Judgement]):
    """The judge's word on one attempt: send it, decode it again under ``plan``, or block it with ``message``.

    A ``retry`` carries a ``message`` too: what the choice says if the regeneration limit is reached, and ``keep``:
    how many characters of the output come before the leak (0: regenerate it all).
    """

    action: OutputAction
    judgement: Judgement
    plan: Plan | None = None
    message: str = ""
    keep: int = 0


@dataclass(frozen=True)
class Settled(Generic[Output, Judgement]):
    index: int
    output: Output
    regenerations: int
    judgement: Judgement
    blocked: str | None  # the message that replaces a blocked output; None when sent


Judge = Callable[[Sequence[tuple[Attempt[Plan], Output]]], list[Step[Plan, Judgement]]]


def _settling(first: Sequence[tuple[Attempt[Plan], Output]], judge: Judge
              ) -> Generator[list[Attempt[Plan]], list[Output], list[Settled[Output, Judgement]]]:
    settled: list[Settled[Output, Judgement]] = []
    current = list(first)
    while current:
        again: list[Attempt[Plan]] = []
        for (attempt, output), step in zip(current, judge(current)):
            if step.action is OutputAction.regenerate and attempt.regenerations < REGENERATION_LIMIT:
                again.append(Attempt(attempt.index, step.plan, attempt.regenerations + 1,
                                     output if step.keep else None, step.keep))
            elif step.action is OutputAction.send:
                settled.append(Settled(attempt.index, output, attempt.regenerations, step.judgement, None))
            else:
                settled.append(Settled(attempt.index, output, attempt.regenerations, step.judgement, step.message))
        if not again:
            break
        current = list(zip(again, (yield again)))
    return sorted(settled, key=lambda s: s.index)


def _advance(loop: Generator[list[Attempt[Plan]], list[Output], list[Settled[Output, Judgement]]],
             decoded: list[Output] | None) -> tuple[list[Attempt[Plan]] | None, list[Settled[Output, Judgement]]]:
    """One step of the loop: (attempts to decode next, []) or (None, the settled outputs)."""
    try:
        return (next(loop) if decoded is None else loop.send(decoded)), []
    except StopIteration as done:  # returned, not raised: StopIteration must not cross a coroutine
        return None, done.value


def settle(first: Sequence[tuple[Attempt[Plan], Output]], judge: Judge,
           decode: Callable[[list[Attempt[Plan]]], list[Output]]) -> list[Settled[Output, Judgement]]:
    """Settle with a blocking ``decode`` (one batch per round of regenerations)."""
    loop = _settling(first, judge)
    wanted, settled = _advance(loop, None)
    while wanted is not None:
        wanted, settled = _advance(loop, decode(wanted))
    return settled


async def settle_async(first: Sequence[tuple[Attempt[Plan], Output]], judge: Judge,
                       decode: Callable[[list[Attempt[Plan]]], Awaitable[list[Output]]]
                       ) -> list[Settled[Output, Judgement]]:
    """Settle with an async ``decode``; the judge (detector passes) runs in a worker thread."""
    loop = _settling(first, judge)
    wanted, settled = await to_thread.run_sync(_advance, loop, None)
    while wanted is not None:
        wanted, settled = await to_thread.run_sync(_advance, loop, await decode(wanted))
    return settled


# -------------------------------------------------------------------------------------------------
# text: what every text engine shares


@dataclass(frozen=True)
class Decoded:
    """One decoded attempt of a text choice, as an engine returns it, before any output check."""

    text: str  # for finish_reason == "content_filter" (an upstream's own guard blocked it): its message
    finish_reason: FinishReason
    completion_tokens: int
    token_ids: tuple[int, ...] = ()  # the generated ids, where the engine can resume decoding after a prefix of them


@dataclass(frozen=True)
class Choice:
    index: int
    text: str  # the answer; for finish_reason == "content_filter" the policy's message
    finish_reason: FinishReason
    completion_tokens: int  # tokens of the returned attempt
    regenerations: int  # regenerations this choice used (0 = the first attempt was sent)
    output_decision: OutputDecision | None  # the last output check (None when unguarded)


@dataclass(frozen=True)
class GenerationResult:
    choices: list[Choice]
    prompt_tokens: int
    prompt_decision: PromptDecision | None  # None when unguarded

    @property
    def completion_tokens(self) -> int:
        return sum(choice.completion_tokens for choice in self.choices)


def penalty_row(concept_ids: Sequence[str], strength: float = 1.0, terms: Sequence[str] = ()) -> PenaltyRow | None:
    """The decode plan of a text attempt: which concepts' token penalties apply, how strongly, and the request's
    forbidden terms (None: none)."""
    return PenaltyRow(tuple(concept_ids), strength, tuple(terms)) if concept_ids else None


def text_judge(guard: Guard, decision_of: Callable[[int], PromptDecision]
               ) -> Judge[PenaltyRow | None, Decoded, OutputDecision | None]:
    """Judge text attempts with the guard's output check; ``decision_of(index)`` is the attempt's prompt decision.

    A regeneration decodes under the wider penalty set and stronger penalties the guard asks for; its message is
    what the choice says if the regeneration limit is reached (a steered concept's fallback, or the policy message).
    """

    spent_ms: dict[int, float] = {}  # output checking per choice so far: a settled choice reports all its checks

    def judge(items: Sequence[tuple[Attempt[PenaltyRow | None], Decoded]]
              ) -> list[Step[PenaltyRow | None, OutputDecision | None]]:
        steps: list[Step[PenaltyRow | None, OutputDecision | None]] = []
        for attempt, decoded in items:
            if decoded.finish_reason == "content_filter":  # an upstream guard already blocked it
                steps.append(Step(OutputAction.block, None, message=decoded.text))
                continue
            decision = decision_of(attempt.index)
            if attempt.regenerations and attempt.plan is not None:
                # a regeneration is judged by what it was decoded under: the concepts it penalised, and its
                # forbidden terms (those the prompt missed and the earlier output revealed count as leaks too)
                decision = replace(decision, penalized=list(attempt.plan.concept_ids), terms=attempt.plan.terms)
            checked = guard.check_output(decoded.text, decision, attempt.regenerations)
            spent_ms[attempt.index] = spent_ms.get(attempt.index, 0.0) + checked.ms
            checked = replace(checked, ms=spent_ms[attempt.index])
            message = ""
            if checked.action is not OutputAction.send:
                message = checked.message or guard.refusal_message(checked.verdict.flagged or decision.penalized)
            steps.append(Step(checked.action, checked, penalty_row(checked.penalized, checked.strength, checked.terms),
                              message, checked.leak_start))
        return steps

    return judge


def _finish_reason(settled: Settled[Decoded, OutputDecision | None]) -> FinishReason:
    """As decoded when sent; "stop" when a steered concept's fallback answers instead; else "content_filter"."""
    if settled.blocked is None:
        return settled.output.finish_reason
    return "stop" if settled.judgement is not None and settled.judgement.fallback else "content_filter"


def text_choices(settled: Sequence[Settled[Decoded, OutputDecision | None]], index_of: Callable[[int], int] = int
                 ) -> list[Choice]:
    """Settled text attempts as API choices; ``index_of`` maps an attempt's index to its choice index.

    A blocked choice carries the policy message, or (a fallback) the steered concept's fallback answer.
    """
    return [Choice(index_of(s.index), s.output.text if s.blocked is None else s.blocked, _finish_reason(s),
                   s.output.completion_tokens, s.regenerations, s.judgement) for s in settled]


def unguarded_choices(decoded: Sequence[tuple[int, Decoded]]) -> list[Choice]:
    """Choices sent as decoded: the unguarded baseline (``guard=None``)."""
    return [Choice(index, d.text, d.finish_reason, d.completion_tokens, 0, None) for index, d in decoded]
