"""Guarded image generation: the policy's image guard (guard.images.pipeline) behind the OpenAI images API.

The prompt is checked by the text detectors (as chat prompts are, with erase-and-check when the policy certifies)
and on the pipeline's own text embedding, then concepts are refused (400
content_policy_violation), erased while generating, or logged; what the guard did travels in the ``x-guard-*``
headers of every endpoint (:mod:`serving.serving_base`) plus ``x-guard-seed``, so the body stays exactly
OpenAI-shaped. Generation is blocking GPU/CPU work and runs in a worker thread; the image guard serialises
calls itself.
"""

from __future__ import annotations

import base64
import time
from functools import partial
from typing import TYPE_CHECKING

from anyio import to_thread
from fastapi.responses import JSONResponse

from guard.decision import Guard
from guard.errors import ConceptRefused, GuardUnavailable, ModelError
from guard.policy import Policy
from serving.decisions import RequestTrace
from serving.errors import OpenAIError, invalid_request, model_not_found, unsupported_parameter
from serving.images.protocol import OPENAI_SIZES, ImageData, ImageGenerationRequest, ImagesResponse
from serving.reports import verdict_action
from serving.serving_base import Call, GuardedServing

if TYPE_CHECKING:  # guard.images.pipeline imports diffusers (seconds): only servers with an image model load it
    from guard.images.pipeline import GenerationReport, ImageGuard, ImageRefused


def seed_header(report: GenerationReport) -> dict[str, str]:
    """The seed that reproduces the images (image i used seed + i)."""
    return {"x-guard-seed": str(report.seed)}


def image_action_headers(report: GenerationReport) -> dict[str, str]:
    """Which served images an image detector still flagged, and what the policy's image_action did to them."""
    if not report.flagged_images:
        return {}
    return {"x-guard-images-flagged": ",".join(map(str, report.flagged_images)),
            "x-guard-image-action": str(report.image_action)}


def detected_concepts(report: GenerationReport) -> list[str]:
    return [detection.concept_id for detection in report.detections]


def record_image_stages(trace: RequestTrace, report: GenerationReport, refused: bool, ms: float,
                        image_check: bool) -> None:
    """The pipeline's stages: generation (its concept presence check and erasure) and the image check (on with
    ``image_check``), whose time is part of generation's: it runs between the pipeline's denoising runs."""
    at_image = refused and any(d.source == "image" for d in report.detections)
    erased = [d.concept_id for d in report.detections if d.source == "prompt" and d.action != "log"]
    trace.ran("generation", "refuse" if refused and not at_image else
              f"erased {', '.join(erased)}" if erased else "generated", ms)
    if not image_check:
        trace.skipped("image_check", "no --image-nsfw-threshold")
    elif report.image_scores is None:
        trace.skipped("image_check", "not reached: refused before any image was made")
    else:
        trace.ran("image_check", "block" if at_image else
                  f"{report.image_action} images {report.flagged_images}" if report.flagged_images else
                  f"regenerated images {report.regenerated}" if report.regenerated else "passed", 0.0)


