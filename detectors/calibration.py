"""Split conformal calibration of the semantic thresholds, as ECO prompts calibrates its prompt classifier.

For each concept the benign corpus (the shipped erase-and-check safe prompts plus the concept's own negatives) is
scored by the semantic detector, and the threshold is set just above the conformal (1 - α) quantile of those
scores: the k-th smallest with k = ceil((n + 1)(1 - α)). A new benign prompt exchangeable with the corpus is then
flagged with probability at most α. Benign scores are read before negative vetoes, so the rate holds even where
no negative is close. Recall is measured leave-one-out: each exemplar is scored by a detector built without it,
so a concept cannot look perfect by matching its own exemplars. No threshold goes below :data:`MIN_THRESHOLD`,
so a concept whose benign scores are all low never becomes "flag everything".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors.encoder import CachedEncoder
from detectors.harmful import SAFE_PROMPTS, read_prompts
from detectors.semantic import SemanticDetector
from guard.errors import DetectorError, ModelError
from guard.models import load_sentence_encoder
from guard.policy import CalibratedConcept, Calibration, Concept, Policy, concept_digest

BENIGN_IMAGE_PROMPTS = Path(__file__).resolve().parent.parent / "guard" / "data" / "image-prompts" / "benign.txt"
MIN_THRESHOLD = 0.3
DEFAULT_TARGET_FPR = 0.01
BENIGN_CORPUS = f"erase-and-check {SAFE_PROMPTS} + the concept's negatives"
_NO_MATCH = -1.0  # score of a concept none of whose exemplars is among a text's nearest neighbours


def benign_image_prompts() -> list[str]:
    """The shipped benign text-to-image prompts (written for this project, none names a concept of the shipped
    policies): the image guard's calibration corpus and the null-space UCE edit's prior."""
    try:
        lines = BENIGN_IMAGE_PROMPTS.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DetectorError(f"cannot read the benign image prompts {BENIGN_IMAGE_PROMPTS}: {err}") from err
    return [line.strip() for line in lines if line.strip()]


def conformal_threshold(benign_scores: Sequence[float] | np.ndarray, target_fpr: float) -> float:
    """Smallest threshold whose conformal false-positive rate is at most ``target_fpr``.

    That is the k-th smallest benign score, k = ceil((n + 1)(1 - α)), moved up by one float step: the detector
    flags ``score >= threshold``, so a benign score equal to the quantile must stay unflagged.
    """
    scores = np.sort(np.asarray(benign_scores, dtype=np.float64))
    _require_corpus(len(scores), target_fpr)
    return float(np.nextafter(scores[_rank(len(scores), target_fpr) - 1], np.inf))


def _rank(n: int, target_fpr: float) -> int:
    return math.ceil((n + 1) * (1.0 - target_fpr) - 1e-9)  # the tolerance keeps 400 * 0.99 from rounding up to 397


def _require_corpus(n: int, target_fpr: float) -> None:
    if not 0.0 < target_fpr < 1.0:
        raise ValueError(f"target false-positive rate must be between 0 and 1, got {target_fpr}")
    if _rank(n, target_fpr) > n:
        raise ValueError(f"{n} benign prompts cannot show a false-positive rate of {target_fpr}: "
                         f"it needs at least {math.ceil(1.0 / target_fpr) - 1}")


@dataclass(frozen=True)
class ConceptReport:
    """A concept's calibrated entry next to what its current threshold measures on the same data."""

    concept_id: str
    calibrated: CalibratedConcept
    current_threshold: float
    current_recall: float | None
    current_fpr: float


@dataclass(frozen=True)
class CalibrationResult:
    calibration: Calibration
    reports: list[ConceptReport]


def _positives(concept: Concept) -> list[str]:
    # As the policy classifier indexes them: the description is a positive exemplar too.
    return [*concept.exemplars, concept.description]


