"""Check-only guarding: every stage a chat or completion request would pass, run without generating.

The prompt is classified as the chat and completion endpoints classify it (every message), certified as they
certify it (the policy's ``certify.scope``), and a given ``output`` is judged by the same output check as a
generated answer (an output given alone is judged without a prompt). Every stage runs even after an earlier one
refused, so the answer explains all of it; a stage that does not run says why. A guard that cannot run is a 503
(fail closed), as on every endpoint. An admin key may send its own policy inline: a draft judged exactly as the
server would judge it once active, without touching the server's policy.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, TypeVar

from anyio import to_thread
from fastapi.responses import JSONResponse

from detectors.base import Classification
from guard.decision import OutputAction, OutputDecision, Verdict
from guard.errors import GuardUnavailable, PolicyError
from guard.policy import load_inline_policy
from guard.text.generation import TextRequest
from serving.chat_completion.protocol import plain_messages, unsupported_message
from serving.chat_completion.serving import ChatServing
from serving.decisions import RequestTrace
from serving.errors import invalid_request, policy_violation, unsupported_parameter
from serving.guard_checks.protocol import CheckRequest, CheckResponse
from serving.guard_state import ActiveGuard
from serving.metrics import ServerMetrics
from serving.protocol import ConceptReport, GuardAction
from serving.reports import certificate_body, output_reports, prompt_reports, strongest
from serving.serving_base import Call, GuardedServing, certify_refusal

T = TypeVar("T")


async def timed(call: Callable[[], Awaitable[T]]) -> tuple[T, float]:
    """``call``'s result and its milliseconds."""
    start = time.perf_counter()
    result = await call()
    return result, (time.perf_counter() - start) * 1000


@dataclass(frozen=True)
class Judgement:
    """A check's answer, and the output decision behind its output stage (None: no output given)."""

    body: CheckResponse
    output: OutputDecision | None


