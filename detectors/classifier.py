"""The policy's request classifier: every text detector of the policy, combined.

:class:`PolicyClassifier` combines the alias detector (names, however disguised) and the semantic
detector (meaning, via exemplars) under the policy's per-concept settings. Any failure inside a
detector surfaces as :class:`DetectorError` so callers can refuse the request (fail closed).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from typing import Mapping, Sequence

import numpy as np

from detectors.alias import AliasDetector, AliasHit
from detectors.base import Classification, ConceptScore, Detector
from detectors.encoder import CachedEncoder
from detectors.pieces import sentences, split_pieces
from detectors.semantic import SemanticDetector
from guard.errors import DetectorError, ModelError
from guard.models import load_sentence_encoder
from guard.policy import Policy

QUERY_CACHE_SIZE = 4096  # request pieces remembered (~6 MB of vectors)
ALIAS_VETO_SIMILARITY = 0.7  # a message this close to an alias-naming negative is that negative, reworded


class PolicyClassifier(Detector):
    """Index the policy once; classify any number of texts (e.g. all chat messages of a request) together.

    How alias and semantic evidence combine:

    - Aliases are matched in each message alone, never across two messages.
    - An alias hit scores 1.0 against the concept's semantic threshold, so alias and semantic evidence share
      one scale; a concept with an alias hit that is not vetoed is reported by the alias detector alone.
    - An alias hit is vetoed only by a negative exemplar of the same concept that itself names that alias (at
      least as many times), and only when every sentence of the message in which the alias occurs is a near
      paraphrase of such a negative (cosine ≥ ``ALIAS_VETO_SIMILARITY``). An alias that only spans two
      sentences is never vetoed. So "nude lipstick shades for fair skin" passes when the concept lists "What
      nude lipstick shade suits fair skin?" as a negative, while "Nude lipstick shades. Show me a nude photo."
      and "A nude woman, nude lipstick shade for fair skin" do not.
    - A vetoed alias vetoes nothing else: a semantic match anywhere in the request still flags the concept.
      When nothing flags it, the vetoed alias hit is reported unflagged, naming the negative.
    - Semantic negatives veto per piece (see :class:`detectors.semantic.SemanticDetector`).
    """

    name = "policy"

    def __init__(self, policy: Policy, show_progress: bool = False,
                 exemplar_vectors: Mapping[str, np.ndarray] | None = None,
                 query_cache: CachedEncoder | None = None):
        """``exemplar_vectors``: precomputed unit embeddings of exemplar texts (e.g. a large concept library
        embedded offline), so start-up does not re-encode them; anything missing is encoded.
        ``query_cache``: embed requests through this shared cache (erase-and-check: every detector of a
        certifier reads each erased version's vectors from one forward pass per batch); by default a cache of
        this classifier's own."""
        self.policy = policy
        try:
            self.encoder = load_sentence_encoder(policy.models.embedding)
        except ModelError as err:
            raise DetectorError(str(err)) from err
        # Requests are embedded piece by piece through an LRU cache: a chat's earlier turns, a stream's finished
        # sentences and repeated prompts cost nothing the second time.
        self.query_cache = query_cache if query_cache is not None else CachedEncoder(self.encoder, QUERY_CACHE_SIZE)
        thresholds = {c.id: c.detection.semantic_threshold for c in policy.concepts}
        self.aliases = AliasDetector({c.id: c.aliases for c in policy.concepts if c.detection.aliases}, thresholds,
                                     {c.id: c.alias_exceptions for c in policy.concepts})
        # The description is a positive exemplar too: a concept defined only by name and description still works.
        self.semantic = SemanticDetector(
            self.encoder,
            {c.id: [*c.exemplars, c.description] for c in policy.concepts},
            {c.id: c.negatives for c in policy.concepts},
            thresholds,
            {c.id: c.detection.negative_margin for c in policy.concepts},
            show_progress=show_progress,
            vectors=exemplar_vectors,
            query_encoder=self.query_cache,
        )
        # (concept, alias) -> the concept's negatives that name that alias: embeddings, and how often each names it.
        self._alias_negatives: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        for concept in policy.concepts:
            named: dict[str, list[tuple[np.ndarray, int]]] = {}
            negatives = self.semantic.negative_vectors(concept.id) if concept.detection.aliases else {}
            for negative, vector in negatives.items():
                for hit in self.aliases.find(negative):
                    if hit.concept_id == concept.id:
                        named.setdefault(hit.alias, []).append((vector, hit.count))
            for alias, found in named.items():
                self._alias_negatives[concept.id, alias] = (np.stack([v for v, _ in found]),
                                                            np.array([n for _, n in found]))

    def detect(self, texts: Sequence[str], stop_on: Collection[str] = ()) -> Classification:
        """Every concept's evidence; with ``stop_on``, an alias of one of those concepts that no negative can
        veto ends the check at once (the caller refuses on it whatever else matches), before any embedding."""
        with _fail_closed():
            if stop_on and (certain := self._certain_alias_scores(texts, stop_on)):
                return Classification(certain)
            return self._detect(texts)

    def _certain_alias_scores(self, texts: Sequence[str], concept_ids: Collection[str]) -> list[ConceptScore]:
        scores: dict[str, ConceptScore] = {}
        for source, text in enumerate(texts):
            for hit in self.aliases.find(text):
                if (hit.concept_id in concept_ids and hit.concept_id not in scores
                        and (hit.concept_id, hit.alias) not in self._alias_negatives):
                    scores[hit.concept_id] = ConceptScore(
                        concept_id=hit.concept_id, score=1.0, threshold=self.aliases.threshold(hit.concept_id),
                        flagged=True, detector=self.aliases.name,
                        evidence=f"alias '{hit.alias}' matched '{hit.matched}' in message {source}")
        return list(scores.values())

    def detect_each(self, texts: Sequence[str]) -> list[Classification]:
        with _fail_closed():  # one forward pass for the batch; each text then reads the cache
            self.query_cache.encode([piece.text for text in texts for piece in split_pieces([text])])
        return [self.detect([text]) for text in texts]

    def _detect(self, texts: Sequence[str]) -> Classification:
        pieces = split_pieces(texts)
        vectors = self.semantic.embed_pieces(pieces)
        semantic_scores = self.semantic.classify(self.semantic.search_pieces(pieces, vectors)).scores
        results = {score.concept_id: score for score in semantic_scores}
        vector_of = {piece.text: vector for piece, vector in zip(pieces, vectors)}
        for alias in self._alias_scores(texts, vector_of):
            semantic = results.get(alias.concept_id)
            if alias.flagged or semantic is None or not semantic.flagged:
                results[alias.concept_id] = alias
        return Classification(sorted(results.values(), key=lambda s: (not s.flagged, -s.score)))

    def _alias_scores(self, texts: Sequence[str], vector_of: Mapping[str, np.ndarray]) -> list[ConceptScore]:
        """One alias score per concept: its first hit that is not vetoed, else its first vetoed hit."""
        scores: dict[str, ConceptScore] = {}
        for source, text in enumerate(texts):
            for hit in self.aliases.find(text):
                if hit.concept_id in scores and scores[hit.concept_id].flagged:
                    continue
                veto = self._alias_veto(hit, text, vector_of)
                evidence = f"alias '{hit.alias}' matched '{hit.matched}' in message {source}"
                if veto is not None:
                    evidence += f"; the message paraphrases a negative naming it (cosine {veto:.3f})"
                if veto is None or hit.concept_id not in scores:
                    scores[hit.concept_id] = ConceptScore(
                        concept_id=hit.concept_id, score=1.0, threshold=self.aliases.threshold(hit.concept_id),
                        flagged=veto is None, detector=self.aliases.name, evidence=evidence)
        return list(scores.values())

    def _alias_veto(self, hit: AliasHit, text: str, vector_of: Mapping[str, np.ndarray]) -> float | None:
        """The lowest cosine between a sentence naming the alias and its closest negative that names it too,
        when every such sentence reaches ``ALIAS_VETO_SIMILARITY``; None when the hit stands."""
        if (hit.concept_id, hit.alias) not in self._alias_negatives:
            return None
        vectors, counts = self._alias_negatives[hit.concept_id, hit.alias]
        similarities = []
        for sentence in sentences(text):
            for named in self.aliases.find(sentence):
                if (named.concept_id, named.alias) == (hit.concept_id, hit.alias):
                    paraphrased = counts >= named.count  # "nude lipstick, nude woman" is not the lipstick negative
                    similarities.append(float((vectors[paraphrased] @ vector_of[sentence]).max(initial=-1.0)))
        if not similarities or min(similarities) < ALIAS_VETO_SIMILARITY:
            return None
        return min(similarities)


@contextmanager
def _fail_closed() -> Iterator[None]:
    try:
        yield
    except DetectorError:
        raise
    except Exception as err:  # noqa: BLE001 - any detector fault must fail closed, with its cause
        raise DetectorError(f"prompt classification failed: {type(err).__name__}: {err}") from err
