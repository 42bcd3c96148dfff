"""The endpoint handlers' bases: how guard outcomes become HTTP, in one place for every endpoint.

:class:`GuardedServing` is what every endpoint shares — request counting and latency, refusals (400
content_policy_violation), guard-unavailable errors (503) and the ``x-guard-*`` headers. :class:`TextServing`
adds what chat and text completions share: validation, sampling settings, erase-and-check certification and the
guarded engine calls. Handlers are built once per app (:func:`serving.app.build_app`) and read the active guard
per request, so a policy reload needs no new handler.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Generic, Mapping, Sequence, TypeVar

from anyio import to_thread
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from detectors.language import LanguageReport
from guard.certification import Certificate
from guard.decision import Guard, Verdict
from guard.errors import ConceptRefused, GuardUnavailable, TokenPenaltyError
from guard.policy import Policy
from guard.settle import GenerationResult
from guard.text.generation import SamplingSettings, TextRequest
from serving.auth import Caller
from serving.config import ServerSettings
from serving.decisions import OUTPUT_RESULTS, DecisionLog, RequestTrace, strongest_result
from serving.engines.base import Engine, EngineStream
from serving.errors import (
    OpenAIError,
    guard_unavailable,
    invalid_request,
    model_not_found,
    policy_violation,
    unsupported_parameter,
)
from serving.guard_state import ActiveGuard, GuardState, KeyPolicies
from serving.metrics import ServerMetrics
from serving.protocol import OpenAIBaseModel, SamplingRequest
from serving.reports import certificate_body, strongest, verdict_action
from serving.streaming import ChunkWriter, guarded_events

logger = logging.getLogger("serving")

RequestT = TypeVar("RequestT", bound=OpenAIBaseModel)
SamplingRequestT = TypeVar("SamplingRequestT", bound=SamplingRequest)
T = TypeVar("T")


def guard_headers(policy: Policy, flagged: Sequence[str]) -> dict[str, str]:
    """Which policy judged the request, how many concepts it checked, and which ones it flagged."""
    return {"x-guard-policy": policy.version_tag,
            "x-guard-concepts-checked": str(len(policy.concepts)),
            "x-guard-flagged": ",".join(dict.fromkeys(flagged))}


def certify_refusal(certificate: Certificate) -> str:
    """What a prompt that erase-and-check flagged, but no refused concept names, is refused with."""
    return (f"Sorry, I can't help with that: erase-and-check (mode={certificate.mode}, "
            f"d={certificate.max_erase}) flagged this prompt as harmful.")


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    guard_state: GuardState  # the --policy policy (and the image guard)
    metrics: ServerMetrics
    policies: KeyPolicies  # which policy guards each key (--policy-map); others get ``guard_state``
    decision_log: DecisionLog | None = None
    loop: asyncio.AbstractEventLoop | None = None  # the serving loop (engines bound to it run work there)


@dataclass(frozen=True)
class Call:
    """One request as a handler sees it: the guard of its key's policy (taken once, so a reload mid-request
    never mixes two policy versions), that policy's state, and the trace its stages are recorded in."""

    active: ActiveGuard
    state: GuardState
    trace: RequestTrace


