"""LiteLLM's generic guardrail API over the check-only core of ``/v1/guard/checks``.

A LiteLLM proxy with ``guardrail: generic_guardrail_api`` posts the request's texts before the call
(``pre_call``) and the answer's texts after it (``post_call``). Before the call the chat (``structured_messages``)
or the texts go through the prompt check and erase-and-check exactly as ``/v1/guard/checks`` runs them, and a
request the policy refuses is ``BLOCKED`` with the policy's message. After the call each answer text goes through
the output check: a leak is ``BLOCKED`` (LiteLLM cannot regenerate, so what the server would regenerate is
blocked here), or, where the leaked concepts have an ``action.fallback``, the text is replaced by it
(``GUARDRAIL_INTERVENED``). Steered concepts cannot be erased while another server decodes, so on this path they
are caught by the output check. Images, tool calls and a guard that cannot run are errors (400, 503), which
LiteLLM's default ``fail_on_error: true`` turns into a blocked call: never an unchecked pass.
"""

from __future__ import annotations

from fastapi.responses import JSONResponse

from guard.decision import OutputAction
from serving.chat_completion.protocol import ChatMessage
from serving.errors import unsupported_parameter
from serving.guard_checks.protocol import CheckRequest
from serving.guard_checks.serving import CheckServing
from serving.guard_state import ActiveGuard
from serving.litellm_guardrail.protocol import GuardrailRequest, GuardrailResponse
from serving.serving_base import GuardedServing, ServerContext


class LiteLLMGuardrailServing(GuardedServing[GuardrailRequest]):
    endpoint = "litellm_guardrail"

    def __init__(self, context: ServerContext, checks: CheckServing):
        super().__init__(context)
        self.checks = checks

    async def create(self, request: GuardrailRequest) -> JSONResponse:
        for param in ("images", "tool_calls"):
            if getattr(request, param):
                raise self.invalid(unsupported_parameter(param, "the guard judges text only"))
        active = self.context.guard_state.active
        if request.input_type == "request":
            answer = await self._before_call(request, active)
        else:
            answer = await self._after_call(request.texts or [], active)
        self.count("blocked" if answer.action == "BLOCKED" else "ok")
        return self.response(answer, active.guard.policy, [], {})

    def _prompt(self, request: GuardrailRequest) -> CheckRequest:
        if request.structured_messages:
            try:
                messages = [ChatMessage.model_validate(m) for m in request.structured_messages]
            except ValueError as err:
                raise self.invalid(unsupported_parameter("structured_messages", str(err).splitlines()[0])) from None
            return CheckRequest(messages=messages)
        return CheckRequest(input="\n".join(request.texts or []))

    async def _before_call(self, request: GuardrailRequest, active: ActiveGuard) -> GuardrailResponse:
        body = (await self.checks.judge(self._prompt(request), active)).body
        if body.action == "refuse":
            return GuardrailResponse(action="BLOCKED", blocked_reason=body.message, guard=body.model_dump())
        return GuardrailResponse(action="NONE", guard=body.model_dump())

    async def _after_call(self, texts: list[str], active: ActiveGuard) -> GuardrailResponse:
        judgements = [await self.checks.judge(CheckRequest(output=text), active) for text in texts]
        details = {"texts": [j.body.model_dump() for j in judgements]}
        replaced = list(texts)
        for index, judgement in enumerate(judgements):
            decision = judgement.output
            if decision is None or decision.action == OutputAction.send:
                continue
            if not decision.fallback:
                reason = decision.message or active.guard.refusal_message(decision.leaked)
                return GuardrailResponse(action="BLOCKED", blocked_reason=reason, guard=details)
            replaced[index] = decision.message
        if replaced != texts:
            return GuardrailResponse(action="GUARDRAIL_INTERVENED", texts=replaced, guard=details)
        return GuardrailResponse(action="NONE", guard=details)

