"""Wire models of ``/v1/completions`` (legacy text completions)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field

from serving.protocol import ResponseModel, SamplingRequest, Usage

# OpenAI's default for this endpoint: a completion request without max_tokens gets 16 tokens.
DEFAULT_COMPLETION_TOKENS = 16


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(DEFAULT_COMPLETION_TOKENS, ge=1)

    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and any(not isinstance(p, str) for p in self.prompt):
            return "prompt", "token-id prompts are not supported; send text"
        return super().unsupported()

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else [p for p in self.prompt if isinstance(p, str)]


class CompletionChoice(ResponseModel):
    index: int
    text: str
    finish_reason: Literal["stop", "length", "content_filter"] | None
    logprobs: None = None


class CompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
