"""Guard any OpenAI-compatible server (vLLM, llama.cpp, another erasure-guard, a hosted API) over HTTP.

The guard runs here; the upstream only decodes. Token penalties travel as ``logit_bias`` computed with the
upstream model's tokenizer (``--upstream-tokenizer``); without it no bias can be computed, and the output
check alone stands between the model and the client (logged at start-up). Streams pass through the same
sliding-window output check as local engines. Upstream errors keep their status when they are the client's
fault (400, 413, 422, 429 — e.g. the upstream's own policy refusal) and become 502 ``upstream_error`` otherwise
(including 401/403/404: a wrong upstream key or model name is the server's misconfiguration); an upstream
that does not answer within ``--upstream-timeout`` seconds is 504 ``upstream_timeout``.
"""

from __future__ import annotations

import json
import logging
import weakref
from typing import Any, AsyncIterator

import httpx
from anyio import to_thread

from guard.decision import Guard, PromptDecision
from guard.errors import ModelError
from guard.methods.token_penalty.logit_bias import (
    client_bias_within_guard,
    merged_logit_bias,
    protected_tokens,
)
from guard.methods.token_penalty.tables import PenaltyRow, TokenPenalties
from guard.models import resolve
from guard.settle import Decoded, GenerationResult, penalty_row
from guard.text.generation import TextRequest
from serving.config import ServerSettings
from serving.engines.base import ChoiceDelta, DecodeResult, guarded_generate
from serving.errors import OpenAIError, upstream_error, upstream_timeout

logger = logging.getLogger("serving")

_FINISH_REASONS = {"stop", "length", "content_filter"}


def _finish_reason(value: Any) -> str:
    # Tool calls cannot happen (tools are refused before forwarding); anything unknown ended the text early.
    return value if value in _FINISH_REASONS else "stop"


def upstream_failure(err: httpx.HTTPError, timeout_s: float, context: str = "") -> OpenAIError:
    """504 when the upstream did not answer in time (it may still be working), 502 for any other failure."""
    if isinstance(err, httpx.TimeoutException):
        return upstream_timeout(timeout_s)
    return upstream_error(f"{context}{type(err).__name__}: {err}")


