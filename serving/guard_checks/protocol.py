"""Wire models of ``/v1/guard/checks``: what the guard would do with a request (and an answer), and why."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from serving.chat_completion.protocol import ChatMessage
from serving.decisions import Stage
from serving.protocol import ConceptReport, GuardAction, OpenAIBaseModel, ResponseModel


class CheckRequest(OpenAIBaseModel):
    """A chat (``messages``) or a raw prompt (``input``), at most one; ``output``: an answer to check as well (or
    alone); ``policy``: an inline policy (YAML text) to judge by instead of the server's, for admin keys only."""

    messages: list[ChatMessage] | None = Field(None, min_length=1)
    input: str | None = None
    output: str | None = None
    policy: str | None = None

    @model_validator(mode="after")
    def _one_prompt(self) -> "CheckRequest":
        if self.messages is not None and self.input is not None:
            raise ValueError("give exactly one of 'messages' and 'input' (or only 'output')")
        if self.messages is None and self.input is None and self.output is None:
            raise ValueError("give exactly one of 'messages' and 'input', or an 'output' to judge alone")
        return self


class CheckResponse(ResponseModel):
    flagged: bool  # any concept flagged at any stage, or erase-and-check flagged the prompt
    action: GuardAction  # what the request (with this output) would meet: the most severe stage outcome
    message: str | None  # the refusal a client would get, when the action is "refuse"
    policy: str  # name@fingerprint
    language: str | None = None  # the languages of the checked prompt, as in x-guard-language (None: no prompt)
    concepts: list[ConceptReport]
    certificate: dict[str, Any] | None
    stages: list[Stage]  # the request's trace: the same records the decision log writes
