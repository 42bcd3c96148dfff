"""The policy's request classifier: every text detector of the policy, combined.

:class:`PolicyClassifier` combines the alias detector (names, however disguised) and the semantic
detector (meaning, via exemplars) under the policy's per-concept settings. Any failure inside a
detector surfaces as :class:`DetectorError` so callers can refuse the request (fail closed).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from detectors.alias import AliasDetector
from detectors.base import Classification, ConceptScore
from detectors.semantic import SemanticDetector
from guard.errors import DetectorError, ModelError
from guard.models import load_sentence_encoder
from guard.policy import Policy


class PolicyClassifier:
    """Index the policy once; classify any number of texts (e.g. all chat messages of a request) together."""

    def __init__(self, policy: Policy, show_progress: bool = False,
                 exemplar_vectors: Mapping[str, np.ndarray] | None = None):
        """``exemplar_vectors``: precomputed unit embeddings of exemplar texts (e.g. a large concept library
        embedded offline), so start-up does not re-encode them; anything missing is encoded."""
        self.policy = policy
        self._concepts = {c.id: c for c in policy.concepts}
        try:
            self.encoder = load_sentence_encoder(policy.models.embedding)
        except ModelError as err:
            raise DetectorError(str(err)) from err
        self.aliases = AliasDetector({c.id: c.aliases for c in policy.concepts if c.detection.aliases})
        # The description is a positive exemplar too: a concept defined only by name and description still works.
        self.semantic = SemanticDetector(
            self.encoder,
            {c.id: [*c.exemplars, c.description] for c in policy.concepts},
            {c.id: c.negatives for c in policy.concepts},
            show_progress=show_progress,
            vectors=exemplar_vectors,
        )

    def classify(self, texts: Sequence[str]) -> Classification:
        try:
            return self._classify(texts)
        except DetectorError:
            raise
        except Exception as err:  # noqa: BLE001 - any detector fault must fail closed, with its cause
            raise DetectorError(f"prompt classification failed: {type(err).__name__}: {err}") from err

    def _classify(self, texts: Sequence[str]) -> Classification:
        results: dict[str, ConceptScore] = {}
        for hit in self.aliases.find("\n".join(texts)):
            if hit.concept_id not in results:
                results[hit.concept_id] = ConceptScore(hit.concept_id, 1.0, True, "alias",
                                                       f"alias '{hit.alias}' matched '{hit.matched}'")
        for hit in self.semantic.search(texts):
            if hit.concept_id in results:
                continue
            settings = self._concepts[hit.concept_id].detection
            vetoed = hit.negative_score > hit.score + settings.negative_margin
            flagged = hit.score >= settings.semantic_threshold and not vetoed
            evidence = f"'{_clip(hit.piece)}' ~ exemplar '{_clip(hit.exemplar)}'"
            if vetoed:
                evidence += f"; closer to negative '{_clip(hit.negative)}' ({hit.negative_score:.3f})"
            results[hit.concept_id] = ConceptScore(hit.concept_id, hit.score, flagged, "semantic", evidence)
        ordered = sorted(results.values(), key=lambda s: (not s.flagged, -s.score))
        return Classification(ordered)


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