class UpstreamEngine:
    def __init__(self, settings: ServerSettings):
        if not settings.upstream_url:
            raise ValueError("UpstreamEngine needs settings.upstream_url")
        self.base_url = settings.upstream_url.rstrip("/")
        self.upstream_model = settings.model
        self.model_id = settings.model_id
        self.description = f"upstream {self.base_url} (model '{self.upstream_model}')"
        self.timeout_s = settings.upstream_timeout_s
        headers = {"authorization": f"Bearer {settings.upstream_api_key}"} if settings.upstream_api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                        timeout=httpx.Timeout(settings.upstream_timeout_s, connect=10.0))
        self.tokenizer = self._load_tokenizer(settings.upstream_tokenizer) if settings.upstream_tokenizer else None
        self.vocab_size = len(self.tokenizer) if self.tokenizer is not None else None
        if self.tokenizer is None:
            logger.warning("no --upstream-tokenizer: token penalties cannot be sent as logit_bias; "
                           "only the prompt and output checks guard the upstream")
        self._tables: weakref.WeakKeyDictionary[Guard, tuple[TokenPenalties, frozenset[int]]] = \
            weakref.WeakKeyDictionary()

    @staticmethod
    def _load_tokenizer(reference: str) -> Any:
        from transformers import AutoTokenizer

        resolved = resolve(reference)
        try:
            return AutoTokenizer.from_pretrained(resolved.path)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the upstream tokenizer '{reference}': {err}") from err

    async def prepare(self, guard: Guard) -> None:
        if self.tokenizer is None:
            return
        penalties = await to_thread.run_sync(guard.token_penalties, self.tokenizer)
        protected = await to_thread.run_sync(protected_tokens, penalties)
        self._tables[guard] = (penalties, protected)

    async def close(self) -> None:
        await self.client.aclose()

    # -- request bodies ------------------------------------------------------------------------------------

    def _logit_bias(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None) -> dict[int, float]:
        client_bias = request.settings.logit_bias
        if self.tokenizer is None:
            return dict(client_bias)
        if guard not in self._tables:
            raise RuntimeError("the engine was not prepared for this guard")
        penalties, protected = self._tables[guard]
        client_bias = client_bias_within_guard(client_bias, protected)
        if penalty is None:
            return client_bias
        return merged_logit_bias(client_bias, penalties.logit_bias(penalty.concept_ids, penalty.strength))

    def upstream_body(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None, n: int,
                      seed: int | None, stream: bool) -> tuple[str, dict[str, Any]]:
        """The path and JSON body sent upstream: the client's sampling, the guard's penalties as logit_bias."""
        settings = request.settings
        body: dict[str, Any] = {"model": self.upstream_model, "max_tokens": settings.max_new_tokens,
                                "temperature": settings.temperature, "top_p": settings.top_p, "n": n}
        if settings.stop:
            body["stop"] = list(settings.stop)
        if seed is not None:
            body["seed"] = seed
        if request.user is not None:
            body["user"] = request.user
        bias = self._logit_bias(guard, request, penalty)
        if bias:
            body["logit_bias"] = {str(token): value for token, value in bias.items()}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if request.messages is not None:
            return "/chat/completions", {**body, "messages": request.messages}
        return "/completions", {**body, "prompt": request.prompt}

    @staticmethod
    async def _raise_for_status(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        await response.aread()
        try:
            error = response.json()["error"]
            message = error.get("message") or response.text
        except (ValueError, KeyError, TypeError, AttributeError):
            error, message = {}, response.text[:500]
        if response.status_code in (401, 403, 404):
            # Our key or model name was refused: the server's configuration is wrong, not the client's request.
            raise upstream_error(f"HTTP {response.status_code} (check --upstream-api-key and --model): {message}")
        if 400 <= response.status_code < 500:
            # The client's request (or the upstream's own policy) was refused: keep status and error code.
            code = error.get("code") if isinstance(error.get("code"), str) else None
            raise OpenAIError(response.status_code, f"upstream: {message}", param=error.get("param"), code=code)
        raise upstream_error(f"HTTP {response.status_code}: {message}")

    # -- non-streaming ---------------------------------------------------------------------------------------

    async def decode(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None, n: int,
                   seed: int | None) -> DecodeResult:
        """Decode without any guard check (the guard loop of ``generate`` calls this)."""
        path, body = self.upstream_body(guard, request, penalty, n, seed, stream=False)
        try:
            response = await self.client.post(path, json=body)
        except httpx.HTTPError as err:
            raise upstream_failure(err, self.timeout_s) from err
        await self._raise_for_status(response)
        try:
            data = response.json()
            choices = sorted(data["choices"], key=lambda c: c["index"])
            usage = data.get("usage") or {}
            per_choice = int(usage.get("completion_tokens", 0)) // max(1, len(choices))
            raw = []
            for choice in choices:
                if request.messages is not None:
                    message = choice["message"]
                    text = message.get("content") or message.get("refusal") or ""
                else:
                    text = choice.get("text") or ""
                raw.append(Decoded(text, _finish_reason(choice.get("finish_reason")), per_choice))
            return DecodeResult(raw, int(usage.get("prompt_tokens", 0)))
        except (ValueError, KeyError, TypeError) as err:
            raise upstream_error(f"unexpected response shape ({type(err).__name__}: {err})") from err

    async def generate(self, guard: Guard, request: TextRequest) -> GenerationResult:
        return await guarded_generate(guard, request, self.decode)

    # -- streaming ---------------------------------------------------------------------------------------------

    async def open_stream(self, guard: Guard, request: TextRequest) -> "UpstreamStream":
        decision = await to_thread.run_sync(guard.check_prompt, request.guard_texts)
        path, body = self.upstream_body(guard, request, penalty_row(decision.penalized), request.settings.n,
                                request.settings.seed, stream=True)
        try:
            response = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as err:
            raise upstream_failure(err, self.timeout_s) from err
        try:
            await self._raise_for_status(response)
        except OpenAIError:
            await response.aclose()
            raise
        return UpstreamStream(decision, response, chat=request.messages is not None, choices=request.settings.n,
                              timeout_s=self.timeout_s)


class UpstreamStream:
    """An upstream SSE stream read as :class:`ChoiceDelta` items."""

    def __init__(self, decision: PromptDecision, response: httpx.Response, chat: bool, choices: int,
                 timeout_s: float):
        self.decision = decision
        self._timeout_s = timeout_s
        self._response = response
        self._chat = chat
        self._cancelled: set[int] = set()
        self._choices = choices
        self._prompt_tokens = 0
        self._completion_tokens: int | None = None
        self._deltas = 0
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    @property
    def completion_tokens(self) -> int:
        # Upstreams report usage in a last chunk; until then (or if they never do) count content deltas.
        return self._completion_tokens if self._completion_tokens is not None else self._deltas

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas_from_upstream()

    async def _deltas_from_upstream(self) -> AsyncIterator[ChoiceDelta]:
        try:
            async for line in self._response.aiter_lines():
                if self._closed:
                    return
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                chunk = json.loads(payload)
                if "error" in chunk:
                    error = chunk["error"] or {}
                    raise upstream_error(f"in-stream error: {error.get('message', error)}")
                if chunk.get("usage"):
                    self._prompt_tokens = int(chunk["usage"].get("prompt_tokens", 0))
                    self._completion_tokens = int(chunk["usage"].get("completion_tokens", 0))
                for choice in chunk.get("choices") or []:
                    index = int(choice["index"])
                    if index in self._cancelled:
                        continue
                    text = (choice.get("delta") or {}).get("content") if self._chat else choice.get("text")
                    reason = choice.get("finish_reason")
                    if text:
                        self._deltas += 1
                    if text or reason:
                        yield ChoiceDelta(index, text or "", _finish_reason(reason) if reason else None)
        except httpx.StreamClosed:
            if not self._closed:
                raise upstream_error("the upstream closed the stream early") from None
        except httpx.HTTPError as err:
            raise upstream_failure(err, self._timeout_s, "stream broke: ") from err
        except (ValueError, KeyError, TypeError) as err:
            raise upstream_error(f"unexpected stream chunk ({type(err).__name__}: {err})") from err

    async def cancel(self, index: int) -> None:
        self._cancelled.add(index)
        if len(self._cancelled) >= self._choices:
            await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        await self._response.aclose()
