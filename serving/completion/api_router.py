"""FastAPI wiring of ``POST /v1/completions``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.completion.protocol import CompletionRequest, CompletionResponse
from serving.completion.serving import CompletionServing
from serving.streaming import completion_responses

router = APIRouter()


@router.post("/v1/completions", response_model=None, responses=completion_responses(CompletionResponse))
async def create_completion(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    context = request.app.state.context
    started = time.perf_counter()
    try:
        return await CompletionServing(context).create(body)
    finally:
        context.metrics.request_latency.labels(endpoint="completions").observe(time.perf_counter() - started)
