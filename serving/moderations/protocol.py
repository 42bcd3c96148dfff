"""Wire models of ``/v1/moderations``: OpenAI's CreateModerationRequest/Response, categories = policy concepts."""

from __future__ import annotations

import uuid
from typing import Any, Literal

from pydantic import Field, field_validator

from serving.protocol import ConceptReport, OpenAIBaseModel, ResponseModel

# OpenAI's own categories: its schema (and SDK types) require them in every result. The guard judges only the
# policy's concepts, so these are reported unflagged with score 0 and no applied input type, unless a concept of
# the policy has the same id (the default policy's "self-harm"), which then fills it.
OPENAI_CATEGORIES = ("hate", "hate/threatening", "harassment", "harassment/threatening", "illicit",
                     "illicit/violent", "self-harm", "self-harm/intent", "self-harm/instructions", "sexual",
                     "sexual/minors", "violence", "violence/graphic")
# OpenAI's moderation model names, accepted as "this server's guard" so stock clients work unchanged.
OPENAI_MODERATION_MODELS = ("omni-moderation-latest", "omni-moderation-2024-09-26", "text-moderation-latest",
                            "text-moderation-stable")


class TextInput(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class ImageInput(OpenAIBaseModel):
    """Parsed so the error can name it, then refused: the text guard cannot judge an image."""

    model_config = {"extra": "allow"}
    type: Literal["image_url"]
    image_url: Any = None


class ModerationRequest(OpenAIBaseModel):
    input: str | list[str] | list[TextInput | ImageInput]
    model: str | None = None  # None, the policy's name or version tag, or one of OPENAI_MODERATION_MODELS

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: str | list[Any]) -> str | list[Any]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one input")
        return value

    def image_input(self) -> int | None:
        """The index of the first image input, or None."""
        if isinstance(self.input, str):
            return None
        return next((i for i, item in enumerate(self.input) if isinstance(item, ImageInput)), None)

    def texts(self) -> list[str]:
        """One text per result (call after :meth:`image_input` found none)."""
        if isinstance(self.input, str):
            return [self.input]
        return [item if isinstance(item, str) else item.text for item in self.input if not isinstance(item, ImageInput)]


class GuardDetails(ResponseModel):
    """The guard's own account of one input: every concept with its evidence, and erase-and-check's verdict."""

    policy: str  # name@fingerprint
    action: Literal["allow", "refuse", "steer", "log"]  # what a chat request with this text would meet
    language: str  # the input's languages, as in x-guard-language ("fr; uncovered=fr; action=refuse")
    concepts: list[ConceptReport]
    certificate: dict[str, Any] | None  # None: the policy has no certify block


class ModerationResult(ResponseModel):
    flagged: bool
    categories: dict[str, bool]
    category_scores: dict[str, float]
    category_applied_input_types: dict[str, list[Literal["text"]]]
    guard: GuardDetails


class ModerationResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"modr-{uuid.uuid4().hex}")
    model: str
    results: list[ModerationResult]
