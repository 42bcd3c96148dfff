"""Wire models of ``/v1/chat/completions`` (the subset of the OpenAI schema this server honours)."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import Field, model_validator

from serving.protocol import OpenAIBaseModel, ResponseModel, SamplingRequest, Usage


class TextPart(OpenAIBaseModel):
    type: Literal["text"]
    text: str


class OtherPart(OpenAIBaseModel):
    """Image, audio or file parts: parsed so the error can name them, then refused (text-only models)."""

    model_config = {"extra": "allow"}
    type: Literal["image_url", "input_audio", "file", "refusal"]


class ToolCallFunction(OpenAIBaseModel):
    name: str
    arguments: str  # JSON text, as the model wrote it


class ToolCall(OpenAIBaseModel):
    """A tool call of an earlier assistant turn: the model conditions on its name and arguments, so both are checked."""

    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(OpenAIBaseModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | OtherPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        if self.role != "tool" and self.tool_call_id is not None:
            raise ValueError("'tool_call_id' belongs on 'tool' messages only")
        if self.role != "assistant" and self.tool_calls is not None:
            raise ValueError("'tool_calls' belong on 'assistant' messages only")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content if isinstance(part, TextPart))


def unsupported_message(messages: list[ChatMessage], verb: str = "supported") -> tuple[str, str] | None:
    """The first message part the guard cannot read (image, audio, file parts): its parameter and why."""
    for i, message in enumerate(messages):
        if isinstance(message.content, list):
            for j, part in enumerate(message.content):
                if isinstance(part, OtherPart):
                    return f"messages[{i}].content[{j}]", f"only text parts are {verb}, not '{part.type}'"
    return None


def plain_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as ``{"role", "content"}`` text, with the tool fields of tool turns (engines that forward them need
    them; the prompt check reads the calls' names and arguments too); 'developer' is the newer name of 'system'."""
    plain: list[dict[str, Any]] = []
    for m in messages:
        message: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in m.tool_calls]
        plain.append(message)
    return plain


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    top_logprobs: Any = None
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: Any = None
    functions: Any = None
    function_call: Any = None
    store: Any = None
    metadata: Any = None
    reasoning_effort: Any = None
    service_tier: Any = None
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @model_validator(mode="after")
    def _one_length_limit(self) -> "ChatCompletionRequest":
        if self.max_tokens is not None and self.max_completion_tokens is not None \
                and self.max_tokens != self.max_completion_tokens:
            raise ValueError("set only one of 'max_tokens' and 'max_completion_tokens'")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> tuple[str, str] | None:
        return unsupported_message(self.messages) or super().unsupported()

    def plain_messages(self) -> list[dict[str, Any]]:
        return plain_messages(self.messages)


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None


class ChatChoice(ResponseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "content_filter"]
    logprobs: None = None


class ChatCompletionResponse(ResponseModel):
    id: str = Field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(ResponseModel):
    """Only a choice's first chunk names the role; OpenAI's schema has no ``"role": null``, so the chunk writer
    leaves the key out of later chunks."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    refusal: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    finish_reason: Literal["stop", "length", "content_filter"] | None = None
    logprobs: None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
