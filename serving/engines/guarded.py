"""The guard loop for engines that only decode (an upstream server, vLLM): check, decode, check, retry or block.

The in-process transformers engine gets the same loop from :mod:`guard.text.generation`; this module gives the
other engines identical semantics: the prompt check raises before anything is decoded, each choice's output
is checked, a leak is regenerated with the wider penalty set and stronger penalties the guard asks for, and
what still leaks comes back as ``finish_reason: "content_filter"`` carrying the policy's message.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Mapping, Protocol

from anyio import to_thread

from guard.decision import Guard, OutputAction
from guard.methods.token_penalty.tables import PenaltyRow, TokenPenalties
from guard.text.generation import Choice, FinishReason, GenerationResult
from serving.engines.base import EngineRequest


@dataclass(frozen=True)
class RawChoice:
    text: str  # for finish_reason == "content_filter" (an upstream guard blocked it): its message
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class RawResult:
    choices: list[RawChoice]
    prompt_tokens: int


class Decode(Protocol):
    """An engine's plain decode: ``n`` choices under ``penalty`` (None: no penalties), no checks at all."""

    async def __call__(self, guard: Guard, request: EngineRequest, penalty: PenaltyRow | None, n: int,
                       seed: int | None) -> RawResult: ...


def penalty_row(concept_ids: list[str], strength: float = 1.0) -> PenaltyRow | None:
    return PenaltyRow(tuple(concept_ids), strength) if concept_ids else None


async def guarded_generate(guard: Guard, request: EngineRequest, decode: Decode) -> GenerationResult:
    decision = await to_thread.run_sync(guard.check_prompt, request.guard_texts)
    first = await decode(guard, request, penalty_row(decision.penalized), request.settings.n, request.settings.seed)

    async def settle(index: int, current: RawChoice) -> Choice:
        attempt = 0
        while True:
            if current.finish_reason == "content_filter":
                return Choice(index, current.text, "content_filter", current.completion_tokens, attempt, None)
            verdict = await to_thread.run_sync(guard.check_output, current.text, decision, attempt)
            if verdict.action is OutputAction.send:
                return Choice(index, current.text, current.finish_reason, current.completion_tokens, attempt, verdict)
            if verdict.action is OutputAction.block:
                return Choice(index, verdict.message, "content_filter", current.completion_tokens, attempt, verdict)
            attempt += 1
            seed = None if request.settings.seed is None else request.settings.seed + index
            again = await decode(guard, request, penalty_row(verdict.penalized, verdict.strength), 1, seed)
            current = again.choices[0]

    choices = await asyncio.gather(*(settle(i, choice) for i, choice in enumerate(first.choices)))
    return GenerationResult(list(choices), first.prompt_tokens, decision)


def protected_tokens(penalties: TokenPenalties) -> frozenset[int]:
    """Every token some concept's penalties push down: a client may lower these further, never raise them."""
    tokens: set[int] = set()
    for concept in penalties.policy.concepts:
        if concept.methods.token_penalty.enabled:
            tokens.update(penalties.logit_bias([concept.id]))
    return frozenset(tokens)


def client_bias_within_guard(client_bias: Mapping[int, float], protected: frozenset[int]) -> dict[int, float]:
    """The client's logit_bias with every positive bias on a guard-penalised token removed."""
    return {token: (min(bias, 0.0) if token in protected else bias) for token, bias in client_bias.items()}


def merged_logit_bias(client_bias: Mapping[int, float], guard_bias: Mapping[int, float]) -> dict[int, float]:
    """One static bias for an upstream: the guard's value wins unless the client's is even lower."""
    merged = dict(client_bias)
    for token, bias in guard_bias.items():
        merged[token] = min(merged.get(token, bias), bias)
    return merged
