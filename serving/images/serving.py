"""Guarded image generation: the policy's image guard (guard.images.pipeline) behind the OpenAI images API.

The prompt is checked on the pipeline's own text embedding, then concepts are refused (400
content_policy_violation), erased while generating, or logged; what the guard did travels in ``x-guard-*``
headers so the body stays exactly OpenAI-shaped. Generation is blocking GPU/CPU work and runs in a worker
thread; the image guard serialises calls itself.
"""

from __future__ import annotations

import base64
import logging
from functools import partial
from typing import TYPE_CHECKING

from anyio import to_thread
from fastapi.responses import JSONResponse

from guard.errors import GuardUnavailable, ModelError
from guard.policy import Policy
from serving.errors import (
    OpenAIError,
    guard_unavailable,
    invalid_request,
    model_not_found,
    policy_violation,
    unsupported_parameter,
)
from serving.images.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from serving.serving_base import ServerContext

if TYPE_CHECKING:  # guard.images.pipeline imports diffusers (seconds): only servers with an image model load it
    from guard.images.pipeline import GenerationReport, ImageGuard, ImageRefused

logger = logging.getLogger("serving")


def image_headers(policy: Policy, report: GenerationReport | None) -> dict[str, str]:
    """Which policy judged the request, what it flagged, and the seed that reproduces the images."""
    headers = {"x-guard-policy": policy.version_tag, "x-guard-concepts-checked": str(len(policy.concepts)),
               "x-guard-flagged": ""}
    if report is not None:
        headers["x-guard-flagged"] = ",".join(dict.fromkeys(d.concept_id for d in report.detections))
        headers["x-guard-seed"] = str(report.seed)
    return headers


class ImageServing:
    endpoint = "images"

    def __init__(self, context: ServerContext):
        self.context = context
        self.metrics = context.metrics

    def _count(self, outcome: str) -> None:
        self.metrics.requests.labels(endpoint=self.endpoint, outcome=outcome).inc()

    def _image_guard(self, request: ImageGenerationRequest) -> ImageGuard:
        images = self.context.guard_state.images
        if images is None:
            self._count("invalid")
            raise OpenAIError(404, "This server serves no image model (start it with --image-model PATH).",
                              param="model", code="model_not_found")
        if request.model is not None and request.model != images.model:
            self._count("invalid")
            raise model_not_found(request.model, images.model)
        return images

    async def create(self, request: ImageGenerationRequest) -> JSONResponse:
        images = self._image_guard(request)
        from guard.images.pipeline import ImageRefused  # already loaded: the image guard exists
        if (unsupported := request.unsupported()) is not None:
            self._count("invalid")
            raise unsupported_parameter(*unsupported)
        policy = images.policy
        generate = partial(images.generate, request.prompt, n=request.n, size=request.dimensions, seed=request.seed,
                           steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                           negative_prompt=request.negative_prompt)
        try:
            result = await to_thread.run_sync(generate)
        except ImageRefused as err:
            raise self._refused(policy, err, request.user) from None
        except (GuardUnavailable, ModelError) as err:  # e.g. out of memory, or the NSFW model cannot load
            self._count("guard_unavailable")
            logger.error("image guard unavailable, refusing the request: %s", err)
            error = guard_unavailable(str(err))
            error.headers.update(image_headers(policy, None))
            raise error from None
        except ValueError as err:  # a size the model cannot produce
            self._count("invalid")
            raise invalid_request(str(err), code="invalid_value") from None
        for detection in result.report.detections:
            self.metrics.flags.labels(concept=detection.concept_id, action=detection.action).inc()
        self._count("ok")
        response = ImagesResponse(data=[ImageData(b64_json=base64.b64encode(png).decode("ascii"))
                                        for png in result.images], size=f"{result.width}x{result.height}")
        return JSONResponse(response.model_dump(), headers=image_headers(policy, result.report))

    def _refused(self, policy: Policy, err: ImageRefused, user: str | None) -> OpenAIError:
        refused = set(err.concept_ids)
        seen_in_image = any(d.source == "image" for d in err.report.detections if d.concept_id in refused)
        stage = "output" if seen_in_image else "prompt"
        logger.info("refused an image %s (%s)%s", stage, ", ".join(err.concept_ids),
                    f" from user {user!r}" if user else "")
        self._count(f"blocked_{stage}")
        self.metrics.record_block(err.concept_ids, stage=stage)
        error = policy_violation(err.concept_ids, err.message)
        error.headers.update(image_headers(policy, err.report))
        return error
