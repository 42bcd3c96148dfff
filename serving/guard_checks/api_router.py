"""FastAPI wiring of ``POST /v1/guard/checks``."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from serving.auth import Caller, caller
from serving.errors import admin_key_required
from serving.guard_checks.protocol import CheckRequest, CheckResponse
from serving.guard_checks.serving import CheckServing

router = APIRouter()


async def check_serving(request: Request) -> CheckServing:
    """The app's check handler, built once by :func:`serving.app.build_app`."""
    return request.app.state.check_serving


@router.post("/v1/guard/checks", response_model=None,
             responses={200: {"model": CheckResponse, "description": "What the guard would do, stage by stage."}})
async def create_check(body: CheckRequest, handler: Annotated[CheckServing, Depends(check_serving)],
                       who: Annotated[Caller, Depends(caller)]) -> JSONResponse:
    if body.policy is not None and not who.admin:
        raise admin_key_required("policy")  # judging by another policy is for the policy's authors only
    return await handler(body, who)
