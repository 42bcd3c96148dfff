"""FastAPI wiring of ``POST /v1/chat/completions``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.auth import Caller, caller
from serving.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.chat_completion.serving import ChatServing
from serving.streaming import completion_responses

router = APIRouter()


async def chat_serving(request: Request) -> ChatServing:
    """The app's chat handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.chat_serving


@router.post("/v1/chat/completions", response_model=None, responses=completion_responses(ChatCompletionResponse))
async def create_chat_completion(body: ChatCompletionRequest, handler: Annotated[ChatServing, Depends(chat_serving)],
                                 who: Annotated[Caller, Depends(caller)]) -> JSONResponse | StreamingResponse:
    return await handler(body, who)