class GuardedServing(ABC, Generic[RequestT]):
    """Base of every endpoint handler: ``create`` answers one validated request; calling the handler times it
    and closes its trace (a stream's trace is closed when the stream ends)."""

    endpoint = ""  # the ``endpoint`` label of the request metrics
    stages: tuple[str, ...] = ()  # the guard stages of this endpoint, each recorded (ran or skipped) per request

    def __init__(self, context: ServerContext):
        self.context = context
        self.settings = context.settings
        self.metrics = context.metrics

    async def __call__(self, request: RequestT, caller: Caller) -> Response:
        state = self.context.policies.for_key(caller.key_id)
        active = state.active
        trace = RequestTrace(self.endpoint, self.stages, request_id=caller.request_id, key_id=caller.key_id,
                             stream=bool(getattr(request, "stream", False)), log=self.context.decision_log)
        trace.policy = active.guard.policy.version_tag
        with self.metrics.request_latency.labels(endpoint=self.endpoint).time():
            try:
                response = await self.create(request, Call(active, state, trace))
            except OpenAIError as err:
                trace.finish(err.status, err.code)
                err.headers["x-request-id"] = trace.request_id
                raise
            except Exception:
                trace.finish(500, "internal_error")
                raise
        if not isinstance(response, StreamingResponse):  # a stream finishes its trace when its body ends
            trace.finish(response.status_code)
        response.headers["x-request-id"] = trace.request_id
        return response

    @abstractmethod
    async def create(self, request: RequestT, call: Call) -> Response:
        """The endpoint's answer to ``request`` (an OpenAIError on any refusal), its stages in ``call.trace``."""

    def count(self, outcome: str) -> None:
        """Count one finished request by outcome (ok, blocked_prompt, blocked_output, guard_unavailable, ...)."""
        self.metrics.requests.labels(endpoint=self.endpoint, outcome=outcome).inc()

    def invalid(self, error: OpenAIError) -> OpenAIError:
        self.count("invalid")
        return error

    def refuse(self, policy: Policy, concept_ids: Sequence[str], message: str, user: str | None, *,
               stage: str = "prompt", flagged: Sequence[str] | None = None,
               blocked: Sequence[str] | None = None) -> OpenAIError:
        """A policy block (400 content_policy_violation) of ``concept_ids``, with the x-guard-* headers.

        Counted as a blocked output when ``stage`` is "output", else as a blocked prompt; ``blocked`` (default:
        ``concept_ids``) is counted per concept at ``stage``; ``flagged`` (default: ``concept_ids``) is the
        x-guard-flagged header.
        """
        blocked = list(concept_ids if blocked is None else blocked)
        logger.info("%s: refused at %s (%s)%s", self.endpoint, stage, ", ".join(blocked),
                    f" from user {user!r}" if user else "")
        self.count("blocked_output" if stage == "output" else "blocked_prompt")
        self.metrics.record_block(blocked, stage=stage)
        error = policy_violation(concept_ids, message)
        error.headers.update(guard_headers(policy, concept_ids if flagged is None else flagged))
        return error

    def unavailable(self, policy: Policy, err: Exception) -> OpenAIError:
        """503 guard_unavailable: the guard could not run, so the request is not answered (fail closed)."""
        self.count("guard_unavailable")
        logger.error("%s: guard unavailable, refusing the request: %s", self.endpoint, err)
        error = guard_unavailable(str(err))
        error.headers.update(guard_headers(policy, []))
        return error

    async def run_check(self, policy: Policy, check: Callable[[], T]) -> T:
        """A blocking guard check in a worker thread; a guard that cannot run is a 503 (fail closed)."""
        try:
            return await to_thread.run_sync(check)
        except GuardUnavailable as err:
            raise self.unavailable(policy, err) from None

    def check_length(self, texts: Sequence[str], param: str) -> None:
        """400 for input longer than the guard checks (``--max-checked-chars``): never a partial check."""
        length = sum(len(text) for text in texts)
        limit = self.settings.max_checked_chars
        if length > limit:
            raise self.invalid(invalid_request(
                f"'{param}' holds {length} characters; the guard checks at most {limit} characters of input per "
                "request on this server (--max-checked-chars)", param, code="context_length_exceeded"))

    def language_of(self, guard: Guard, texts: Sequence[str], trace: RequestTrace | None) -> LanguageReport:
        """The languages of ``texts`` under ``guard``'s policy, recorded in ``trace`` if given (503 if the detector
        fails: never an unchecked pass)."""
        try:
            report = guard.language_report(texts)
        except GuardUnavailable as err:
            raise self.unavailable(guard.policy, err) from None
        if trace is not None:
            trace.language = report.header_value()
        return report

    def check_language(self, call: Call, texts: Sequence[str], user: str | None) -> dict[str, str]:
        """The ``x-guard-language`` header of the request's texts (also in the decision log); a request with a
        language the policy's detectors do not cover is refused (400) when ``languages.uncovered`` is refuse."""
        policy = call.active.guard.policy
        report = self.language_of(call.active.guard, texts, call.trace)
        header = {"x-guard-language": report.header_value()}
        if report.refusal_message is not None:
            error = self.refuse(policy, ["language"], report.refusal_message, user, stage="language", flagged=[])
            error.headers.update(header)
            raise error
        return header

    async def certify(self, call: Call, prompts: Sequence[str], user: str | None,
                      labels: Sequence[str]) -> dict[str, str]:
        """erase-and-check each prompt before anything is generated; the ``x-guard-certificate`` header, or {}.

        ``labels[i]`` names what ``prompts[i]`` is (``messages[0:3]``, ``prompt[1]``), so the header says what was
        certified.
        Only policies with a ``certify:`` block certify. A flagged prompt is refused (400); certification that
        cannot run refuses the request (503): never an uncertified answer.
        """
        active, trace = call.active, call.trace
        if active.certifier is None:
            trace.skipped("certify", "policy has no certify block")
            return {}
        guard = active.guard
        certificates: list[Certificate] = []
        concept_ids: list[str] = []
        started = time.perf_counter()
        for prompt in prompts:
            certificate, trigger = await self.certify_text(active, prompt)
            certificates.append(certificate)
            if trigger is not None:
                concept_ids = trigger.refused
                break
        header = {"x-guard-certificate": ", ".join(c.header_value(label) for c, label in zip(certificates, labels))}
        trace.certificates += [certificate_body(c, label) for c, label in zip(certificates, labels)]
        last = certificates[-1]
        trace.ran("certify", "flagged" if last.flagged else "passed", (time.perf_counter() - started) * 1000)
        if not last.flagged:
            return header
        trace.flag(concept_ids)
        if last.trigger_erased_tokens == 0 and concept_ids:
            # The prompt itself names a refused concept: the guard's own refusal, as without certification.
            error = self.refuse(guard.policy, concept_ids, guard.refusal_message(concept_ids), user)
        else:
            # Harmful behind up to d extra tokens (an adversarial suffix, say), or caught only by the
            # harmful-request classifier of ``filter: both``: a prompt the guard's own check would pass.
            error = self.refuse(guard.policy, concept_ids, certify_refusal(last), user, stage="certify",
                                blocked=concept_ids or ["erase-and-check"])
        error.headers.update(header)
        raise error

    async def certify_text(self, active: ActiveGuard, text: str) -> tuple[Certificate, Verdict | None]:
        """erase-and-check one text (the policy must certify): its certificate and, when flagged, the guard's
        verdict on the flagged version (whose ``refused`` names the concepts behind it). Any fault is a 503."""
        certifier, guard = active.certifier, active.guard
        if certifier is None:
            raise ValueError("certify_text needs a policy with a certify: block")

        def run() -> tuple[Certificate, Verdict | None]:
            with self.metrics.guard_timer("certify"):
                certificate = certifier.certify(text)
            return certificate, guard.classify([certificate.trigger or ""]) if certificate.flagged else None

        try:
            return await to_thread.run_sync(run)
        except Exception as err:  # noqa: BLE001 - any certification fault fails closed, with its cause
            raise self.unavailable(guard.policy, err) from None

    @staticmethod
    def response(body: BaseModel, policy: Policy, flagged: Sequence[str],
                 headers: Mapping[str, str]) -> JSONResponse:
        """The JSON answer with the x-guard-* headers, then the endpoint's own ``headers``."""
        return JSONResponse(body.model_dump(), headers={**guard_headers(policy, flagged), **headers})


