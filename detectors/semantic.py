"""Semantic detector: nearest policy exemplars of a text in sentence-embedding space.

All exemplars of all concepts live in one faiss index built once per policy, so the cost of a query
grows with the index (sub-linearly once it switches to HNSW), not with a loop over concepts.
Negative exemplars (near misses) live in a second index. A negative vetoes only the piece of the request
it is closer to: one harmless sentence near a negative cannot hide another sentence that clearly matches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import faiss
import numpy as np

from detectors.base import Classification, ConceptScore, Detector, clip
from detectors.encoder import Encoder
from detectors.pieces import Piece, split_pieces

# Above this many vectors an approximate HNSW index keeps queries fast; below it exact search is cheap.
HNSW_MIN_VECTORS = 20_000


@dataclass(frozen=True)
class SemanticHit:
    concept_id: str
    score: float  # cosine similarity of the closest positive exemplar
    exemplar: str
    piece: str  # the part of the request that matched
    source: int  # which text (chat message) the piece comes from
    negative_score: float  # the piece's closest negative exemplar of the same concept (-1.0: not compared)
    negative: str
    vetoed: bool  # every piece reaching the threshold is closer to a negative; this is the best of them


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


class SemanticDetector(Detector):
    """Flags a concept when a piece of the request is at least ``thresholds[concept]`` similar (cosine) to one
    of its exemplars, unless that same piece is closer to a negative exemplar of the concept by more than its
    negative margin. The concept scores its best piece that is not vetoed (its best vetoed one if all are)."""

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
        self._position = {cid: i for i, cid in enumerate(self.concept_ids)}
        self._positive = self._build(positives, self._position, show_progress)
        self._negative = self._build(negatives, self._position, show_progress)
        self._threshold_of = np.array([self.thresholds[cid] for cid in self.concept_ids], np.float64)
        self._margin_of = np.array([self.negative_margins[cid] for cid in self.concept_ids], np.float64)
        # Negatives are compared exactly, per concept, only for the pieces that reach a concept's threshold.
        total = self._negative.index.ntotal
        self._negative_vectors = self._negative.index.reconstruct_n(0, total) if total else None
        grouped: dict[int, list[int]] = {}
        for row, concept in enumerate(self._negative.labels.tolist()):
            grouped.setdefault(concept, []).append(row)
        self._negative_rows = {c: np.asarray(rows, np.int64) for c, rows in grouped.items()}

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

    def negative_vectors(self, concept_id: str) -> dict[str, np.ndarray]:
        """The concept's negative exemplars and their unit embeddings, as indexed."""
        rows = self._negative_rows.get(self._position[concept_id], np.zeros(0, np.int64))
        return {self._negative.texts[row]: self._negative_vectors[row] for row in rows.tolist()}

    def embed_pieces(self, pieces: Sequence[Piece]) -> np.ndarray:
        """All pieces of a request in one batched encoder call."""
        return self._embed(self.query_encoder, [piece.text for piece in pieces])

    def detect(self, texts: Sequence[str]) -> Classification:
        """The closest exemplar of every concept near the request, flagged or not, strongest first."""
        pieces = split_pieces(texts)
        return self.classify(self.search_pieces(pieces, self.embed_pieces(pieces)))

    def classify(self, hits: Sequence[SemanticHit]) -> Classification:
        scores = []
        for hit in hits:
            threshold = self.thresholds[hit.concept_id]
            evidence = f"'{clip(hit.piece)}' ~ exemplar '{clip(hit.exemplar)}'"
            if hit.vetoed:
                evidence += f"; closer to negative '{clip(hit.negative)}' ({hit.negative_score:.3f})"
            scores.append(ConceptScore(concept_id=hit.concept_id, score=hit.score, threshold=threshold,
                                       flagged=hit.score >= threshold and not hit.vetoed, detector=self.name,
                                       evidence=evidence))
        return Classification(sorted(scores, key=lambda s: (not s.flagged, -s.score)))

    def search_pieces(self, pieces: Sequence[Piece], queries: np.ndarray) -> list[SemanticHit]:
        """One hit per concept among the pieces' nearest exemplars: its best piece not vetoed by that piece's
        own closest negative, else its best vetoed piece, else (nothing reaches the threshold) its best piece."""
        if not pieces:
            return []
        scores, rows = self._positive.search(queries, self.top_k)
        valid = rows >= 0
        piece = np.broadcast_to(np.arange(len(pieces))[:, None], rows.shape)[valid]
        row, score = rows[valid], scores[valid]
        concept = self._positive.labels[row]
        # Keep the best exemplar of each (concept, piece) pair; pairs end up grouped by concept, best first.
        order = np.lexsort((-score, piece, concept))
        key = concept[order] * len(pieces) + piece[order]
        order = order[np.r_[True, key[1:] != key[:-1]]]
        order = order[np.lexsort((-score[order], concept[order]))]
        piece, row, score, concept = piece[order], row[order], score[order], concept[order]
        above = score >= self._threshold_of[concept]
        negative_score = np.full(len(order), -1.0, np.float32)
        negative_row = np.full(len(order), -1, np.int64)
        for c in np.unique(concept[above]).tolist():
            negatives = self._negative_rows.get(c)
            if negatives is None:
                continue
            candidates = np.flatnonzero(above & (concept == c))
            similarity = queries[piece[candidates]] @ self._negative_vectors[negatives].T
            negative_score[candidates] = similarity.max(axis=1)
            negative_row[candidates] = negatives[similarity.argmax(axis=1)]
        vetoed = above & (negative_score > score + self._margin_of[concept])
        # Per concept, the first pair by: above and not vetoed, then above (vetoed), then the best score.
        rank = np.where(above & ~vetoed, 0, np.where(above, 1, 2))
        chosen = np.lexsort((np.arange(len(order)), rank, concept))
        chosen = chosen[np.r_[True, concept[chosen][1:] != concept[chosen][:-1]]]
        hits = []
        for i in chosen.tolist():
            source = pieces[int(piece[i])]
            neg = int(negative_row[i])
            hits.append(SemanticHit(self.concept_ids[int(concept[i])], float(score[i]),
                                    self._positive.texts[int(row[i])], source.text, source.source,
                                    float(negative_score[i]), self._negative.texts[neg] if neg >= 0 else "",
                                    bool(vetoed[i])))
        return hits
