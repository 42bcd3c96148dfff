"""FastAPI wiring of ``POST /v1/chat/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from serving.chat_completion.serving import ChatServing
from serving.streaming import completion_responses

router = APIRouter()


@router.post("/v1/chat/completions", response_model=None, responses=completion_responses(ChatCompletionResponse))
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    context = request.app.state.context
    started = time.perf_counter()
    try:
        return await ChatServing(context).create(body)
    finally:
        context.metrics.request_latency.labels(endpoint="chat").observe(time.perf_counter() - started)
