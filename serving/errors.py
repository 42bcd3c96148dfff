"""OpenAI-shaped errors: the only way the server says no.

Every failure leaves as ``{"error": {"message", "type", "param", "code"}}`` with a status the official SDKs
understand: policy blocks are 400 (the SDK never retries them, so a forbidden prompt is not re-sent) and a
guard that cannot run is 503 (fail closed — never an unguarded answer).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("serving")


class OpenAIError(Exception):
    """An error response; raise it anywhere below a route and the handler renders it."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)

    def sse_frame(self) -> bytes:
        """The in-stream form, for failures after the 200 headers are out (the SDK raises APIError on it)."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


def unsupported_parameter(param: str, detail: str = "") -> OpenAIError:
    message = f"'{param}' is not supported by this server" + (f": {detail}" if detail else ".")
    return OpenAIError(400, message, param=param, code="unsupported_parameter")


def policy_violation(concept_ids: Sequence[str], message: str) -> OpenAIError:
    """A refused prompt. The concept ids are in the message so clients can see what matched."""
    text = message if all(cid in message for cid in concept_ids) else f"{message} [concepts: {', '.join(concept_ids)}]"
    return OpenAIError(400, text, param=None, code="content_policy_violation")


def guard_unavailable(detail: str) -> OpenAIError:
    # 503 + Retry-After: the SDK retries, which is right for a transient detector failure.
    return OpenAIError(503, f"The guard could not check this request, so it was not answered ({detail}).",
                       type="server_error", code="guard_unavailable", headers={"retry-after": "1"})


def invalid_api_key() -> OpenAIError:
    return OpenAIError(401, "Incorrect or missing API key. Send it as 'Authorization: Bearer <key>'.",
                       code="invalid_api_key", headers={"www-authenticate": "Bearer"})


def queue_full(limit: int, retry_after_s: int) -> OpenAIError:
    # 429 + Retry-After in OpenAI's rate-limit shape: the SDKs wait that long and retry (max_retries, default 2).
    return OpenAIError(429, f"The server is busy: {limit} requests are already being answered or waiting "
                            f"(--max-queue {limit}). Retry after {retry_after_s} s.", type="requests",
                       code="rate_limit_exceeded", headers={"retry-after": str(retry_after_s)})


def admin_key_required(param: str) -> OpenAIError:
    return OpenAIError(403, f"'{param}' needs an admin API key (--admin-api-key).", param=param,
                       code="admin_key_required")


def model_not_found(model: str, served: str) -> OpenAIError:
    return OpenAIError(404, f"The model '{model}' does not exist; this server serves '{served}'.", param="model",
                       code="model_not_found")


def request_too_large(limit: int) -> OpenAIError:
    return OpenAIError(413, f"The request body is larger than this server accepts ({limit} bytes).",
                       code="request_too_large")


def upstream_error(detail: str) -> OpenAIError:
    return OpenAIError(502, f"The upstream model server failed: {detail}", type="server_error", code="upstream_error")


def upstream_timeout(timeout_s: float) -> OpenAIError:
    # 504, not 502: the upstream may still be working; a client can retry with a smaller request.
    return OpenAIError(504, f"The upstream model server did not answer within {timeout_s:g} s.", type="server_error",
                       code="upstream_timeout")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    """The OpenAI error object, as documented in /openapi.json for every status the server can answer with."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description} for status, description in (
        (400, "Invalid request, or a prompt the policy refuses (code content_policy_violation)."),
        (401, "Missing or wrong API key."),
        (403, "The request needs an admin API key (an inline policy)."),
        (404, "Unknown model or route."),
        (405, "Method not allowed."),
        (413, "Request body over --max-request-bytes."),
        (429, "The server's queue is full (--max-queue; Retry-After says when to retry), or the upstream is "
               "rate limiting."),
        (500, "Internal error."),
        (502, "The upstream model server failed."),
        (503, "The guard could not run: the request was not answered (fail closed)."),
        (504, "The upstream model server timed out."),
    )}


def _param_of(location: Sequence[Any]) -> str | None:
    """``("body", "messages", 0, "content")`` → ``"messages[0].content"``."""
    parts = [p for p in location if p != "body"]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def validation_error(err: RequestValidationError) -> OpenAIError:
    first = err.errors()[0]
    if first["type"] == "json_invalid":
        reason = first.get("ctx", {}).get("error", "parse error")
        return invalid_request(f"The request body is not valid JSON ({reason}).", code="invalid_json")
    param = _param_of(first["loc"])
    if first["type"] == "extra_forbidden":
        return invalid_request(f"Unrecognized request argument supplied: {param}", param=param,
                               code="unknown_parameter")
    if first["type"] == "missing":
        return invalid_request(f"Missing required parameter: '{param}'.", param=param,
                               code="missing_required_parameter")
    message = first["msg"].removeprefix("Value error, ")
    return invalid_request(f"Invalid value for '{param}': {message}" if param else message, param=param,
                           code="invalid_value")


def install_handlers(app: FastAPI) -> None:
    """Render every error path — ours, validation, routing — as an OpenAI error object."""

    @app.exception_handler(OpenAIError)
    async def _openai_error(_: Request, err: OpenAIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, err: RequestValidationError) -> JSONResponse:
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
        error = OpenAIError(err.status_code, str(err.detail), code=codes.get(err.status_code))
        return error.response()

    @app.exception_handler(Exception)
    async def _bug(_: Request, err: Exception) -> JSONResponse:
        logger.exception("unhandled error while serving a request", exc_info=err)
        error = OpenAIError(500, "The server hit an internal error.", type="server_error", code="internal_error")
        return error.response()
