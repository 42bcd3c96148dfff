"""FastAPI wiring of ``POST /v1/images/generations``."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from serving.images.protocol import ImageGenerationRequest
from serving.images.serving import ImageServing

router = APIRouter()


@router.post("/v1/images/generations", response_model=None)
async def create_image(body: ImageGenerationRequest, request: Request) -> JSONResponse:
    context = request.app.state.context
    started = time.perf_counter()
    try:
        return await ImageServing(context).create(body)
    finally:
        context.metrics.request_latency.labels(endpoint="images").observe(time.perf_counter() - started)
