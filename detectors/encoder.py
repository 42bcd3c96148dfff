"""Sentence embeddings shared by the detectors: the encoder interface and a caching wrapper around it."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from guard.errors import DetectorError


class Encoder(Protocol):
    """The part of a SentenceTransformer the detectors use."""

    def get_embedding_dimension(self) -> int: ...

    def encode(self, sentences: Sequence[str], batch_size: int = ..., convert_to_numpy: bool = ...,
               normalize_embeddings: bool = ..., show_progress_bar: bool = ...) -> np.ndarray: ...


class CachedEncoder:
    """A SentenceTransformer stand-in that remembers recent vectors.

    All detectors of one erase-and-check certifier embed through the same instance, and each batch is prefetched
    in one forward pass, so the policy detectors and the harmful head never embed the same erased version twice.
    ``capacity=0`` remembers nothing between calls (benchmarks use it so every prompt pays its own way).
    """

    def __init__(self, encoder: Encoder, capacity: int = 16_384):
        self.encoder = encoder
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):  # noqa: ANN201 - the wrapped encoder's tokenizer
        return self.encoder.tokenizer

    def get_embedding_dimension(self) -> int:
        return int(self.encoder.get_embedding_dimension())

    def clear(self) -> None:
        """Forget every vector, so the next prompt pays for its own embeddings (benchmarks of a fresh prompt)."""
        with self._lock:
            self._vectors.clear()

    def encode(self, sentences: Sequence[str], batch_size: int = 64, convert_to_numpy: bool = True,
               normalize_embeddings: bool = True, show_progress_bar: bool = False) -> np.ndarray:
        """Unit-length float32 vectors, one row per sentence; only unseen sentences reach the model."""
        if not (convert_to_numpy and normalize_embeddings):
            raise DetectorError("the caching sentence encoder only returns normalised numpy vectors")
        sentences = list(sentences)
        with self._lock:
            known = {s: self._vectors[s] for s in sentences if s in self._vectors}
        missing = list(dict.fromkeys(s for s in sentences if s not in known))
        if missing:  # the model runs outside the lock: other requests keep reading the cache meanwhile
            fresh = self.encoder.encode(missing, batch_size=batch_size, convert_to_numpy=True,
                                        normalize_embeddings=True, show_progress_bar=show_progress_bar)
            known.update(zip(missing, np.asarray(fresh, dtype=np.float32)))
        rows = [known[s] for s in sentences]
        with self._lock:
            for sentence in dict.fromkeys(sentences):
                self._vectors[sentence] = known[sentence]
                self._vectors.move_to_end(sentence)
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)
        if not rows:
            return np.zeros((0, self.get_embedding_dimension()), np.float32)
        return np.ascontiguousarray(np.stack(rows), dtype=np.float32)
