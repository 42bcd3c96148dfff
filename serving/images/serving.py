"""Guarded image generation: the policy's image guard (guard.images.pipeline) behind the OpenAI images API.

The prompt is checked on the pipeline's own text embedding, then concepts are refused (400
content_policy_violation), erased while generating, or logged; what the guard did travels in the ``x-guard-*``
headers of every endpoint (:mod:`serving.serving_base`) plus ``x-guard-seed``, so the body stays exactly
OpenAI-shaped. Generation is blocking GPU/CPU work and runs in a worker thread; the image guard serialises
calls itself.
"""

from __future__ import annotations

import base64
from functools import partial
from typing import TYPE_CHECKING

from anyio import to_thread
from fastapi.responses import JSONResponse

from guard.errors import GuardUnavailable, ModelError
from guard.policy import Policy
from serving.errors import OpenAIError, invalid_request, model_not_found, unsupported_parameter
from serving.images.protocol import ImageData, ImageGenerationRequest, ImagesResponse
from serving.serving_base import GuardedServing

if TYPE_CHECKING:  # guard.images.pipeline imports diffusers (seconds): only servers with an image model load it
    from guard.images.pipeline import GenerationReport, ImageGuard, ImageRefused


def seed_header(report: GenerationReport) -> dict[str, str]:
    """The seed that reproduces the images (image i used seed + i)."""
    return {"x-guard-seed": str(report.seed)}


def detected_concepts(report: GenerationReport) -> list[str]:
    return [detection.concept_id for detection in report.detections]


class ImageServing(GuardedServing[ImageGenerationRequest]):
    endpoint = "images"

    def _image_guard(self, request: ImageGenerationRequest) -> ImageGuard:
        images = self.context.guard_state.images
        if images is None:
            raise self.invalid(OpenAIError(404, "This server serves no image model (start it with --image-model "
                                                "PATH).", param="model", code="model_not_found"))
        if request.model is not None and request.model != images.model:
            raise self.invalid(model_not_found(request.model, images.model))
        return images

    async def create(self, request: ImageGenerationRequest) -> JSONResponse:
        images = self._image_guard(request)
        from guard.images.pipeline import ImageRefused  # already loaded: the image guard exists
        if (unsupported := request.unsupported()) is not None:
            raise self.invalid(unsupported_parameter(*unsupported))
        policy = images.policy
        generate = partial(images.generate, request.prompt, n=request.n, size=request.dimensions, seed=request.seed,
                           steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                           negative_prompt=request.negative_prompt)
        try:
            result = await to_thread.run_sync(generate)
        except ImageRefused as err:
            raise self._refused(policy, err, request.user) from None
        except (GuardUnavailable, ModelError) as err:  # e.g. out of memory, or the NSFW model cannot load
            raise self.unavailable(policy, err) from None
        except ValueError as err:  # a size the model cannot produce
            raise self.invalid(invalid_request(str(err), code="invalid_value")) from None
        for detection in result.report.detections:
            self.metrics.flags.labels(concept=detection.concept_id, action=detection.action).inc()
        self.count("ok")
        response = ImagesResponse(data=[ImageData(b64_json=base64.b64encode(png).decode("ascii"))
                                        for png in result.images], size=f"{result.width}x{result.height}")
        return self.response(response, policy, detected_concepts(result.report), seed_header(result.report))

    def _refused(self, policy: Policy, err: ImageRefused, user: str | None) -> OpenAIError:
        """Refused at the prompt, or at the output when a refused concept was seen in a generated image."""
        refused = set(err.concept_ids)
        seen_in_image = any(d.source == "image" for d in err.report.detections if d.concept_id in refused)
        error = self.refuse(policy, err.concept_ids, err.message, user, stage="output" if seen_in_image else "prompt",
                            flagged=detected_concepts(err.report))
        error.headers.update(seed_header(err.report))
        return error
