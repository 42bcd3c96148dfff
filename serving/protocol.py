"""Request/response models shared by the OpenAI endpoints (the per-endpoint ones live beside their routes).

Requests forbid unknown fields and carry every known OpenAI field we do not implement as ``Any``, so
:meth:`SamplingRequest.unsupported` can answer 400 naming the parameter instead of silently ignoring it —
a dropped ``tools`` or ``response_format`` would give the client an answer it did not ask for.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP_SEQUENCES = 4


class OpenAIBaseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    """Responses tolerate extra keys so upstream fields we do not model are not lost on the way through."""

    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


# Known OpenAI parameters this server does not implement, with the values that ask for nothing (accepted).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "store": (None, False),
    "metadata": (None, {}),
    "reasoning_effort": (None,),
    "service_tier": (None, "auto", "default"),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
    "web_search_options": (None,),
    "echo": (None, False),
    "best_of": (None, 1),
    "suffix": (None, ""),
}


class SamplingRequest(OpenAIBaseModel):
    """Fields common to chat and text completions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    # vLLM's per-request engine arguments: only the guard may set them (they switch its processor), so a
    # client's are removed before the request reaches any engine.
    vllm_xargs: dict[str, Any] | None = None

    logprobs: Any = None
    presence_penalty: Any = None
    frequency_penalty: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if isinstance(value, list) and any(not s for s in value):
            raise ValueError("stop sequences must not be empty")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.strip().lstrip("-").isdigit() or int(token) < 0:
                raise ValueError(f"keys must be token ids, got '{token}'")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias for token {token} must be between -100 and 100, got {bias}")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def end_user(self) -> str | None:
        return self.user or self.safety_identifier

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def client_logit_bias(self) -> dict[int, float]:
        return {int(token): float(bias) for token, bias in (self.logit_bias or {}).items()}

    def unsupported(self) -> tuple[str, str] | None:
        """The first parameter set to something this server cannot honour, with why, or None."""
        for name, neutral in NEUTRAL_VALUES.items():
            if name in type(self).model_fields and getattr(self, name) not in neutral:
                return name, ""
        return None


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "erasure-guard"


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


GuardAction = Literal["allow", "refuse", "steer", "log"]


class ConceptReport(ResponseModel):
    """One concept's strongest evidence and what the guard does about it (``allow`` when it is not flagged)."""

    id: str
    flagged: bool
    score: float
    threshold: float
    detector: str  # "alias", "semantic", ...
    evidence: str
    action: GuardAction
    stage: Literal["prompt", "certify", "output"]