def _scores(detector: SemanticDetector, texts: Sequence[str], concept_id: str) -> tuple[np.ndarray, np.ndarray]:
    """(raw semantic score, flagged) of ``concept_id`` for each text judged alone."""
    scores = np.full(len(texts), _NO_MATCH)
    flagged = np.zeros(len(texts), dtype=bool)
    for i, classification in enumerate(detector.detect_each(texts)):
        for score in classification.scores:
            if score.concept_id == concept_id:
                scores[i], flagged[i] = score.score, score.flagged
    return scores, flagged


def _held_out(encoder: CachedEncoder, concept: Concept) -> tuple[np.ndarray, np.ndarray]:
    """(score, not vetoed) of each exemplar against a detector holding the concept's other positives only."""
    scores = np.zeros(len(concept.exemplars))
    not_vetoed = np.zeros(len(concept.exemplars), dtype=bool)
    for i, exemplar in enumerate(concept.exemplars):
        rest = [*concept.exemplars[:i], *concept.exemplars[i + 1:], concept.description]
        (scores[i],), (not_vetoed[i],) = _scores(_detector(encoder, concept, rest), [exemplar], concept.id)
    return scores, not_vetoed


def _rates(benign: np.ndarray, held_out: np.ndarray, not_vetoed: np.ndarray, threshold: float
           ) -> tuple[float | None, float]:
    """(recall of held-out exemplars, benign false-positive rate) at ``threshold``."""
    recall = float(np.mean((held_out >= threshold) & not_vetoed)) if len(held_out) else None
    return recall, float(np.mean(benign >= threshold))


def calibrate_policy(policy: Policy, target_fpr: float = DEFAULT_TARGET_FPR, min_threshold: float = MIN_THRESHOLD,
                     on_step: Callable[[int, int], None] | None = None) -> CalibrationResult:
    """Calibrate every concept of ``policy``; ``on_step(done, total)`` reports progress (one step per concept).

    Raises :class:`DetectorError` when the encoder cannot be loaded and ``ValueError`` when the corpus is too small
    for ``target_fpr``.
    """
    corpus = read_prompts(SAFE_PROMPTS)
    concepts = policy.concepts
    _require_corpus(len(corpus), target_fpr)  # before minutes of encoding, not after
    try:
        encoder = CachedEncoder(load_sentence_encoder(policy.models.embedding), capacity=1 << 20)
    except ModelError as err:
        raise DetectorError(str(err)) from err
    entries: dict[str, CalibratedConcept] = {}
    reports: list[ConceptReport] = []
    for done, concept in enumerate(concepts, start=1):
        benign_texts = [*corpus, *concept.negatives]
        encoder.encode(benign_texts)  # one batched pass; the detector then reads the cache text by text
        scorer = _detector(encoder, concept, _positives(concept))
        benign, _ = _scores(scorer, benign_texts, concept.id)
        threshold = min(max(conformal_threshold(benign, target_fpr), min_threshold), 1.0)
        held_out, not_vetoed = _held_out(encoder, concept)
        recall, fpr = _rates(benign, held_out, not_vetoed, threshold)
        current = concept.detection.semantic_threshold
        current_recall, current_fpr = _rates(benign, held_out, not_vetoed, current)
        entry = CalibratedConcept(digest=concept_digest(concept), semantic_threshold=threshold, recall=recall, fpr=fpr,
                                  n_positives=len(held_out), n_benign=len(benign))
        entries[concept.id] = entry
        reports.append(ConceptReport(concept.id, entry, current, current_recall, current_fpr))
        if on_step is not None:
            on_step(done, len(concepts))
    calibration = Calibration(policy=policy.name, embedding=policy.models.embedding, target_fpr=target_fpr,
                              min_threshold=min_threshold, benign_corpus=f"{BENIGN_CORPUS} ({len(corpus)} prompts)",
                              concepts=entries)
    return CalibrationResult(calibration, reports)


def _detector(encoder: CachedEncoder, concept: Concept, positives: list[str]) -> SemanticDetector:
    """A one-concept semantic detector that flags any match (threshold -1), so ``flagged`` only says 'not vetoed'."""
    return SemanticDetector(encoder, {concept.id: positives}, {concept.id: concept.negatives}, {concept.id: _NO_MATCH},
                            {concept.id: concept.detection.negative_margin}, query_encoder=encoder)
