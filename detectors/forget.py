"""GUARD's forbidden-token extraction: the forget-store answers closest to a request, and what of them to block.

For every concept a request is penalised for, the sentence encoder compares the request with the concept's forget
store — the policy's passages and answers and the model's own answers from its profile — *answers, not questions*,
as GUARD does, and the closest ``top_k`` entries give the request's forbidden terms: their names, name parts and
distinctive words (:func:`detectors.terms.distinctive_ngrams`). The embeddings of the store are computed once per
policy; a request costs one encoding and one small matrix product per concept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from detectors.encoder import Encoder
from detectors.terms import distinctive_ngrams
from guard.errors import DetectorError
from guard.policy import ForgetEntry, Policy


class ForgetRetriever:
    """Per-concept forget stores, embedded once; ``terms`` gives a request's forbidden terms."""

    def __init__(self, policy: Policy, encoder: Encoder, query_encoder: Encoder | None = None):
        """``query_encoder`` embeds requests (the classifier's LRU cache: the prompt check has just embedded them);
        the store itself is embedded once with ``encoder``."""
        self._encoder = encoder
        self._query_encoder = query_encoder or encoder
        self._entries: dict[str, list[ForgetEntry]] = {}
        self._vectors: dict[str, np.ndarray] = {}
        self._top_k = {c.id: c.methods.token_penalty.forget_top_k for c in policy.concepts}
        for concept in policy.concepts:
            entries = concept.forget_entries
            if entries and self._top_k[concept.id]:
                self._entries[concept.id] = entries
                self._vectors[concept.id] = self._embed([e.text for e in entries])

    def _embed(self, texts: Sequence[str], encoder: Encoder | None = None) -> np.ndarray:
        try:
            return np.asarray((encoder or self._encoder).encode(list(texts), convert_to_numpy=True, normalize_embeddings=True),
                              dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - an encoder failure must fail closed
            raise DetectorError(f"forget-store retrieval failed: {err}") from err

    @property
    def concept_ids(self) -> list[str]:
        """Concepts with a forget store."""
        return list(self._entries)

    def retrieve(self, texts: Sequence[str], concept_ids: Sequence[str]) -> dict[str, list[ForgetEntry]]:
        """The ``top_k`` forget entries of each concept closest to the request (its texts joined), best first."""
        wanted = [cid for cid in concept_ids if cid in self._entries]
        if not wanted or not any(t.strip() for t in texts):
            return {}
        query = self._embed(["\n".join(texts)], self._query_encoder)[0]
        found = {}
        for concept_id in wanted:
            similarity = self._vectors[concept_id] @ query
            order = np.argsort(-similarity)[: self._top_k[concept_id]]
            found[concept_id] = [self._entries[concept_id][i] for i in order]
        return found

    def terms(self, texts: Sequence[str], concept_ids: Sequence[str]) -> tuple[str, ...]:
        """The request's forbidden terms: the distinctive n-grams of its closest forget entries."""
        found: dict[str, None] = {}
        for entries in self.retrieve(texts, concept_ids).values():
            for entry in entries:
                found.update(dict.fromkeys(distinctive_ngrams(entry.text)))
        return tuple(found)
