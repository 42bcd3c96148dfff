"""Guarded moderation: OpenAI's ``/v1/moderations`` answered by the active policy's detectors, without generating.

Each input is classified on its own (one result per input) and, when the policy has a ``certify:`` block,
erase-and-check certified; a text that certification flags is ``flagged`` even where no concept names it (an
adversarial suffix). Nothing is refused with 400 here — answering "flagged" is the endpoint's job — but a guard
that cannot run is a 503 like everywhere else, never an unflagged guess.
"""

from __future__ import annotations

import time

from fastapi.responses import JSONResponse

from guard.decision import Verdict
from guard.policy import Policy
from serving.errors import OpenAIError, unsupported_parameter
from serving.guard_state import ActiveGuard
from serving.moderations.protocol import (
    OPENAI_CATEGORIES,
    OPENAI_MODERATION_MODELS,
    GuardDetails,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
)
from serving.reports import certificate_body, prompt_reports, strongest, verdict_action
from serving.serving_base import Call, GuardedServing


class ModerationServing(GuardedServing[ModerationRequest]):
    endpoint = "moderations"
    stages = ("prompt", "certify")

    def _check_model(self, model: str | None, policy: Policy) -> None:
        """The one moderation model here is the guard: accept its names and OpenAI's, 404 anything else."""
        if model is not None and model not in (policy.name, policy.version_tag, *OPENAI_MODERATION_MODELS):
            raise self.invalid(OpenAIError(
                404, f"The model '{model}' does not exist; this server moderates with its guard policy "
                     f"'{policy.version_tag}' (also accepted: '{policy.name}', {', '.join(OPENAI_MODERATION_MODELS)}).",
                param="model", code="model_not_found"))

    async def create(self, request: ModerationRequest, call: Call) -> JSONResponse:
        active, trace = call.active, call.trace
        policy = active.guard.policy
        self._check_model(request.model, policy)
        if (index := request.image_input()) is not None:
            raise self.invalid(unsupported_parameter(f"input[{index}]", "only text inputs are moderated"))
        texts = request.texts()
        self.check_length(texts, "input")
        self.language_of(active.guard, texts, trace)  # the request's languages, for the decision log
        started = time.perf_counter()
        verdicts = await self._classify(active, texts)
        trace.ran("prompt", strongest(verdict_action(v) for v in verdicts), (time.perf_counter() - started) * 1000)
        labels = ["input"] if isinstance(request.input, str) else [f"input[{i}]" for i in range(len(texts))]
        started = time.perf_counter()
        results = [await self._result(active, text, verdict, label)
                   for text, verdict, label in zip(texts, verdicts, labels)]
        certificates = [r.guard.certificate for r in results if r.guard.certificate is not None]
        if active.certifier is None:
            trace.skipped("certify", "policy has no certify block")
        else:
            trace.ran("certify", "flagged" if any(c["flagged"] for c in certificates) else "passed",
                      (time.perf_counter() - started) * 1000)
        self.count("flagged" if any(r.flagged for r in results) else "ok")
        flagged = [c.id for r in results for c in r.guard.concepts if c.flagged]
        trace.flag(flagged)
        trace.certificates += certificates
        trace.action = strongest(r.guard.action for r in results)
        return self.response(ModerationResponse(model=policy.version_tag, results=results), policy, flagged, {})

    async def _classify(self, active: ActiveGuard, texts: list[str]) -> list[Verdict]:
        """One verdict per input, each judged alone (as if each were the whole request)."""
        guard = active.guard

        def run() -> list[Verdict]:
            with self.metrics.guard_timer("prompt"):
                return [guard.classify_prompt([text]) for text in texts]

        return await self.run_check(guard.policy, run)

    async def _result(self, active: ActiveGuard, text: str, verdict: Verdict, label: str) -> ModerationResult:
        """One input's result; ``label`` names it in the certificate (``input``, ``input[2]``)."""
        policy = active.guard.policy
        concepts = prompt_reports(policy, verdict.classification)
        certificate = None
        if active.certifier is not None:
            cert, trigger = await self.certify_text(active, text)
            certificate = certificate_body(cert, label)
            if trigger is not None:
                concepts += [c for c in prompt_reports(policy, trigger.classification, "certify") if c.flagged]
        language = self.language_of(active.guard, [text], None)
        flagged_ids = {c.id for c in concepts if c.flagged}
        scores = {c.id: c.score for c in concepts if c.stage == "prompt"}
        concept_ids = [c.id for c in policy.concepts]
        categories = {name: False for name in OPENAI_CATEGORIES} | {cid: cid in flagged_ids for cid in concept_ids}
        category_scores = ({name: 0.0 for name in OPENAI_CATEGORIES}
                           | {cid: scores.get(cid, 0.0) for cid in concept_ids})
        applied = {name: [] for name in OPENAI_CATEGORIES} | {cid: ["text"] for cid in concept_ids}
        certified_flagged = certificate is not None and certificate["flagged"]
        refused_language = language.refusal_message is not None
        action = strongest([c.action for c in concepts] + (["refuse"] if certified_flagged or refused_language else []))
        return ModerationResult(
            flagged=bool(flagged_ids) or certified_flagged or refused_language, categories=categories, category_scores=category_scores,
            category_applied_input_types=applied,
            guard=GuardDetails(policy=policy.version_tag, action=action, language=language.header_value(),
                               concepts=concepts, certificate=certificate))