class ImageServing(GuardedServing[ImageGenerationRequest]):
    endpoint = "images"
    stages = ("certify", "prompt", "negative_prompt", "generation", "image_check")

    def _image_guard(self, request: ImageGenerationRequest, call: Call) -> ImageGuard:
        images = self.context.guard_state.images
        if images is None:
            raise self.invalid(OpenAIError(404, "This server serves no image model (start it with --image-model "
                                                "PATH).", param="model", code="model_not_found"))
        if call.state is not self.context.guard_state:
            # The pipeline carries one policy's erasure hooks: a key bound to another policy is refused (fail
            # closed), never served under a policy that is not its own.
            raise self.invalid(OpenAIError(
                403, f"Images on this server are guarded by the policy {images.policy.version_tag} only; this API "
                     f"key's policy is {call.active.guard.policy.version_tag}.", code="policy_not_served"))
        if request.model is not None and request.model != images.model:
            raise self.invalid(model_not_found(request.model, images.model))
        return images

    async def create(self, request: ImageGenerationRequest, call: Call) -> JSONResponse:
        images = self._image_guard(request, call)
        from guard.images.pipeline import ImageRefused  # already loaded: the image guard exists
        if (unsupported := request.unsupported()) is not None:
            raise self.invalid(unsupported_parameter(*unsupported))
        active, trace = call.active, call.trace
        policy = active.guard.policy
        self.check_length([request.prompt, request.negative_prompt or ""], "prompt")
        language = self.check_language(call, [t for t in (request.prompt, request.negative_prompt) if t], request.user)
        certificate = await self.certify(call, [request.prompt], request.user, ["prompt"])
        text_flagged, negative_flagged = await self._check_texts(active.guard, request, trace)
        generate = partial(images.generate, request.prompt, n=request.n, size=request.dimensions, seed=request.seed,
                           steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
                           negative_prompt=request.negative_prompt)
        started = time.perf_counter()
        try:
            result = await to_thread.run_sync(generate)
        except ImageRefused as err:
            record_image_stages(trace, err.report, True, (time.perf_counter() - started) * 1000,
                                bool(images.detectors))
            trace.flag(detected_concepts(err.report))
            raise self._refused(policy, err, request.user) from None
        except (GuardUnavailable, ModelError) as err:  # e.g. out of memory, or the NSFW model cannot load
            raise self.unavailable(policy, err) from None
        except ValueError as err:  # a size the model cannot produce
            raise self.invalid(invalid_request(str(err), code="invalid_value")) from None
        record_image_stages(trace, result.report, False, (time.perf_counter() - started) * 1000,
                            bool(images.detectors))
        trace.flag(detected_concepts(result.report))
        for detection in result.report.detections:
            self.metrics.flags.labels(concept=detection.concept_id, action=detection.action).inc()
        self.count("ok")
        size = f"{result.width}x{result.height}"
        response = ImagesResponse(data=[ImageData(b64_json=base64.b64encode(png).decode("ascii"))
                                        for png in result.images], size=size if size in OPENAI_SIZES else None)
        headers = {**seed_header(result.report), **image_action_headers(result.report), **certificate, **language,
                   "x-guard-negative-prompt-flagged": ",".join(negative_flagged)}
        return self.response(response, policy, text_flagged + detected_concepts(result.report), headers)

    async def _check_texts(self, guard: Guard, request: ImageGenerationRequest, trace: RequestTrace
                           ) -> tuple[list[str], list[str]]:
        """The text detectors (aliases, exemplars) over the prompt, as for chat: a refused concept is a 400 before
        any pixel. The negative prompt is classified too but never refused: naming a concept there steers the
        image away from it, which is what a safety-minded user writes; its flags travel in a header."""
        negative_prompt = request.negative_prompt
        try:
            decision = await self.run_check(guard.policy, lambda: guard.check_prompt([request.prompt]))
        except ConceptRefused as err:
            trace.ran("prompt", "refuse", err.ms)
            trace.flag(err.concept_ids)
            raise self.refuse(guard.policy, err.concept_ids, err.message, request.user) from None
        trace.ran("prompt", verdict_action(decision.verdict), decision.ms)
        trace.flag(decision.verdict.flagged)
        if not negative_prompt:
            trace.skipped("negative_prompt", "no negative_prompt given")
            return list(decision.verdict.flagged), []
        started = time.perf_counter()
        negative = await self.run_check(guard.policy, lambda: guard.classify_prompt([negative_prompt]))
        trace.ran("negative_prompt", f"steers away from {', '.join(negative.flagged)}" if negative.flagged
                  else "nothing flagged", (time.perf_counter() - started) * 1000)
        return list(decision.verdict.flagged), list(negative.flagged)

    def _refused(self, policy: Policy, err: ImageRefused, user: str | None) -> OpenAIError:
        """Refused at the prompt, or at the output (a refused concept seen in an image, or an image still flagged
        under ``image_action: refuse``)."""
        error = self.refuse(policy, err.concept_ids, err.message, user, stage=err.stage,
                            flagged=list(dict.fromkeys([*detected_concepts(err.report), *err.concept_ids])))
        error.headers.update({**seed_header(err.report), **image_action_headers(err.report)})
        return error
