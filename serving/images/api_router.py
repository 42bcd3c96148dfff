"""FastAPI wiring of ``POST /v1/images/generations``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.auth import Caller, caller
from serving.images.protocol import ImageGenerationRequest
from serving.images.serving import ImageServing

router = APIRouter()


async def image_serving(request: Request) -> ImageServing:
    """The app's image handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.image_serving


@router.post("/v1/images/generations", response_model=None)
async def create_image(body: ImageGenerationRequest, handler: Annotated[ImageServing, Depends(image_serving)],
                       who: Annotated[Caller, Depends(caller)]) -> JSONResponse:
    return await handler(body, who)
