"""The policy's request classifier: every text detector of the policy, combined.

:class:`PolicyClassifier` combines the alias detector (names, however disguised) and the semantic
detector (meaning, via exemplars) under the policy's per-concept settings. Any failure inside a
detector surfaces as :class:`DetectorError` so callers can refuse the request (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np

from detectors.alias import AliasDetector
from detectors.base import Classification, ConceptScore, Detector
from detectors.encoder import CachedEncoder
from detectors.semantic import SemanticDetector, split_pieces
from guard.errors import DetectorError, ModelError
from guard.models import load_sentence_encoder
from guard.policy import Policy


class PolicyClassifier(Detector):
    """Index the policy once; classify any number of texts (e.g. all chat messages of a request) together.

    An alias hit scores 1.0 against the concept's semantic threshold, so alias and semantic evidence share one
    scale; a concept with an alias hit is reported by the alias detector alone.
    """

    name = "policy"

    def __init__(self, policy: Policy, show_progress: bool = False,
                 exemplar_vectors: Mapping[str, np.ndarray] | None = None,
                 query_cache: CachedEncoder | None = None):
        """``exemplar_vectors``: precomputed unit embeddings of exemplar texts (e.g. a large concept library
        embedded offline), so start-up does not re-encode them; anything missing is encoded.
        ``query_cache``: embed requests through this shared cache (erase-and-check: every detector of a
        certifier reads each erased version's vectors from one forward pass per batch)."""
        self.policy = policy
        try:
            self.encoder = load_sentence_encoder(policy.models.embedding)
        except ModelError as err:
            raise DetectorError(str(err)) from err
        self.query_cache = query_cache
        thresholds = {c.id: c.detection.semantic_threshold for c in policy.concepts}
        self.aliases = AliasDetector({c.id: c.aliases for c in policy.concepts if c.detection.aliases}, thresholds)
        # The description is a positive exemplar too: a concept defined only by name and description still works.
        self.semantic = SemanticDetector(
            self.encoder,
            {c.id: [*c.exemplars, c.description] for c in policy.concepts},
            {c.id: c.negatives for c in policy.concepts},
            thresholds,
            {c.id: c.detection.negative_margin for c in policy.concepts},
            show_progress=show_progress,
            vectors=exemplar_vectors,
            query_encoder=query_cache,
        )

    def detect(self, texts: Sequence[str]) -> Classification:
        with _fail_closed():
            return self._detect(texts)

    def detect_each(self, texts: Sequence[str]) -> list[Classification]:
        if self.query_cache is not None:  # one forward pass for the batch; each text then reads the cache
            with _fail_closed():
                self.query_cache.encode([piece for text in texts for piece in split_pieces([text])])
        return [self.detect([text]) for text in texts]

    def _detect(self, texts: Sequence[str]) -> Classification:
        results: dict[str, ConceptScore] = {s.concept_id: s for s in self.aliases.detect(texts).scores}
        for score in self.semantic.detect(texts).scores:
            results.setdefault(score.concept_id, score)
        return Classification(sorted(results.values(), key=lambda s: (not s.flagged, -s.score)))


@contextmanager
def _fail_closed() -> Iterator[None]:
    try:
        yield
    except DetectorError:
        raise
    except Exception as err:  # noqa: BLE001 - any detector fault must fail closed, with its cause
        raise DetectorError(f"prompt classification failed: {type(err).__name__}: {err}") from err
