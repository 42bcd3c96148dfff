"""Guarded text-to-image pipelines: the policy applied to every Stable Diffusion (1.x/2.x/XL) call.

Per request, the guard reads which policy concepts a prompt carries off the pipeline's own text embedding
(Semantic Surgery's presence score) and then acts as the policy says:

* ``refuse`` — raise :class:`ImageRefused` before anything is generated;
* ``steer``  — Semantic Surgery subtracts the concepts from the conditional prompt embedding, and AdaVD projects
  their value directions out of every cross-attention layer, for this call only;
* ``log``    — report the detection and generate unchanged.

A prompt that carries no concept runs exactly the unguarded computation (bit-identical images). Optional image
detectors (Open-NSFW is one) score the outputs: Semantic Surgery's visual feedback regenerates a flagged image with
the same seed and the concepts that detector watches erased, or refuses; an image still flagged meets the policy's
``image_action`` (refuse, blur, black or flag).

The guard never changes weights: saving a guarded pipeline saves the original model, and the guard is applied
again from the policy after loading.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import logging
import secrets
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from detectors.base import ImageDetector
from detectors.image_nsfw import ImageNsfwDetector
from guard.decision import OutputAction
from guard.errors import ConceptRefused, GuardUnavailable, ModelError
from guard.methods.adavd import AdaVD, ValueErasure, last_subject_embedding
from guard.methods.semantic_surgery import (
    ConceptPresence,
    ErasureTarget,
    SemanticSurgery,
    SurgeryEdit,
    TextEmbeddings,
    probe_texts,
)
from guard.models import resolve
from guard.policy import ActionType, Concept, ImageAction, Policy
from guard.settle import Attempt, Step, seed_for_choice, settle

if TYPE_CHECKING:
    from PIL.Image import Image

GuardablePipeline = StableDiffusionPipeline | StableDiffusionXLPipeline
logger = logging.getLogger("guard.images")

# Arguments the guard computes itself; accepting them from callers would let a call bypass or undo the erasure.
_RESERVED = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
             "prompt_2", "negative_prompt_2", "clip_skip", "generator", "latents", "num_images_per_prompt",
             "callback_on_step_end", "callback_on_step_end_tensor_inputs")


@dataclass(frozen=True)
class ConceptDetection:
    concept_id: str
    action: str  # refuse | steer | log
    presence: float  # Semantic Surgery's ρ̂ for the prompt, or the NSFW score for an image
    alpha: float | None  # mean token cosine of the best probe (prompt detections only)
    matched: tuple[str, ...]  # probe texts found present in the prompt
    source: str  # "prompt" or "image"


@dataclass
class GenerationReport:
    """What the guard saw and did for one call."""

    prompt: str
    seed: int
    detections: list[ConceptDetection] = field(default_factory=list)
    surgery_strength: float = 0.0  # ρ̂_joint subtracted from the prompt embedding (0 = untouched)
    erased_text: str = ""  # the co-occurrence prompt Semantic Surgery erased
    anchor_text: str = ""  # what it was replaced by ("" = the empty prompt)
    value_erasure: list[str] = field(default_factory=list)  # texts whose value directions AdaVD projected out (any pass)
    image_scores: dict[str, list[float]] | None = None  # final score per image by image detector (None: no check)
    regenerated: list[int] = field(default_factory=list)  # images regenerated after the image check flagged them
    regeneration_strengths: list[float] = field(default_factory=list)
    flagged_images: list[int] = field(default_factory=list)  # images still flagged when settled
    image_action: str | None = None  # the policy's image_action applied to them (None: none was flagged)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class ImageRefused(ConceptRefused):
    """The policy refuses this image request (at the prompt, or because an output stayed flagged)."""

    def __init__(self, concept_ids: Sequence[str], message: str, report: GenerationReport, stage: str = "prompt"):
        super().__init__(concept_ids, message)
        self.report = report
        self.stage = stage  # "prompt" (nothing was generated) or "output" (a generated image was refused)


@dataclass
class GuardedOutput:
    images: Any  # whatever the pipeline returns for ``output_type``: PIL images, an array or a tensor
    report: GenerationReport


@dataclass(frozen=True)
class _Plan:
    conditioning: TextEmbeddings
    surgery: SurgeryEdit
    value_erasure: ValueErasure | None


class GuardedPipeline:
    """A Stable Diffusion pipeline with the policy installed; call it instead of the pipeline.

    Installing wraps every cross-attention processor (see :mod:`guard.methods.adavd`); :meth:`remove` restores the
    original processor objects. While installed, calling the pipeline directly raises, so it cannot run unguarded
    by accident. Calls are not reentrant: use one guarded pipeline per worker, or a lock (see :class:`ImageGuard`).
    """

    def __init__(self, pipe: GuardablePipeline, policy: Policy, detectors: Sequence[ImageDetector] = (),
                 fingerprint: str | None = None):
        """``detectors`` score every generated image (Semantic Surgery's visual feedback; Open-NSFW is one).
        ``fingerprint`` is the pipeline's :func:`model_fingerprint` (computed here when not given); the policy's
        image calibration for that model is applied, and a policy that calibrates other models only is refused."""
        if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
            raise TypeError(f"the guard supports StableDiffusionPipeline and StableDiffusionXLPipeline, "
                            f"not {type(pipe).__name__}")
        self.pipe = pipe
        self.policy = policy
        self.detectors = tuple(detectors)
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"image detector names must be unique, got {names}")
        self._xl = isinstance(pipe, StableDiffusionXLPipeline)
        concepts = list(policy.concepts)
        if policy.calibrates_images:
            concepts = policy.image_concepts(fingerprint or model_fingerprint(pipe))
        self._concepts = {concept.id: concept for concept in concepts}
        self.surgery = SemanticSurgery(concepts, self.encode)
        tokenizer = pipe.tokenizer
        self.subject_embeddings = [
            last_subject_embedding(self.surgery.probe_embeddings.sequence[i], self._token_ids(probe.text),
                                   tokenizer.eos_token_id)
            for i, probe in enumerate(self.surgery.probes)]
        self.adavd = AdaVD(pipe.unet)
        self._default_guidance = inspect.signature(type(pipe).__call__).parameters["guidance_scale"].default

    @property
    def concepts(self) -> list[Concept]:
        """The policy's concepts as this model applies them (with its image calibration)."""
        return list(self._concepts.values())

    def __enter__(self) -> "GuardedPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Uninstall: the pipeline's original attention processors come back, untouched."""
        self.adavd.remove()

    # -- text side ------------------------------------------------------------------------------------------------

    def _token_ids(self, text: str) -> list[int]:
        tokenizer = self.pipe.tokenizer
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        """φ(texts) exactly as the pipeline conditions its UNet on them."""
        device = self.pipe._execution_device
        with torch.no_grad():
            if self._xl:
                sequence, _, pooled, _ = self.pipe.encode_prompt(list(texts), device=device, num_images_per_prompt=1,
                                                                 do_classifier_free_guidance=False)
                return TextEmbeddings(sequence, pooled)
            sequence, _ = self.pipe.encode_prompt(list(texts), device, 1, False)
            return TextEmbeddings(sequence)

    def _encode_request(self, prompt: str, negative_prompt: str | None,
                        guidance: bool) -> tuple[TextEmbeddings, TextEmbeddings | None]:
        """The conditional and (with guidance) unconditional embeddings the pipeline would compute itself."""
        device = self.pipe._execution_device
        with torch.no_grad():
            if self._xl:
                sequence, negative, pooled, negative_pooled = self.pipe.encode_prompt(
                    prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=guidance,
                    negative_prompt=negative_prompt)
                unconditional = TextEmbeddings(negative, negative_pooled) if guidance else None
                return TextEmbeddings(sequence, pooled), unconditional
            sequence, negative = self.pipe.encode_prompt(prompt, device, 1, guidance, negative_prompt)
            return TextEmbeddings(sequence), (TextEmbeddings(negative) if guidance else None)

    def detect(self, prompt: str) -> list[ConceptPresence]:
        """Presence of every policy concept in ``prompt`` (nothing is generated)."""
        return self.surgery.presence(self.encode([prompt]))

    # -- planning -------------------------------------------------------------------------------------------------

    def _plan(self, conditioning: TextEmbeddings, found: Sequence[ConceptPresence], seen: dict[str, float],
              guidance: bool) -> _Plan:
        """What to erase: concepts found in the prompt (their matched probes) and concepts seen in an image.

        AdaVD projects out the matched probes of each found concept (every probe with ``adavd.targets: all``) and
        every probe of a concept seen only in an image (nothing in the prompt names it).
        """
        targets: list[ErasureTarget] = []
        value_targets: dict[tuple[str, str], None] = {}
        for presence in found:
            concept = self._concepts[presence.concept_id]
            if concept.methods.semantic_surgery.enabled:
                targets += [ErasureTarget(s.probe.text, s.presence, concept.anchor) for s in presence.matched]
            if concept.methods.adavd.enabled:
                texts = ([s.probe.text for s in presence.matched] if concept.methods.adavd.targets == "matched"
                         else probe_texts(concept))
                value_targets.update(dict.fromkeys((concept.id, text) for text in texts))
        for concept_id, score in seen.items():
            concept = self._concepts[concept_id]
            if concept.methods.semantic_surgery.enabled:
                targets += [ErasureTarget(text, score, concept.anchor) for text in probe_texts(concept)]
            if concept.methods.adavd.enabled:
                value_targets.update(dict.fromkeys((concept.id, text) for text in probe_texts(concept)))
        edit = self.surgery.erase(conditioning, targets)
        rows = [i for i, probe in enumerate(self.surgery.probes) if (probe.concept_id, probe.text) in value_targets]
        erasure = ValueErasure.build(
            [self.subject_embeddings[i] for i in rows],
            [self._concepts[self.surgery.probes[i].concept_id].methods.adavd for i in rows], guidance,
            tuple(self.surgery.probes[i].text for i in rows)) if rows else None
        return _Plan(edit.embeddings, edit, erasure)

    def _refusal(self, concept_ids: Sequence[str], report: GenerationReport, stage: str = "prompt") -> ImageRefused:
        return ImageRefused(concept_ids, self.policy.refusal_message(concept_ids), report, stage)

    # -- generation -----------------------------------------------------------------------------------------------

    def _run(self, conditioning: TextEmbeddings, unconditional: TextEmbeddings | None, seeds: Sequence[int],
             per_prompt: int, erasure: ValueErasure | None, guidance_scale: float, pipe_kwargs: dict[str, Any]) -> Any:
        call: dict[str, Any] = dict(prompt_embeds=conditioning.sequence, num_images_per_prompt=per_prompt,
                                    guidance_scale=guidance_scale,
                                    generator=[torch.Generator("cpu").manual_seed(seed) for seed in seeds])
        if unconditional is not None:
            call["negative_prompt_embeds"] = unconditional.sequence
        if self._xl:
            call["pooled_prompt_embeds"] = conditioning.pooled
            if unconditional is not None:
                call["negative_pooled_prompt_embeds"] = unconditional.pooled
        with self.adavd.erasing(erasure):
            return self.pipe(**call, **pipe_kwargs).images

    def _as_pil(self, images: Any) -> list["Image"]:
        if isinstance(images, list):
            return images
        if isinstance(images, torch.Tensor):
            images = images.permute(0, 2, 3, 1).float().cpu().numpy()
        return self.pipe.numpy_to_pil(images)

    def __call__(self, prompt: str, *, num_images: int = 1, seed: int | None = None,
                 negative_prompt: str | None = None, guidance_scale: float | None = None,
                 **pipe_kwargs: Any) -> GuardedOutput:
        """Generate ``num_images`` images for one prompt; image i uses ``torch.Generator().manual_seed(seed + i)``.

        Other keyword arguments (``num_inference_steps``, ``height``, ``width``, ``output_type`` ...) go to the
        pipeline. Raises :class:`ImageRefused` when the policy refuses the prompt or an output.
        """
        reserved = sorted(set(pipe_kwargs) & set(_RESERVED))
        if reserved:
            raise TypeError(f"the guard computes {reserved} itself; pass prompt, negative_prompt, num_images and seed")
        if not isinstance(prompt, str):
            raise TypeError("the guard takes one prompt per call (use num_images for several images)")
        if num_images < 1:
            raise ValueError("num_images must be at least 1")
        if self.detectors and pipe_kwargs.get("output_type") == "latent":
            raise ValueError("the image check needs decoded images; output_type='latent' is not possible with it")
        seed = secrets.randbelow(2**31 - num_images) if seed is None else seed
        guidance_scale = self._default_guidance if guidance_scale is None else guidance_scale
        guidance = guidance_scale > 1 and self.pipe.unet.config.time_cond_proj_dim is None

        conditioning, unconditional = self._encode_request(prompt, negative_prompt, guidance)
        report = GenerationReport(prompt, seed)
        found = [presence for presence in self.surgery.presence(conditioning) if presence.active]
        for presence in found:
            action = self._concepts[presence.concept_id].action.type.value
            report.detections.append(ConceptDetection(presence.concept_id, action, presence.presence,
                                                      presence.best.alpha,
                                                      tuple(s.probe.text for s in presence.matched), "prompt"))
        refused = [d.concept_id for d in report.detections if d.action == ActionType.refuse.value]
        if refused:
            raise self._refusal(refused, report)
        steered = [p for p in found if self._concepts[p.concept_id].action.type == ActionType.steer]
        plan = self._plan(conditioning, steered, {}, guidance)
        report.surgery_strength = plan.surgery.strength
        report.erased_text, report.anchor_text = plan.surgery.erased_text, plan.surgery.anchor_text
        report.value_erasure = list(plan.value_erasure.labels) if plan.value_erasure else []
        images = self._run(plan.conditioning, unconditional, [seed_for_choice(seed, i) for i in range(num_images)], num_images,
                           plan.value_erasure, guidance_scale, pipe_kwargs)
        if self.detectors:
            images = self._check_images(images, report, conditioning, unconditional, steered, seed, guidance,
                                        guidance_scale, pipe_kwargs)
        return GuardedOutput(images, report)

    def _watchers(self, detector: str) -> list[Concept]:
        """The concepts whose visual feedback this image detector gives."""
        return [c for c in self._concepts.values()
                if c.methods.semantic_surgery.visual_feedback.enabled
                and c.methods.semantic_surgery.visual_feedback.detector == detector]

    def _check_images(self, images: Any, report: GenerationReport, conditioning: TextEmbeddings,
                      unconditional: TextEmbeddings | None, steered: Sequence[ConceptPresence], seed: int,
                      guidance: bool, guidance_scale: float, pipe_kwargs: dict[str, Any]) -> Any:
        """Semantic Surgery's visual feedback, settled by :mod:`guard.settle`.

        Every image detector scores every image; a flag is binarised (1 at or above the detector's threshold) and
        reaches the concepts that detector watches: a refused one refuses the request, steered ones are erased at
        ``max(ρ̂_joint, λ_vis)`` together with the prompt's own concepts and the image is regenerated once with the
        same seed, logged ones are reported. An image still flagged after that, or flagged by a detector that no
        steered or logged concept answers for, meets the policy's ``image_action`` (:func:`apply_image_action`).
        """
        watchers = {d.name: self._watchers(d.name) for d in self.detectors}
        thresholds = {d.name: d.threshold for d in self.detectors}

        def judge(items: Sequence[tuple[Attempt[_Plan | None], Any]]
                  ) -> list[Step[_Plan | None, dict[str, float]]]:
            pictures = self._as_pil(_batch([image for _, image in items]))
            scores = {d.name: d.scores(pictures) for d in self.detectors}
            flags = [[d.name for d in self.detectors if scores[d.name][j] >= d.threshold] for j in range(len(items))]
            if items[0][0].regenerations == 0:
                for name in dict.fromkeys(n for flagged in flags for n in flagged):
                    peak = max(scores[name][j] for j, flagged in enumerate(flags) if name in flagged)
                    for concept in watchers[name]:
                        report.detections.append(ConceptDetection(concept.id, concept.action.type.value, peak, None,
                                                                  (), "image"))
                refused = [c.id for flagged in flags for name in flagged for c in watchers[name]
                           if c.action.type == ActionType.refuse]
                if refused:
                    raise self._refusal(list(dict.fromkeys(refused)), report, stage="output")
            steps = []
            for j, (attempt, _) in enumerate(items):
                judgement = {name: values[j] for name, values in scores.items()}
                seen = {c.id: c.methods.semantic_surgery.visual_feedback.strength for name in flags[j]
                        for c in watchers[name] if c.action.type == ActionType.steer}
                answered = all(watchers[name] for name in flags[j])  # every flag reaches a steered/logged concept
                if not flags[j] or (answered and not seen):
                    steps.append(Step(OutputAction.send, judgement))
                elif seen and attempt.regenerations == 0:
                    # A concept found in the prompt too keeps its semantic presence next to λ_vis (the larger wins).
                    plan = self._plan(conditioning, steered, seen, guidance)
                    steps.append(Step(OutputAction.regenerate, judgement, plan))
                else:
                    steps.append(Step(OutputAction.block, judgement))
            return steps

        def decode(attempts: list[Attempt[_Plan | None]]) -> list[Any]:
            report.regenerated = [attempt.index for attempt in attempts]
            report.regeneration_strengths = [attempt.plan.surgery.strength for attempt in attempts]
            again: dict[int, Any] = {}
            groups: dict[tuple[str, ...], list[Attempt[_Plan]]] = {}
            for attempt in attempts:  # one UNet batch per set of AdaVD targets
                erasure = attempt.plan.value_erasure
                groups.setdefault(erasure.labels if erasure is not None else (), []).append(attempt)
            for group in groups.values():
                erasure = group[0].plan.value_erasure
                if erasure is not None:
                    report.value_erasure = list(dict.fromkeys([*report.value_erasure, *erasure.labels]))
                repeated = None if unconditional is None else TextEmbeddings.stack([unconditional] * len(group))
                images = self._run(TextEmbeddings.stack([a.plan.conditioning for a in group]), repeated,
                                   [seed_for_choice(seed, a.index) for a in group], 1, erasure, guidance_scale,
                                   pipe_kwargs)
                again.update({a.index: images[j] for j, a in enumerate(group)})
            return [again[attempt.index] for attempt in attempts]

        first = [(Attempt(i, None), images[i]) for i in range(len(images))]
        settled = settle(first, judge, decode)
        report.image_scores = {d.name: [s.judgement[d.name] for s in settled] for d in self.detectors}
        for s in settled:
            if s.regenerations:
                images[s.index] = s.output
        still_flagged = [s for s in settled if s.blocked is not None]
        if still_flagged:
            flagging = dict.fromkeys(name for s in still_flagged for name, score in s.judgement.items()
                                     if score >= thresholds[name])
            blamed = list(dict.fromkeys(c.id for name in flagging for c in watchers[name]))
            blamed = blamed or [f"image-{name}" for name in flagging]  # a detector that no concept answers for
            report.flagged_images = [s.index for s in still_flagged]
            report.image_action = self.policy.image_action
            if self.policy.image_action == "refuse":
                raise self._refusal(blamed, report, stage="output")
            images = apply_image_action(images, report.flagged_images, self.policy.image_action)
        return images


def apply_image_action(images: Any, flagged: Sequence[int], action: ImageAction) -> Any:
    """The one place a policy's ``image_action`` changes served images: ``blur`` or ``black`` replace each flagged
    image (in the pipeline's output type: PIL images, an array or a tensor batch); ``flag`` keeps it."""
    if action == "refuse":
        raise ValueError("a refused image is not served; raise the refusal instead")
    if action == "flag":
        return images
    for index in flagged:
        images[index] = _obscured(images[index], action)
    return images


def _obscured(image: Any, action: ImageAction) -> Any:
    """``image`` blacked out, or blurred with a Gaussian of radius 1/8 of its longer side (no shape survives)."""
    from PIL import Image, ImageFilter

    if action == "black":
        return Image.new(image.mode, image.size) if isinstance(image, Image.Image) else image * 0
    if isinstance(image, Image.Image):
        return image.filter(ImageFilter.GaussianBlur(radius=max(image.size) / 8))
    tensor = isinstance(image, torch.Tensor)
    pixels = image.permute(1, 2, 0).float().cpu().numpy() if tensor else np.asarray(image, dtype=np.float32)
    as_pil = Image.fromarray((pixels.clip(0, 1) * 255).round().astype(np.uint8).squeeze())
    blurred = np.asarray(_obscured(as_pil, action), dtype=np.float32).reshape(pixels.shape) / 255
    if tensor:
        return torch.from_numpy(blurred).permute(2, 0, 1).to(image.device, image.dtype)
    return blurred.astype(image.dtype)


def _batch(images: Sequence[Any]) -> Any:
    """Single images (PIL, or tensor / array slices of a pipeline batch) as one batch of their kind."""
    if isinstance(images[0], torch.Tensor):
        return torch.stack(list(images))
    if isinstance(images[0], np.ndarray):
        return np.stack(list(images))
    return list(images)


def model_fingerprint(pipe: GuardablePipeline) -> str:
    """What image calibrations are keyed by: a hash of everything they measured, the tokenizers, the text
    encoders and the cross-attention value projections. Weights are hashed in float16, so a model loaded in
    float32 on a CPU (where it was calibrated) and in float16 on a GPU (where it is served) have one fingerprint."""
    digest = hashlib.sha256(type(pipe).__name__.encode())
    for name in ("tokenizer", "tokenizer_2"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    modules = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    tensors = [(f"text{i}.{key}", value) for i, module in enumerate(modules) if module is not None
               for key, value in sorted(module.state_dict().items())]
    tensors += [(name, module.to_v.weight) for name, module in pipe.unet.named_modules()
                if getattr(module, "is_cross_attention", False)]
    with torch.no_grad():
        for key, value in tensors:
            digest.update(key.encode())
            digest.update(value.detach().to("cpu", torch.float16).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def load_image_pipeline(model: str | Path, device: str) -> GuardablePipeline:
    """A local Stable Diffusion 1.x/2.x/XL folder (or model reference), on ``device`` (float16 on CUDA);
    :class:`ModelError` when it cannot be loaded or is another kind of pipeline."""
    resolved = resolve(str(model))
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    try:
        pipe = DiffusionPipeline.from_pretrained(resolved.path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ModelError(f"cannot load image model '{model}': {err}") from err
    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline)):
        raise ModelError(f"'{model}' is a {type(pipe).__name__}; the image guard supports Stable Diffusion "
                         "1.x/2.x and XL pipelines")
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def guard_pipeline(pipe: GuardablePipeline, policy: Policy,
                   detectors: Sequence[ImageDetector] = ()) -> GuardedPipeline:
    """Install the policy on an existing pipeline; the returned handle generates, reports and can ``remove()``."""
    return GuardedPipeline(pipe, policy, detectors)


# -- serving --------------------------------------------------------------------------------------------------------


@dataclass
class ImageResult:
    images: list[bytes]  # PNG files
    report: GenerationReport
    width: int
    height: int


def parse_size(size: str | tuple[int, int] | None, multiple: int = 8) -> tuple[int, int] | None:
    """'WIDTHxHEIGHT' (OpenAI style) or (width, height); both must be positive multiples of ``multiple``."""
    if size is None:
        return None
    if isinstance(size, str):
        parts = size.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"size must look like '512x512', got '{size}'")
        size = (int(parts[0]), int(parts[1]))
    width, height = size
    if width <= 0 or height <= 0 or width % multiple or height % multiple:
        raise ValueError(f"width and height must be positive multiples of {multiple}, got {width}x{height}")
    return width, height


class ImageGuard:
    """A local Stable Diffusion folder loaded and guarded by a policy, for ``POST /v1/images/generations``.

    Thread-safe: calls are serialised (one pipeline, one GPU). Loading problems raise :class:`ModelError`.
    """

    def __init__(self, model: str | Path, policy: Policy, *, device: str | None = None,
                 nsfw_threshold: float | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipe = load_image_pipeline(model, self.device)
        self.model = str(model)
        self.fingerprint = model_fingerprint(pipe)
        self.detectors: tuple[ImageDetector, ...] = () if nsfw_threshold is None else (
            ImageNsfwDetector(nsfw_threshold),)
        self.guarded = self._guard(pipe, policy)
        self._lock = threading.Lock()

    @property
    def policy(self) -> Policy:
        return self.guarded.policy

    def _guard(self, pipe: GuardablePipeline, policy: Policy) -> GuardedPipeline:
        guarded = GuardedPipeline(pipe, policy, self.detectors, self.fingerprint)
        loaded = {d.name for d in self.detectors}
        unwatched = [f"{c.id} ({c.methods.semantic_surgery.visual_feedback.detector})" for c in guarded.concepts
                     if c.methods.semantic_surgery.visual_feedback.enabled
                     and c.methods.semantic_surgery.visual_feedback.detector not in loaded]
        if unwatched:
            logger.warning("visual feedback is off for %s: that image detector is not loaded (Open-NSFW: "
                           "--image-nsfw-threshold)", ", ".join(unwatched))
        return guarded

    def use_policy(self, policy: Policy) -> None:
        """Guard every later call with ``policy``, keeping the loaded weights (the server's policy hot reload).

        Waits for a running call. If the new policy cannot be installed, the old one is installed again and the
        error raised, so the pipeline is never left unguarded.
        """
        with self._lock:
            current = self.guarded
            current.remove()
            try:
                self.guarded = self._guard(current.pipe, policy)
            except Exception:
                self.guarded = self._guard(current.pipe, current.policy)
                raise

    def generate(self, prompt: str, n: int = 1, size: str | tuple[int, int] | None = None, seed: int | None = None,
                 steps: int | None = None, guidance_scale: float | None = None,
                 negative_prompt: str | None = None) -> ImageResult:
        """Generate ``n`` PNG images; raises :class:`ImageRefused` (a :class:`ConceptRefused`) when refused."""
        pipe = self.guarded.pipe
        dimensions = parse_size(size, pipe.vae_scale_factor)
        if dimensions is None:
            side = pipe.unet.config.sample_size * pipe.vae_scale_factor
            dimensions = (side, side)
        width, height = dimensions
        kwargs: dict[str, Any] = dict(width=width, height=height, output_type="pil")
        if steps is not None:
            if steps < 1:
                raise ValueError("steps must be at least 1")
            kwargs["num_inference_steps"] = steps
        with self._lock:
            try:
                output = self.guarded(prompt, num_images=n, seed=seed, negative_prompt=negative_prompt,
                                      guidance_scale=guidance_scale, **kwargs)
            except torch.OutOfMemoryError as err:
                raise GuardUnavailable(f"the image model ran out of memory: {err}") from err
        return ImageResult([_png(image) for image in output.images], output.report, width, height)


def _png(image: "Image") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
