"""The FastAPI app factory: an OpenAI-compatible endpoint with the policy guarding every request.

Routes live in per-endpoint packages (``<endpoint>/api_router.py`` wiring, ``protocol.py`` wire models,
``serving.py`` logic — the layout of vLLM's OpenAI server); this module assembles them with the shared pieces:
engine, hot-reloaded guards (one per policy of ``--policy-map``), metrics, API keys, admission control, body-size
limit, the decision log and OpenAI-shaped errors, and builds the endpoint handlers once, on ``app.state``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from guard.policy import Policy, load_policy, load_policy_map
from serving.admission import AdmissionMiddleware
from serving.auth import ApiKeyMiddleware, BodySizeLimitMiddleware, bind_keys
from serving.chat_completion.api_router import router as chat_router
from serving.chat_completion.serving import ChatServing
from serving.completion.api_router import router as completion_router
from serving.completion.serving import CompletionServing
from serving.config import ServerSettings
from serving.decisions import DecisionLog
from serving.engines.base import Engine
from serving.errors import ERROR_RESPONSES, OpenAIError, install_handlers
from serving.guard_checks.api_router import router as checks_router
from serving.guard_checks.serving import CheckServing
from serving.guard_state import GuardState, KeyPolicies, cancel
from serving.images.api_router import router as images_router
from serving.images.serving import ImageServing
from serving.litellm_guardrail.api_router import router as litellm_router
from serving.litellm_guardrail.serving import LiteLLMGuardrailServing
from serving.metrics import ServerMetrics
from serving.moderations.api_router import router as moderations_router
from serving.moderations.serving import ModerationServing
from serving.protocol import ModelCard, ModelList
from serving.serving_base import ServerContext

logger = logging.getLogger("serving")


def create_engine(settings: ServerSettings, metrics: ServerMetrics) -> Engine:
    """Build the configured engine (loads model weights: once, before serving)."""
    if settings.engine == "upstream":
        from serving.engines.upstream import UpstreamEngine

        return UpstreamEngine(settings)
    if settings.engine == "vllm":
        from serving.engines.vllm import VLLMEngine

        return VLLMEngine(settings)
    from serving.engines.transformers import TransformersEngine

    return TransformersEngine(settings, metrics)


def app_from_environment() -> FastAPI:
    """The app of one worker of ``guard serve --workers N`` (uvicorn's factory, called in each worker process):
    the settings come from :meth:`ServerSettings.from_environment`, the policy from its file."""
    settings = ServerSettings.from_environment()
    return build_app(settings, load_policy(settings.policy_path))


def build_app(settings: ServerSettings, policy: Policy) -> FastAPI:
    """The app for ``settings`` guarded by ``policy`` (loaded from ``settings.policy_path``, which hot reloads
    re-read); loads engine and guards now (errors raise here), prepares the engine at start-up."""
    bindings = load_policy_map(settings.policy_map) if settings.policy_map is not None else []
    api_keys, bound = bind_keys(bindings, settings.api_keys, settings.policy_map) if bindings else (
        settings.api_keys, {})
    bound_policies = {path: load_policy(path) for path in dict.fromkeys(bound.values())}  # fail before the engine
    metrics = ServerMetrics()
    engine = create_engine(settings, metrics)
    guard_state = GuardState(policy, settings.policy_path, engine, metrics, settings.image_model,
                             settings.image_nsfw_threshold)
    states = {settings.policy_path.resolve(): guard_state}
    for path, bound_policy in bound_policies.items():
        states.setdefault(path, GuardState(bound_policy, path, engine, metrics))
    policies = KeyPolicies(guard_state, {kid: states[path] for kid, path in bound.items()})
    for kid, state in policies.bound.items():
        logger.info("API key %s is guarded by %s", kid, state.guard.policy.version_tag)
    decision_log = DecisionLog(settings.decision_log) if settings.decision_log is not None else None
    context = ServerContext(settings, engine, guard_state, metrics, policies, decision_log)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        context.loop = asyncio.get_running_loop()
        try:
            for state in policies.states:
                await state.start()
        except Exception as err:
            app.state.startup_error = err  # read by `guard serve` to print one clear line
            await engine.close()
            raise
        watchers = [asyncio.create_task(state.watch()) for state in policies.states] if settings.reload_policy else []
        try:
            yield
        finally:
            for watcher in watchers:
                await cancel(watcher)
            await engine.close()
            if decision_log is not None:
                decision_log.close()

    app = FastAPI(title="erasure-guard", summary="OpenAI-compatible endpoint guarded by an erasure policy.",
                  lifespan=lifespan)
    app.state.context = context
    app.state.startup_error = None
    # The endpoint handlers, built once: each reads the active guard per request (see the api_router modules).
    app.state.chat_serving = ChatServing(context)
    app.state.completion_serving = CompletionServing(context)
    app.state.image_serving = ImageServing(context)
    app.state.moderation_serving = ModerationServing(context)
    app.state.check_serving = CheckServing(context)
    app.state.litellm_guardrail_serving = LiteLLMGuardrailServing(context, app.state.check_serving)
    install_handlers(app)
    # Starlette runs the last-added middleware first: keys are checked, then the request is admitted (or told to
    # retry), then its body size is checked.
    app.add_middleware(BodySizeLimitMiddleware, limit=settings.max_request_bytes)
    app.add_middleware(AdmissionMiddleware, limit=settings.max_queue, metrics=metrics)
    app.add_middleware(ApiKeyMiddleware, keys=api_keys, admin_keys=settings.admin_api_keys)

    # OpenAI endpoints (/v1/images/generations answers 404 model_not_found unless started with --image-model),
    # then the guard's own check-only endpoint and LiteLLM's generic guardrail API over it.
    for router in (chat_router, completion_router, images_router, moderations_router, checks_router, litellm_router):
        app.include_router(router, responses=ERROR_RESPONSES)  # every error status is documented in /openapi.json
    served = [engine.model_id] + ([settings.image_model] if settings.image_model is not None else [])

    @app.get("/v1/models", responses=ERROR_RESPONSES)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=model) for model in served])

    @app.get("/v1/models/{model:path}", responses=ERROR_RESPONSES)
    async def get_model(model: str) -> ModelCard:
        if model not in served:
            raise OpenAIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
        return ModelCard(id=model)

    @app.get("/health")
    async def health() -> JSONResponse:
        guard = context.guard_state.guard
        return JSONResponse({"status": "ok", "pid": os.getpid(), "model": engine.model_id, "engine": engine.description,
                             "image_model": settings.image_model, "policy": guard.policy.version_tag,
                             "concepts": len(guard.policy.concepts),
                             "key_policies": {kid: state.guard.policy.version_tag
                                              for kid, state in policies.bound.items()}})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