class CheckServing(GuardedServing[CheckRequest]):
    endpoint = "checks"
    stages = ("prompt", "certify", "output")

    def _prompt(self, request: CheckRequest, active: ActiveGuard) -> tuple[str, list[str], list[str], list[str]]:
        """The parameter name, the texts the prompt check reads, and what erase-and-check certifies (with labels)."""
        if request.input is not None:
            return "input", [request.input], [request.input], ["input"]
        if request.messages is None:
            return "output", [], [], []  # an answer judged alone
        if (unreadable := unsupported_message(request.messages, verb="checked")) is not None:
            raise self.invalid(unsupported_parameter(*unreadable))
        chat = TextRequest(messages=plain_messages(request.messages))
        certified, labels = ChatServing.certified_text(active.guard.policy, chat)
        return "messages", chat.guard_texts, certified, labels

    async def active_for(self, request: CheckRequest, call: Call) -> ActiveGuard:
        """The key's active guard, or one built for the request's inline policy (400 naming its line)."""
        if request.policy is None:
            return call.active
        try:
            policy = await to_thread.run_sync(load_inline_policy, request.policy)
            # Its own metrics, dropped with it: a draft's concept ids must not become labels of the served ones.
            return await to_thread.run_sync(ActiveGuard.build, policy, ServerMetrics())
        except PolicyError as err:
            where = f"line {err.line}" if err.line is not None else "policy"
            raise self.invalid(invalid_request(f"inline policy, {where}{f' {err.field}' if err.field else ''}: "
                                               f"{err.message}", "policy", code="invalid_policy")) from None
        except GuardUnavailable as err:
            raise self.unavailable(call.active.guard.policy, err) from None

    async def create(self, request: CheckRequest, call: Call) -> JSONResponse:
        active = await self.active_for(request, call)
        call.trace.policy = active.guard.policy.version_tag
        body = (await self.judge(request, active, call.trace)).body
        self.count("flagged" if body.flagged else "ok")
        return self.response(body, active.guard.policy, [c.id for c in body.concepts if c.flagged], {})

    async def judge(self, request: CheckRequest, active: ActiveGuard, trace: RequestTrace) -> Judgement:
        """Every stage ``request`` would pass under ``active``, recorded in ``trace``; the core of this endpoint
        and of LiteLLM's."""
        guard = active.guard
        policy = guard.policy
        param, texts, certified, labels = self._prompt(request, active)
        self.check_length(texts, param)
        if request.output is not None:
            self.check_length([request.output], "output")

        concepts: list[ConceptReport] = []
        actions: list[GuardAction] = []
        refusals: list[str] = []
        language = self.language_of(guard, texts, trace) if texts else None
        language_refusal = language.refusal_message if language is not None else None
        if language_refusal is not None:
            actions.append("refuse")
        if texts:
            verdict, prompt_ms = await timed(lambda: self.run_check(policy, lambda: guard.classify_prompt(texts)))
            concepts += prompt_reports(policy, verdict.classification)
            prompt_action = strongest(c.action for c in concepts)
            trace.ran("prompt", prompt_action, prompt_ms)
            actions.append(prompt_action)
            if verdict.refused:
                refusals.append(policy_violation(verdict.refused, guard.refusal_message(verdict.refused)).message)
            certificate, certify_concepts, certify_message = await self._certify(active, certified, labels, trace)
        else:
            verdict = Verdict(Classification([]))  # nothing to classify: no prompt concepts
            trace.skipped("prompt", "no prompt given")
            trace.skipped("certify", "no prompt given")
            certificate, certify_concepts, certify_message = None, [], None
        concepts += certify_concepts
        if certify_message is not None:
            actions.append("refuse")

        decision: OutputDecision | None = None
        if request.output is None:
            trace.skipped("output", "no output given")
        else:
            output = request.output
            decision, output_ms = await timed(lambda: self.run_check(
                policy, lambda: guard.check_output(output, guard.prompt_decision(verdict))))
            rows = output_reports(policy, decision)
            concepts += rows
            actions.append(strongest(c.action for c in rows))
            if decision.action == OutputAction.block:
                refusals.append(decision.message)
            trace.ran("output", decision.action.value, output_ms)

        action = strongest(actions)
        flagged = (any(c.flagged for c in concepts) or bool(certificate and certificate["flagged"])
                   or language_refusal is not None)
        # What a client would read: the first refusal in the order the pipeline runs (language, certify, prompt,
        # output).
        refusals = [m for m in (language_refusal, certify_message) if m] + refusals
        message = refusals[0] if action == "refuse" and refusals else None
        trace.action = action
        trace.flag(c.id for c in concepts if c.flagged)
        trace.certificates += [certificate] if certificate is not None else []
        body = CheckResponse(flagged=flagged, action=action, message=message, policy=policy.version_tag,
                             language=language.header_value() if language else None, concepts=concepts,
                             certificate=certificate, stages=trace.stages)
        return Judgement(body, decision)

    async def _certify(self, active: ActiveGuard, texts: list[str], labels: list[str], trace: RequestTrace
                       ) -> tuple[dict[str, Any] | None, list[ConceptReport], str | None]:
        """The certify stage (recorded in ``trace``): the certificate, the concepts behind a flag and the refusal
        it gives."""
        if active.certifier is None:
            trace.skipped("certify", "policy has no certify block")
            return None, [], None
        guard = active.guard
        start = time.perf_counter()
        certificate: dict[str, Any] | None = None
        for text, label in zip(texts, labels):
            cert, trigger = await self.certify_text(active, text)
            certificate = certificate_body(cert, label)
            if trigger is not None:
                named = cert.trigger_erased_tokens == 0 and bool(trigger.refused)
                message = guard.refusal_message(trigger.refused) if named else certify_refusal(cert)
                concepts = [c for c in prompt_reports(guard.policy, trigger.classification, "certify") if c.flagged]
                trace.ran("certify", "flagged", (time.perf_counter() - start) * 1000)
                return certificate, concepts, policy_violation(trigger.refused, message).message
        trace.ran("certify", "passed", (time.perf_counter() - start) * 1000)
        return certificate, [], None
