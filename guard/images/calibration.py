"""Calibration of the image guard on the user's own pipeline: presence thresholds and AdaVD's b, per model.

The paper's Semantic Surgery thresholds (0.06 nudity, 0.30 styles ...) and AdaVD's b = 0.93 were measured on SD
1.4's CLIP ViT-L; another text encoder (SD 2.x's OpenCLIP, SDXL's pair, a fine-tune) puts concept and benign
prompts elsewhere. So both are measured on the served model, each as one ROC operating point:

* **presence threshold** t: the presence alpha (mean token cosine to the concept direction, best probe) of the
  shipped benign image prompts plus the concept's negatives, set at their conformal (1 - α) quantile
  (:func:`detectors.calibration.conformal_threshold`, as the text thresholds): a benign prompt like them is found
  with probability at most α. Recall is read on the concept's exemplars and aliases.
* **AdaVD b**: per prompt, the best token's cosine between its value and the concept's target values (mean over
  the cross-attention layers, best probe), at the same conformal quantile of the benign prompts: a token above b
  loses at least its whole component (s ≥ c/2 = 1 with the paper's c), so b is where tokens carrying the concept
  part from tokens of ordinary prompts.

The result is stored per :func:`guard.images.pipeline.model_fingerprint` and applied by
:meth:`guard.policy.Policy.image_concepts` when that model is served.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from detectors.calibration import DEFAULT_TARGET_FPR, benign_image_prompts, conformal_threshold
from guard.images.pipeline import GuardablePipeline, GuardedPipeline, model_fingerprint
from guard.policy import (
    Concept,
    ImageCalibratedConcept,
    ImageCalibration,
    ImageModelCalibration,
    Policy,
    concept_digest,
)

_BATCH = 32


def positives(concept: Concept) -> list[str]:
    """Prompts that carry the concept: its exemplars, then its aliases."""
    return list(dict.fromkeys([*concept.exemplars, *concept.aliases]))


class _Scorer:
    """Presence alphas and AdaVD token cosines of prompts, on one guarded pipeline."""

    def __init__(self, guarded: GuardedPipeline):
        self.guarded = guarded
        unet = guarded.pipe.unet
        self.values = [unet.get_submodule(name.removesuffix(".processor")).to_v for name in guarded.adavd.layers]
        probes = guarded.surgery.probes
        self.probe_rows = {cid: [i for i, p in enumerate(probes) if p.concept_id == cid]
                           for cid in dict.fromkeys(p.concept_id for p in probes)}
        subjects = torch.stack(guarded.subject_embeddings)
        with torch.no_grad():
            self.targets = [value(subjects.to(value.weight.dtype)).float() for value in self.values]

    def score(self, prompts: Sequence[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """concept id -> (presence alpha, best AdaVD token cosine), one value per prompt."""
        alphas = {cid: np.zeros(len(prompts)) for cid in self.probe_rows}
        cosines = {cid: np.zeros(len(prompts)) for cid in self.probe_rows}
        for start in range(0, len(prompts), _BATCH):
            batch = self.guarded.encode(list(prompts[start:start + _BATCH]))
            cos = torch.zeros(batch.sequence.shape[0], batch.sequence.shape[1], len(self.guarded.surgery.probes))
            with torch.no_grad():
                for value, targets in zip(self.values, self.targets):
                    token_values = value(batch.sequence.to(value.weight.dtype)).float()
                    cos += F.cosine_similarity(token_values.unsqueeze(-2), targets, dim=-1).cpu()
            cos /= len(self.values)
            best = cos[:, 1:].amax(dim=1)  # (prompts, probes): the best token after the start token
            for row in range(batch.sequence.shape[0]):
                for presence in self.guarded.surgery.presence(batch.rows(row)):
                    alphas[presence.concept_id][start + row] = presence.best.alpha
            for cid, rows in self.probe_rows.items():
                cosines[cid][start:start + len(best)] = best[:, rows].amax(dim=1).numpy()
        return {cid: (alphas[cid], cosines[cid]) for cid in self.probe_rows}


def _rate(scores: np.ndarray, threshold: float) -> float:
    return float(np.mean(scores >= threshold))


def calibrate_image_model(policy: Policy, pipe: GuardablePipeline, model: str,
                          target_fpr: float = DEFAULT_TARGET_FPR,
                          on_step: Callable[[int, int], None] | None = None) -> tuple[str, ImageModelCalibration]:
    """(model fingerprint, calibration of every concept of ``policy`` on ``pipe``); ``model`` says where it came
    from. Load ``policy`` with ``apply_calibration=False``: a stale calibration is what this replaces. ``on_step(done, total)`` reports progress, one step per concept. ``ValueError`` when the benign list is
    too small for ``target_fpr``."""
    corpus = benign_image_prompts()
    conformal_threshold(np.zeros(len(corpus)), target_fpr)  # fails now, before any encoding, if too small
    guarded = GuardedPipeline(pipe, policy)
    try:
        scorer = _Scorer(guarded)
        benign = scorer.score(corpus)
        entries: dict[str, ImageCalibratedConcept] = {}
        for done, concept in enumerate(policy.concepts, start=1):
            concept_benign = benign[concept.id]
            if concept.negatives:
                extra = scorer.score(concept.negatives)[concept.id]
                concept_benign = tuple(np.concatenate([a, b]) for a, b in zip(concept_benign, extra))
            found = scorer.score(positives(concept))[concept.id]
            alpha_benign, cos_benign = concept_benign
            threshold = min(max(conformal_threshold(alpha_benign, target_fpr), 0.0), 1.0)
            b = conformal_threshold(cos_benign, target_fpr)
            exemplars = len(dict.fromkeys(concept.exemplars))
            entries[concept.id] = ImageCalibratedConcept(
                digest=concept_digest(concept), presence_threshold=threshold,
                presence_recall=_rate(found[0], threshold),
                presence_exemplar_recall=_rate(found[0][:exemplars], threshold) if exemplars else None,
                presence_fpr=_rate(alpha_benign, threshold), adavd_b=b, adavd_recall=_rate(found[1], b),
                adavd_fpr=_rate(cos_benign, b), n_positives=len(found[0]), n_benign=len(alpha_benign))
            if on_step is not None:
                on_step(done, len(policy.concepts))
    finally:
        guarded.remove()
    calibration = ImageModelCalibration(model=model, pipeline=type(pipe).__name__, target_fpr=target_fpr,
                                        benign_corpus=f"guard/data/image-prompts/benign.txt ({len(corpus)} prompts) "
                                                      "+ the concept's negatives", concepts=entries)
    return model_fingerprint(pipe), calibration


def merged(existing: ImageCalibration | None, policy: Policy, fingerprint: str,
           entry: ImageModelCalibration) -> tuple[ImageCalibration, list[str]]:
    """``existing`` with this model's entry replaced; other models' entries are kept while every concept in them is
    unchanged (the dropped fingerprints are returned: they must be calibrated again)."""
    digests = {concept.id: concept_digest(concept) for concept in policy.concepts}
    models: dict[str, ImageModelCalibration] = {}
    dropped: list[str] = []
    for other, calibrated in (existing.models.items() if existing is not None else ()):
        if other == fingerprint:
            continue
        if all(digests.get(cid) == c.digest for cid, c in calibrated.concepts.items()):
            models[other] = calibrated
        else:
            dropped.append(other)
    models[fingerprint] = entry
    return ImageCalibration(policy=policy.name, models=models), dropped
