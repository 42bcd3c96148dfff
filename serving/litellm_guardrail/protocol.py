"""Wire models of LiteLLM's generic guardrail API, as its ``generic_guardrail_api`` guardrail sends and reads them.

LiteLLM owns this contract and adds fields over time, so requests ignore keys they do not model (unlike the
OpenAI routes, which refuse unknown parameters): a newer LiteLLM must not break the guard.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict

from serving.protocol import OpenAIBaseModel, ResponseModel


class GuardrailRequest(OpenAIBaseModel):
    """What LiteLLM sends before the call (``input_type: request``) and after it (``response``)."""

    model_config = ConfigDict(extra="ignore")

    input_type: Literal["request", "response"]
    texts: list[str] | None = None  # the request's message texts, or the answer's choice texts
    structured_messages: list[dict[str, Any]] | None = None  # the chat, on requests to chat endpoints
    images: list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    model: str | None = None
    litellm_call_id: str | None = None
    additional_provider_specific_params: dict[str, Any] | None = None


class GuardrailResponse(ResponseModel):
    """``NONE``: go on unchanged; ``BLOCKED``: LiteLLM raises and its client gets an error with ``blocked_reason``;
    ``GUARDRAIL_INTERVENED``: go on with ``texts`` instead of the original texts."""

    action: Literal["NONE", "BLOCKED", "GUARDRAIL_INTERVENED"]
    blocked_reason: str | None = None
    texts: list[str] | None = None
    guard: dict[str, Any]  # the /v1/guard/checks answer behind the decision (one per text for responses)
