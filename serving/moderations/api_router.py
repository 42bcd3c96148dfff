"""FastAPI wiring of ``POST /v1/moderations``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.auth import Caller, caller
from serving.moderations.protocol import ModerationRequest, ModerationResponse
from serving.moderations.serving import ModerationServing

router = APIRouter()


async def moderation_serving(request: Request) -> ModerationServing:
    """The app's moderation handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.moderation_serving


@router.post("/v1/moderations", response_model=None,
             responses={200: {"model": ModerationResponse, "description": "One result per input."}})
async def create_moderation(body: ModerationRequest, handler: Annotated[ModerationServing, Depends(moderation_serving)],
                            who: Annotated[Caller, Depends(caller)]) -> JSONResponse:
    return await handler(body, who)
