"""Semantic detector: nearest policy exemplars of a text in sentence-embedding space.

All exemplars of all concepts live in one faiss index built once per policy, so the cost of a query
grows with the index (sub-linearly once it switches to HNSW), not with a loop over concepts.
Negative exemplars (near misses) live in a second index and veto a concept when the text is closer
to one of that concept's negatives than to its positives.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import faiss
import numpy as np

from detectors.base import Classification, ConceptScore, Detector, clip
from detectors.encoder import Encoder

# Above this many vectors an approximate HNSW index keeps queries fast; below it exact search is cheap.
HNSW_MIN_VECTORS = 20_000
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")


@dataclass(frozen=True)
class SemanticHit:
    concept_id: str
    score: float  # cosine similarity of the closest positive exemplar
    exemplar: str
    piece: str  # the part of the request that matched
    negative_score: float  # cosine similarity of the closest negative exemplar of the same concept
    negative: str


class _LabelledIndex:
    def __init__(self, vectors: np.ndarray, labels: list[int], texts: list[str]):
        dim = vectors.shape[1]
        if len(vectors) >= HNSW_MIN_VECTORS:
            self.index = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efSearch = 128
        else:
            self.index = faiss.IndexFlatIP(dim)
        if len(vectors):
            self.index.add(vectors)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.texts = texts

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.index.ntotal)
        if k == 0:
            return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
        return self.index.search(queries, k)


def split_pieces(texts: Sequence[str], max_pieces: int = 64) -> list[str]:
    """Whole texts plus their sentences: a forbidden question buried in a long message still matches."""
    pieces: list[str] = []
    for text in texts:
        text = text.strip()
        if not text:
            continue
        pieces.append(text)
        sentences = [s.strip() for s in _SENTENCE_END.split(text) if len(s.strip()) > 3]
        if len(sentences) > 1:
            pieces.extend(sentences)
    return list(dict.fromkeys(pieces))[:max_pieces]


class SemanticDetector(Detector):
    """Flags a concept when a piece of the request is at least ``thresholds[concept]`` similar (cosine) to one
    of its exemplars, unless a negative exemplar of the concept is closer by more than its negative margin."""

    name = "semantic"

    def __init__(self, encoder: Encoder, positives: dict[str, list[str]], negatives: dict[str, list[str]],
                 thresholds: Mapping[str, float], negative_margins: Mapping[str, float], top_k: int = 256,
                 show_progress: bool = False, vectors: Mapping[str, np.ndarray] | None = None,
                 query_encoder: Encoder | None = None):
        """``vectors`` holds precomputed unit embeddings for some exemplar texts (a concept library embedded
        offline); every other exemplar is encoded with ``encoder``. Queries are encoded with ``query_encoder``
        (a shared cache, see :class:`detectors.encoder.CachedEncoder`) when given, else with ``encoder``."""
        self.encoder = encoder
        self.query_encoder = query_encoder or encoder
        self.thresholds = dict(thresholds)
        self.negative_margins = dict(negative_margins)
        self._precomputed = vectors or {}
        self.concept_ids = list(positives)
        self.top_k = top_k
        position = {cid: i for i, cid in enumerate(self.concept_ids)}
        self._positive = self._build(positives, position, show_progress)
        self._negative = self._build(negatives, position, show_progress)

    def _build(self, groups: dict[str, list[str]], position: dict[str, int], show_progress: bool) -> _LabelledIndex:
        texts: list[str] = []
        labels: list[int] = []
        for concept_id, items in groups.items():
            for item in items:
                texts.append(item)
                labels.append(position[concept_id])
        missing = list(dict.fromkeys(t for t in texts if t not in self._precomputed))
        encoded = dict(zip(missing, self._embed(self.encoder, missing, show_progress)))
        dim = self.encoder.get_embedding_dimension()
        vectors = np.zeros((len(texts), dim), np.float32)
        for row, text in enumerate(texts):
            vector = encoded[text] if text in encoded else self._precomputed[text]
            if vector.shape != (dim,):
                raise ValueError(f"precomputed embedding of {text!r} has shape {vector.shape}, expected ({dim},)")
            vectors[row] = vector
        return _LabelledIndex(vectors, labels, texts)

    def _embed(self, encoder: Encoder, texts: Sequence[str], show_progress: bool = False) -> np.ndarray:
        dim = self.encoder.get_embedding_dimension()
        if not texts:
            return np.zeros((0, dim), np.float32)
        vectors = encoder.encode(list(texts), batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=show_progress)
        return np.ascontiguousarray(vectors, dtype=np.float32)

    def detect(self, texts: Sequence[str]) -> Classification:
        """The closest exemplar of every concept near the request, flagged or not, strongest first."""
        scores = []
        for hit in self.search(texts):
            vetoed = hit.negative_score > hit.score + self.negative_margins[hit.concept_id]
            threshold = self.thresholds[hit.concept_id]
            evidence = f"'{clip(hit.piece)}' ~ exemplar '{clip(hit.exemplar)}'"
            if vetoed:
                evidence += f"; closer to negative '{clip(hit.negative)}' ({hit.negative_score:.3f})"
            scores.append(ConceptScore(concept_id=hit.concept_id, score=hit.score, threshold=threshold,
                                       flagged=hit.score >= threshold and not vetoed, detector=self.name,
                                       evidence=evidence))
        return Classification(sorted(scores, key=lambda s: (not s.flagged, -s.score)))

    def search(self, texts: Sequence[str]) -> list[SemanticHit]:
        """Best positive (and competing negative) exemplar per concept among the nearest neighbours."""
        pieces = split_pieces(texts)
        if not pieces:
            return []
        queries = self._embed(self.query_encoder, pieces)
        best: dict[int, tuple[float, int, int]] = {}  # concept -> (score, exemplar row, piece row)
        scores, rows = self._positive.search(queries, self.top_k)
        for p, (piece_scores, piece_rows) in enumerate(zip(scores, rows)):
            for score, row in zip(piece_scores, piece_rows):
                if row < 0:
                    continue
                concept = int(self._positive.labels[row])
                if concept not in best or score > best[concept][0]:
                    best[concept] = (float(score), int(row), p)
        negative_best: dict[int, tuple[float, int]] = {}
        if best and self._negative.index.ntotal:
            n_scores, n_rows = self._negative.search(queries, self.top_k)
            for piece_scores, piece_rows in zip(n_scores, n_rows):
                for score, row in zip(piece_scores, piece_rows):
                    if row < 0:
                        continue
                    concept = int(self._negative.labels[row])
                    if concept in best and (concept not in negative_best or score > negative_best[concept][0]):
                        negative_best[concept] = (float(score), int(row))
        hits = []
        for concept, (score, row, piece) in best.items():
            neg_score, neg_row = negative_best.get(concept, (-1.0, -1))
            hits.append(SemanticHit(self.concept_ids[concept], score, self._positive.texts[row], pieces[piece],
                                    neg_score, self._negative.texts[neg_row] if neg_row >= 0 else ""))
        return hits
