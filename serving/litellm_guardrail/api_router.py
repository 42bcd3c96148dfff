"""FastAPI wiring of ``POST /beta/litellm_basic_guardrail_api`` (the path LiteLLM appends to ``api_base``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.auth import Caller, caller
from serving.litellm_guardrail.protocol import GuardrailRequest, GuardrailResponse
from serving.litellm_guardrail.serving import LiteLLMGuardrailServing

router = APIRouter()


async def guardrail_serving(request: Request) -> LiteLLMGuardrailServing:
    """The app's LiteLLM guardrail handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.litellm_guardrail_serving


@router.post("/beta/litellm_basic_guardrail_api", response_model=None,
             responses={200: {"model": GuardrailResponse, "description": "Go on, block, or go on with new texts."}})
async def apply_guardrail(body: GuardrailRequest,
                          handler: Annotated[LiteLLMGuardrailServing, Depends(guardrail_serving)],
                          who: Annotated[Caller, Depends(caller)]) -> JSONResponse:
    return await handler(body, who)
