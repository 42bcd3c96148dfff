"""FastAPI wiring of ``POST /v1/completions``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.auth import Caller, caller
from serving.completion.protocol import CompletionRequest, CompletionResponse
from serving.completion.serving import CompletionServing
from serving.streaming import completion_responses

router = APIRouter()


async def completion_serving(request: Request) -> CompletionServing:
    """The app's text-completion handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.completion_serving


@router.post("/v1/completions", response_model=None, responses=completion_responses(CompletionResponse))
async def create_completion(body: CompletionRequest, handler: Annotated[CompletionServing, Depends(completion_serving)],
                            who: Annotated[Caller, Depends(caller)]) -> JSONResponse | StreamingResponse:
    return await handler(body, who)
