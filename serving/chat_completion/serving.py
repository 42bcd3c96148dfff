"""Guarded chat completions: validate, check the prompt, generate under penalties, check the output."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from guard.policy import Policy
from guard.settle import FinishReason
from guard.text.generation import TextRequest
from serving.chat_completion.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    DeltaMessage,
)
from serving.protocol import Usage
from serving.serving_base import Call, TextServing


class ChatChunkWriter:
    def __init__(self, model: str, fingerprint: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> dict:
        chunk = ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                    system_fingerprint=self.fingerprint).model_dump()
        for choice in chunk["choices"]:  # OpenAI's schema allows a role or no key, never "role": null
            if choice["delta"].get("role") is None:
                choice["delta"].pop("role", None)
        return chunk

    def start(self, index: int) -> dict:
        return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(role="assistant", content=""))])

    def text(self, index: int, text: str) -> dict:
        return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(content=text))])

    def finish(self, index: int, reason: FinishReason, refusal: str | None) -> dict:
        return self._chunk([ChatChunkChoice(index=index, delta=DeltaMessage(refusal=refusal), finish_reason=reason)])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                     total_tokens=prompt_tokens + completion_tokens))


class ChatServing(TextServing[ChatCompletionRequest]):
    endpoint = "chat"
    stages = ("certify", "prompt", "output")  # erase-and-check runs before the engine's prompt check

    @staticmethod
    def certified_text(policy: Policy, request: TextRequest) -> tuple[list[str], list[str]]:
        """What erase-and-check certifies of a chat (the policy's ``certify.scope``), with its label."""
        messages = request.messages or []
        if policy.certify is not None and policy.certify.scope == "last_user_message":
            users = [i for i, m in enumerate(messages) if m.get("role") == "user" and m.get("content")]
            if users:
                return [messages[users[-1]]["content"]], [f"messages[{users[-1]}]"]
        return ["\n".join(request.guard_texts)], [f"messages[0:{len(messages)}]"]

    async def create(self, request: ChatCompletionRequest, call: Call) -> JSONResponse | StreamingResponse:
        guard, trace = call.active.guard, call.trace
        self.validate(request)
        param = "max_completion_tokens" if request.max_completion_tokens is not None else "max_tokens"
        settings = self.sampling(request, request.requested_max_tokens, param)
        engine_request = TextRequest(settings, messages=request.plain_messages(), user=request.end_user)
        self.check_length(engine_request.guard_texts, "messages")
        certified, labels = self.certified_text(guard.policy, engine_request)
        certificate = await self.certify(call, certified, request.end_user, labels)

        if request.stream:
            stream = await self.open_stream(guard, engine_request, trace)
            writer = ChatChunkWriter(self.engine.model_id, self.fingerprint(guard))
            return self.stream_response(guard, stream, writer, settings.n, request.include_usage, certificate, trace)

        (result,) = await self.generate(guard, [engine_request], trace)
        choices = []
        for choice in result.choices:
            blocked = choice.finish_reason == "content_filter"
            message = AssistantMessage(content=None if blocked else choice.text,
                                       refusal=choice.text if blocked else None)
            choices.append(ChatChoice(index=choice.index, message=message, finish_reason=choice.finish_reason))
        response = ChatCompletionResponse(
            model=self.engine.model_id, choices=choices, system_fingerprint=self.fingerprint(guard),
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
                        total_tokens=result.prompt_tokens + result.completion_tokens))
        return self.response(response, guard.policy, self.flagged(result), certificate)
