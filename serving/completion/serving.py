"""Guarded text completions; several prompts in one request run concurrently."""

from __future__ import annotations

import time
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from guard.settle import FinishReason
from guard.text.generation import TextRequest
from serving.completion.protocol import CompletionChoice, CompletionRequest, CompletionResponse
from serving.errors import invalid_request, unsupported_parameter
from serving.protocol import Usage
from serving.serving_base import Call, TextServing


class CompletionChunkWriter:
    def __init__(self, model: str, fingerprint: str):
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.fingerprint = fingerprint

    def _chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> dict:
        """A chunk is a CompletionResponse; OpenAI's schema has no ``"usage": null``, so chunks without usage omit
        the key (dropped here, not in the model, so /openapi.json keeps the documented shape)."""
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage,
                                  system_fingerprint=self.fingerprint).model_dump(
            exclude={"usage"} if usage is None else None)

    def start(self, index: int) -> None:
        return None

    def text(self, index: int, text: str) -> dict:
        return self._chunk([CompletionChoice(index=index, text=text, finish_reason=None)])

    def finish(self, index: int, reason: FinishReason, refusal: str | None) -> dict:
        # Text completions have no refusal field: a blocked choice just ends with content_filter.
        return self._chunk([CompletionChoice(index=index, text="", finish_reason=reason)])

    def usage(self, prompt_tokens: int, completion_tokens: int) -> dict:
        return self._chunk([], Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                     total_tokens=prompt_tokens + completion_tokens))


class CompletionServing(TextServing[CompletionRequest]):
    endpoint = "completions"
    stages = ("certify", "prompt", "output")  # erase-and-check runs before the engine's prompt check

    async def create(self, request: CompletionRequest, call: Call) -> JSONResponse | StreamingResponse:
        guard, trace = call.active.guard, call.trace
        self.validate(request)
        prompts = request.prompts
        if not prompts or not all(prompts):
            raise self.invalid(invalid_request("'prompt' must not be empty", "prompt"))
        for prompt in prompts:
            self.check_length([prompt], "prompt")
        settings = self.sampling(request, request.max_tokens)

        if request.stream:
            if len(prompts) > 1:
                raise self.invalid(unsupported_parameter("prompt", "streaming accepts one prompt per request"))
            certificate = await self.certify(call, prompts, request.end_user, ["prompt[0]"])
            stream = await self.open_stream(guard, TextRequest(settings, prompt=prompts[0], user=request.end_user),
                                            trace)
            writer = CompletionChunkWriter(self.engine.model_id, self.fingerprint(guard))
            return self.stream_response(guard, stream, writer, settings.n, request.include_usage, certificate, trace)

        certificate = await self.certify(call, prompts, request.end_user,
                                         [f"prompt[{i}]" for i in range(len(prompts))])
        engine_requests = [TextRequest(settings, prompt=p, user=request.end_user) for p in prompts]
        results = await self.generate(guard, engine_requests, trace)
        choices = []
        flagged: list[str] = []
        for number, result in enumerate(results):
            flagged += self.flagged(result)
            for choice in result.choices:
                # A blocked choice carries no text: only what passed the guard is ever returned.
                text = "" if choice.finish_reason == "content_filter" else choice.text
                choices.append(CompletionChoice(index=number * settings.n + choice.index, text=text,
                                                finish_reason=choice.finish_reason))
        prompt_tokens = sum(r.prompt_tokens for r in results)
        completion_tokens = sum(r.completion_tokens for r in results)
        response = CompletionResponse(model=self.engine.model_id, choices=choices,
                                      system_fingerprint=self.fingerprint(guard),
                                      usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                                  total_tokens=prompt_tokens + completion_tokens))
        return self.response(response, guard.policy, flagged, certificate)