class TextServing(GuardedServing[SamplingRequestT]):
    """Base of chat and text completions: turns a validated request into guarded engine calls."""

    def __init__(self, context: ServerContext):
        super().__init__(context)
        self.engine = context.engine

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

    async def generate(self, guard: Guard, requests: list[TextRequest], trace: RequestTrace
                       ) -> list[GenerationResult]:
        """Guarded answers to the prompts of one HTTP request (concurrently, so the engine can batch them)."""
        try:
            results = await asyncio.gather(*(self.engine.generate(guard, request) for request in requests))
        except ConceptRefused as err:
            trace.ran("prompt", "refuse", err.ms)
            trace.flag(err.concept_ids)
            raise self.refuse(guard.policy, err.concept_ids, err.message, requests[0].user) from None
        except (GuardUnavailable, TokenPenaltyError) as err:
            raise self.unavailable(guard.policy, err) from None
        except OpenAIError:
            self.count("error")
            raise
        blocked = False
        for result in results:
            for choice in result.choices:
                self.metrics.regenerations.inc(choice.regenerations)
                if choice.finish_reason == "content_filter":
                    blocked = True
                    self.metrics.record_block(self.output_concepts(result, choice.index), stage="output")
        self.count("blocked_output" if blocked else "ok")
        self.record_generation(trace, results)
        return list(results)

    def record_generation(self, trace: RequestTrace, results: Sequence[GenerationResult]) -> None:
        """The prompt and output stages of answered requests, from what the engine's guard decided."""
        decisions = [r.prompt_decision for r in results if r.prompt_decision is not None]
        trace.ran("prompt", strongest(verdict_action(d.verdict) for d in decisions), sum(d.ms for d in decisions))
        outcomes, regenerations, ms = [], 0, 0.0
        for result in results:
            trace.flag(self.flagged(result))
            for choice in result.choices:
                decision = choice.output_decision
                regenerations += choice.regenerations
                ms += decision.ms if decision is not None else 0.0
                outcomes.append("block" if choice.finish_reason == "content_filter" else
                                "fallback" if decision is not None and decision.fallback else "send")
        result = strongest_result(outcomes, OUTPUT_RESULTS)
        trace.ran("output", result + (f" after {regenerations} regenerations" if regenerations else ""), ms)

    async def certified_stream(self, call: Call, request: TextRequest, certified: Sequence[str],
                               labels: Sequence[str]) -> tuple[EngineStream, dict[str, str]]:
        """Open the engine stream while erase-and-check runs beside the prompt check and prefill: the first token
        is ready when the certificate is, instead of after it. Nothing is released before the certificate passes:
        a flagged prompt (or one certification cannot judge) closes the stream and gets the same refusal as
        when certifying first, which also wins over the prompt check's own refusal."""
        certifying = asyncio.ensure_future(self.certify(call, certified, request.user, labels))
        try:
            stream = await self.open_stream(call.active.guard, request, call.trace)
        except BaseException:
            if not certifying.done():
                await asyncio.wait([certifying])
            if not certifying.cancelled() and certifying.exception() is not None:
                raise certifying.exception() from None
            raise
        try:
            return stream, await certifying
        except BaseException:
            await stream.aclose()
            raise

    async def open_stream(self, guard: Guard, request: TextRequest, trace: RequestTrace) -> EngineStream:
        try:
            stream = await self.engine.open_stream(guard, request)
        except ConceptRefused as err:
            trace.ran("prompt", "refuse", err.ms)
            trace.flag(err.concept_ids)
            raise self.refuse(guard.policy, err.concept_ids, err.message, request.user) from None
        except (GuardUnavailable, TokenPenaltyError) as err:
            raise self.unavailable(guard.policy, err) from None
        except OpenAIError:
            self.count("error")
            raise
        decision = stream.decision
        trace.ran("prompt", verdict_action(decision.verdict), decision.ms)
        trace.flag(decision.verdict.flagged)
        return stream

    def stream_response(self, guard: Guard, stream: EngineStream, writer: ChunkWriter, choices: int,
                        include_usage: bool, certificate: Mapping[str, str], trace: RequestTrace
                        ) -> StreamingResponse:
        """The SSE answer of an open stream, its output checked incrementally (:mod:`serving.streaming`)."""
        events = guarded_events(guard, stream, writer, choices, include_usage, self.metrics, self.count, trace)
        headers = {**guard_headers(guard.policy, stream.decision.verdict.flagged), **certificate,
                   "cache-control": "no-cache"}
        return StreamingResponse(events, media_type="text/event-stream", headers=headers)

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

    @staticmethod
    def fingerprint(guard: Guard) -> str:
        return f"guard-{guard.policy.fingerprint}"
