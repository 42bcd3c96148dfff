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
from guard.text.generation import message_text
from serving.chat_completion.protocol import ChatMessage, ToolCall
from serving.decisions import RequestTrace, strongest_result
from serving.errors import unsupported_parameter
from serving.guard_checks.protocol import CheckRequest
from serving.guard_checks.serving import CheckServing
from serving.guard_state import ActiveGuard
from serving.litellm_guardrail.protocol import GuardrailRequest, GuardrailResponse
from serving.serving_base import Call, GuardedServing, ServerContext


class LiteLLMGuardrailServing(GuardedServing[GuardrailRequest]):
    endpoint = "litellm_guardrail"
    stages = ("prompt", "certify", "output")

    def __init__(self, context: ServerContext, checks: CheckServing):
        super().__init__(context)
        self.checks = checks

    async def create(self, request: GuardrailRequest, call: Call) -> JSONResponse:
        if request.images:
            raise self.invalid(unsupported_parameter("images", "the guard judges text only"))
        active = call.active
        if request.input_type == "request":
            answer = await self._before_call(request, active, call.trace)
        else:
            answer = await self._after_call(request.texts or [], active, call.trace, self._tool_call_texts(request))
        self.count("blocked" if answer.action == "BLOCKED" else "ok")
        return self.response(answer, active.guard.policy, [], {})

    def _text_trace(self, trace: RequestTrace) -> RequestTrace:
        """A trace for one answer text of an after-call check (the call's own trace records them together)."""
        return RequestTrace(self.endpoint, self.stages, request_id=trace.request_id, key_id=trace.key_id)

    def _tool_call_texts(self, request: GuardrailRequest) -> list[str]:
        """Each tool call as ``name(arguments)``: what the model wrote into it is judged like its text."""
        try:
            calls = [ToolCall.model_validate(call) for call in request.tool_calls or ()]
        except ValueError as err:
            raise self.invalid(unsupported_parameter("tool_calls", str(err).splitlines()[0])) from None
        return [message_text({"tool_calls": [call.model_dump()]}) for call in calls]

    def _prompt(self, request: GuardrailRequest) -> CheckRequest:
        if request.structured_messages:
            try:
                messages = [ChatMessage.model_validate(m) for m in request.structured_messages]
            except ValueError as err:
                raise self.invalid(unsupported_parameter("structured_messages", str(err).splitlines()[0])) from None
            return CheckRequest(messages=messages)
        return CheckRequest(input="\n".join([*(request.texts or []), *self._tool_call_texts(request)]))

    async def _before_call(self, request: GuardrailRequest, active: ActiveGuard,
                           trace: RequestTrace) -> GuardrailResponse:
        body = (await self.checks.judge(self._prompt(request), active, trace)).body
        if body.action == "refuse":
            return GuardrailResponse(action="BLOCKED", blocked_reason=body.message, guard=body.model_dump())
        return GuardrailResponse(action="NONE", guard=body.model_dump())

    async def _after_call(self, texts: list[str], active: ActiveGuard, trace: RequestTrace,
                          tool_calls: list[str]) -> GuardrailResponse:
        """Judge each answer text and each tool call; a leaking tool call is blocked (a fallback cannot replace it)."""
        judgements = [await self.checks.judge(CheckRequest(output=text), active, self._text_trace(trace))
                      for text in [*texts, *tool_calls]]
        outputs = [stage for j in judgements for stage in j.body.stages if stage.name == "output" and stage.ran]
        if outputs:  # one output stage for the call: the most severe text's result, every text's time
            trace.ran("output", strongest_result((s.result or "send" for s in outputs),
                                                    tuple(a.value for a in OutputAction)),
                      sum(s.ms for s in outputs))
        trace.skipped("prompt", "after the call: only the answer is judged")
        trace.skipped("certify", "after the call: only the answer is judged")
        details = {"texts": [j.body.model_dump() for j in judgements]}
        replaced = list(texts)
        for index, judgement in enumerate(judgements):
            decision = judgement.output
            if decision is None or decision.action == OutputAction.send:
                continue
            if not decision.fallback or index >= len(texts):
                reason = decision.message or active.guard.refusal_message(decision.leaked)
                return GuardrailResponse(action="BLOCKED", blocked_reason=reason, guard=details)
            replaced[index] = decision.message
        if replaced != texts:
            return GuardrailResponse(action="GUARDRAIL_INTERVENED", texts=replaced, guard=details)
        return GuardrailResponse(action="NONE", guard=details)

