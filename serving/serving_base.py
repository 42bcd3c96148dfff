"""What chat and text completions share: validation, sampling settings, guard outcomes as HTTP, headers."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Sequence

from anyio import to_thread

from guard.certification import Certificate
from guard.decision import Guard
from guard.errors import ConceptRefused, GuardUnavailable, TokenPenaltyError
from guard.text.generation import GenerationResult, SamplingSettings
from serving.config import ServerSettings
from serving.engines.base import Engine, EngineRequest, EngineStream
from serving.errors import (
    OpenAIError,
    guard_unavailable,
    invalid_request,
    model_not_found,
    policy_violation,
    unsupported_parameter,
)
from serving.guard_state import GuardState, MeteredGuard
from serving.metrics import ServerMetrics
from serving.protocol import SamplingRequest
from serving.streaming import window_size

logger = logging.getLogger("serving")


def guard_headers(guard: Guard, flagged: Sequence[str]) -> dict[str, str]:
    """Which policy judged the request, how many concepts it checked, and which ones it flagged."""
    return {"x-guard-policy": guard.policy.version_tag,
            "x-guard-concepts-checked": str(len(guard.policy.concepts)),
            "x-guard-flagged": ",".join(dict.fromkeys(flagged))}


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    guard_state: GuardState
    metrics: ServerMetrics
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop (engines bound to it run work there)


class GuardedServing:
    """Base of the endpoint handlers: turns a validated request into guarded engine calls."""

    endpoint = ""

    def __init__(self, context: ServerContext):
        self.context = context
        self.settings = context.settings
        self.engine = context.engine
        self.metrics = context.metrics

    def invalid(self, error: OpenAIError) -> OpenAIError:
        self.metrics.requests.labels(endpoint=self.endpoint, outcome="invalid").inc()
        return error

    def validate(self, request: SamplingRequest) -> None:
        """Refuse what cannot be honoured exactly (400 naming the parameter) before the guard runs."""
        if request.model != self.engine.model_id:
            raise self.invalid(model_not_found(request.model, self.engine.model_id))
        if (unsupported := request.unsupported()) is not None:
            raise self.invalid(unsupported_parameter(*unsupported))
        if request.n > self.settings.max_n:
            raise self.invalid(invalid_request(f"'n' must be at most {self.settings.max_n} on this server", "n"))
        if request.vllm_xargs is not None:
            # Only the guard sets engine arguments (they carry its penalties); a client's never reach an engine.
            logger.warning("stripped client-supplied vllm_xargs (%s)", ", ".join(map(str, request.vllm_xargs)))
            request.vllm_xargs = None
        vocab = self.engine.vocab_size
        if vocab is not None:
            for token in request.client_logit_bias():
                if token >= vocab:
                    raise self.invalid(invalid_request(
                        f"logit_bias token id {token} is outside the vocabulary (size {vocab})", "logit_bias"))

    def sampling(self, request: SamplingRequest, max_tokens: int | None,
                 param: str = "max_tokens") -> SamplingSettings:
        tokens = self.settings.default_max_tokens if max_tokens is None else max_tokens
        if tokens > self.settings.max_tokens_limit:
            raise self.invalid(invalid_request(
                f"'{param}' must be at most {self.settings.max_tokens_limit} on this server", param))
        return SamplingSettings(max_new_tokens=tokens,
                                temperature=1.0 if request.temperature is None else request.temperature,
                                top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed,
                                stop=request.stop_sequences, n=request.n, logit_bias=request.client_logit_bias())

    def _refused(self, guard: Guard, err: ConceptRefused, user: str | None) -> OpenAIError:
        logger.info("refused a prompt (%s)%s", ", ".join(err.concept_ids), f" from user {user!r}" if user else "")
        self.metrics.requests.labels(endpoint=self.endpoint, outcome="blocked_prompt").inc()
        self.metrics.record_block(err.concept_ids, stage="prompt")
        error = policy_violation(err.concept_ids, err.message)
        error.headers.update(guard_headers(guard, err.concept_ids))
        return error

    def _unavailable(self, guard: Guard, err: Exception) -> OpenAIError:
        self.metrics.requests.labels(endpoint=self.endpoint, outcome="guard_unavailable").inc()
        logger.error("guard unavailable, refusing the request: %s", err)
        error = guard_unavailable(str(err))
        error.headers.update(guard_headers(guard, []))
        return error

    async def certify(self, guard: MeteredGuard, prompts: Sequence[str], user: str | None) -> dict[str, str]:
        """erase-and-check each prompt before anything is generated; the ``x-guard-certificate`` header, or {}.

        Only policies with a ``certify:`` block certify. A flagged prompt is refused (400); certification that
        cannot run refuses the request (503): never an uncertified answer.
        """
        if guard.certifier is None:
            return {}

        def run() -> tuple[list[Certificate], list[str]]:
            certificates: list[Certificate] = []
            for prompt in prompts:
                certificates.append(guard.certify(prompt))
                if certificates[-1].flagged:
                    return certificates, guard.classify([certificates[-1].trigger or ""]).refused
            return certificates, []

        try:
            certificates, concept_ids = await to_thread.run_sync(run)
        except Exception as err:  # noqa: BLE001 - any certification fault fails closed, with its cause
            raise self._unavailable(guard, err) from None
        header = {"x-guard-certificate": ", ".join(c.header_value() for c in certificates)}
        last = certificates[-1]
        if not last.flagged:
            return header
        if last.trigger_erased_tokens == 0 and concept_ids:
            # The prompt itself names a refused concept: the guard's own refusal, as without certification.
            error = self._refused(guard, ConceptRefused(concept_ids, guard.refusal_message(concept_ids)), user)
        else:
            error = self._certify_refused(guard, last, concept_ids, user)
        error.headers.update(header)
        raise error

    def _certify_refused(self, guard: Guard, certificate: Certificate, concept_ids: list[str],
                         user: str | None) -> OpenAIError:
        """A prompt the guard's own check would pass: harmful behind up to d extra tokens (an adversarial suffix,
        say), or caught only by the harmful-request classifier of ``filter: both``."""
        logger.info("erase-and-check refused a prompt (%s)%s", ", ".join(concept_ids) or certificate.filter,
                    f" from user {user!r}" if user else "")
        self.metrics.requests.labels(endpoint=self.endpoint, outcome="blocked_prompt").inc()
        self.metrics.record_block(concept_ids or ["erase-and-check"], stage="certify")
        message = (f"Sorry, I can't help with that: erase-and-check (mode={certificate.mode}, "
                   f"d={certificate.max_erase}) flagged this prompt as harmful.")
        error = policy_violation(concept_ids, message)
        error.headers.update(guard_headers(guard, concept_ids))
        return error

    async def generate(self, guard: Guard, requests: list[EngineRequest]) -> list[GenerationResult]:
        """Guarded answers to the prompts of one HTTP request (concurrently, so the engine can batch them)."""
        try:
            results = await asyncio.gather(*(self.engine.generate(guard, request) for request in requests))
        except ConceptRefused as err:
            raise self._refused(guard, err, requests[0].user) from None
        except (GuardUnavailable, TokenPenaltyError) as err:
            raise self._unavailable(guard, err) from None
        except OpenAIError:
            self.metrics.requests.labels(endpoint=self.endpoint, outcome="error").inc()
            raise
        blocked = False
        for result in results:
            for choice in result.choices:
                self.metrics.regenerations.inc(choice.regenerations)
                if choice.finish_reason == "content_filter":
                    blocked = True
                    self.metrics.record_block(self.output_concepts(result, choice.index), stage="output")
        self.metrics.requests.labels(endpoint=self.endpoint, outcome="blocked_output" if blocked else "ok").inc()
        return list(results)

    async def open_stream(self, guard: Guard, request: EngineRequest) -> EngineStream:
        try:
            return await self.engine.open_stream(guard, request)
        except ConceptRefused as err:
            raise self._refused(guard, err, request.user) from None
        except (GuardUnavailable, TokenPenaltyError) as err:
            raise self._unavailable(guard, err) from None
        except OpenAIError:
            self.metrics.requests.labels(endpoint=self.endpoint, outcome="error").inc()
            raise

    @staticmethod
    def output_concepts(result: GenerationResult, index: int) -> list[str]:
        decision = result.choices[index].output_decision
        return [] if decision is None else decision.verdict.refused + decision.verdict.steered

    def flagged(self, result: GenerationResult) -> list[str]:
        flagged = list(result.prompt_decision.verdict.flagged) if result.prompt_decision is not None else []
        for choice in result.choices:
            if choice.finish_reason == "content_filter":
                flagged += self.output_concepts(result, choice.index)
        return flagged

    def stream_window(self, guard: Guard) -> int:
        return window_size(guard.policy, self.settings.stream_window_margin)

    @staticmethod
    def fingerprint(guard: Guard) -> str:
        return f"guard-{guard.policy.fingerprint}"
