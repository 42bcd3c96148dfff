"""The one detector interface: texts in, per-concept scored evidence out.

Every text detector (alias, semantic, the harmful-request head, the policy's combined classifier) implements
:class:`Detector`, so the guard, certification and anything plugged in later read evidence the same way. Every
score carries the threshold it is compared against, which puts all detectors on one scale: the margin
``score - threshold``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from PIL.Image import Image


@dataclass(frozen=True)
class ConceptScore:
    """One concept's strongest evidence. ``flagged`` implies ``score >= threshold``; a score at or above its
    threshold can still be unflagged when other evidence vetoes it (a closer negative exemplar)."""

    concept_id: str
    score: float
    threshold: float
    flagged: bool
    detector: str  # the reporting detector's name: "alias", "semantic", "harmful_classifier", ...
    evidence: str

    @property
    def margin(self) -> float:
        """How far the score is above (> 0) or below (< 0) its threshold: comparable across detectors."""
        return self.score - self.threshold


@dataclass(frozen=True)
class Classification:
    scores: list[ConceptScore] = field(default_factory=list)  # strongest first

    @classmethod
    def ranked(cls, scores: Sequence[ConceptScore]) -> "Classification":
        """Scores of several detectors in the one order: flagged first, then by margin (one scale for all)."""
        return cls(sorted(scores, key=lambda s: (not s.flagged, -s.margin)))

    @property
    def flagged(self) -> list[ConceptScore]:
        return [s for s in self.scores if s.flagged]

    @property
    def flagged_ids(self) -> list[str]:
        return [s.concept_id for s in self.scores if s.flagged]


@runtime_checkable
class Detector(Protocol):
    """Says which concepts texts touch, with scored evidence. Subclass it to inherit :meth:`detect_each`."""

    name: str

    def detect(self, texts: Sequence[str]) -> Classification:
        """What the texts of one request (e.g. every message of a chat) touch, judged together."""
        ...

    def detect_each(self, texts: Sequence[str]) -> list[Classification]:
        """One classification per text, each text a request of its own.

        Certification classifies many erased versions at once; detectors that can share one model pass across
        such a batch override this.
        """
        return [self.detect([text]) for text in texts]


class CombinedDetector(Detector):
    """Every detector's evidence together: a text is flagged when any of them flags it (``filter: both``)."""

    def __init__(self, detectors: Sequence[Detector], name: str):
        if not detectors:
            raise ValueError("CombinedDetector needs at least one detector")
        self.detectors = list(detectors)
        self.name = name

    def detect(self, texts: Sequence[str]) -> Classification:
        return _merged([detector.detect(texts) for detector in self.detectors])

    def detect_each(self, texts: Sequence[str]) -> list[Classification]:
        columns = [detector.detect_each(texts) for detector in self.detectors]
        return [_merged(row) for row in zip(*columns)]


def _merged(classifications: Sequence[Classification]) -> Classification:
    return Classification.ranked([score for classification in classifications for score in classification.scores])


def clip(text: str, limit: int = 60) -> str:
    """Shorten quoted text for evidence strings."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@runtime_checkable
class ImageDetector(Protocol):
    """Scores generated images for what it watches (one score per image, in [0, 1]); an image is flagged at or
    above ``threshold``. Policy concepts name it in ``methods.semantic_surgery.visual_feedback.detector``."""

    name: str
    threshold: float

    def scores(self, images: Sequence["Image"]) -> list[float]:
        """One score per image, in order."""
        ...
