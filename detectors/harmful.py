"""Harmful-request classifier: a logistic-regression head on MiniLM sentence embeddings.

It reports one pseudo-concept, ``harmful``, whatever concepts the policy lists. It is the shipped filter for erase-and-check (:mod:`guard.certification`), standing in for the paper's DistilBERT
classifier: it runs in milliseconds on a CPU, and the embedding pass it needs is shared with the policy's
semantic detector. The head (``guard/data/harmful_head.npz``, a few KB) is trained by
``benchmarks/train_harmful_head.py`` on the erase-and-check training prompts (Kumar et al., MIT license,
copied to ``guard/data/erase-and-check/``). The file also records which prompts were held out of training,
so the benchmark evaluates on prompts the head never saw.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from detectors.base import Classification, ConceptScore, Detector, clip
from detectors.encoder import Encoder
from detectors.pieces import split_pieces
from guard.errors import DetectorError, ModelError
from guard.models import load_sentence_encoder

DATA_DIR = Path(__file__).resolve().parent.parent / "guard" / "data"
HEAD_FILE = DATA_DIR / "harmful_head.npz"
TRAINING_DATA_DIR = DATA_DIR / "erase-and-check"
HARMFUL_PROMPTS = "harmful_prompts_train.txt"
SAFE_PROMPTS = "safe_prompts_train.txt"


def read_prompts(name: str) -> list[str]:
    """Distinct non-empty prompts of one training file, in file order (the safe file repeats a few)."""
    path = TRAINING_DATA_DIR / name
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DetectorError(f"cannot read training prompts {path}: {err}") from err
    return list(dict.fromkeys(line.strip() for line in lines if line.strip()))


def prompts_digest(prompts: Sequence[str]) -> str:
    """Fingerprint of a prompt list, stored with the head so a changed data file cannot skew the held-out split."""
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class HarmfulHead:
    weight: np.ndarray  # (dim,) float32
    bias: float
    threshold: float  # a prompt is harmful when weight·embedding + bias exceeds this logit
    encoder: str  # model reference whose normalised embeddings the head was trained on
    seed: int
    held_out_harmful: np.ndarray  # indices into read_prompts(HARMFUL_PROMPTS) never used for training
    held_out_safe: np.ndarray  # indices into read_prompts(SAFE_PROMPTS) never used for training
    harmful_digest: str
    safe_digest: str

    def save(self, path: Path = HEAD_FILE) -> None:
        np.savez_compressed(path, weight=self.weight.astype(np.float32), bias=np.float32(self.bias),
                            threshold=np.float32(self.threshold), encoder=np.str_(self.encoder),
                            seed=np.int64(self.seed), held_out_harmful=self.held_out_harmful.astype(np.int16),
                            held_out_safe=self.held_out_safe.astype(np.int16),
                            harmful_digest=np.str_(self.harmful_digest), safe_digest=np.str_(self.safe_digest))

    @classmethod
    def load(cls, path: Path = HEAD_FILE) -> HarmfulHead:
        try:
            with np.load(path, allow_pickle=False) as data:
                return cls(weight=data["weight"].astype(np.float32), bias=float(data["bias"]),
                           threshold=float(data["threshold"]), encoder=str(data["encoder"]), seed=int(data["seed"]),
                           held_out_harmful=data["held_out_harmful"].astype(np.int64),
                           held_out_safe=data["held_out_safe"].astype(np.int64),
                           harmful_digest=str(data["harmful_digest"]), safe_digest=str(data["safe_digest"]))
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
            raise DetectorError(f"cannot load the harmful-request head {path}: {err} "
                                "(retrain it with: python benchmarks/train_harmful_head.py)") from err

    def held_out(self) -> tuple[list[str], list[str]]:
        """(harmful, safe) prompts the head never saw in training."""
        harmful, safe = read_prompts(HARMFUL_PROMPTS), read_prompts(SAFE_PROMPTS)
        if (prompts_digest(harmful), prompts_digest(safe)) != (self.harmful_digest, self.safe_digest):
            raise DetectorError("the training prompt files changed since the head was trained; retrain it")
        return [harmful[i] for i in self.held_out_harmful], [safe[i] for i in self.held_out_safe]


class HarmfulRequestClassifier(Detector):
    """Says whether requests ask for harmful help: the pseudo-concept ``harmful`` scores the head's logit against
    its threshold, and is flagged strictly above it."""

    name = "harmful_classifier"
    concept_id = "harmful"

    def __init__(self, head: HarmfulHead, encoder: Encoder | None = None):
        self.head = head
        if encoder is None:
            try:
                encoder = load_sentence_encoder(head.encoder)
            except ModelError as err:
                raise DetectorError(str(err)) from err
        self.encoder = encoder

    @classmethod
    def load(cls, path: Path = HEAD_FILE, encoder: Encoder | None = None) -> HarmfulRequestClassifier:
        return cls(HarmfulHead.load(path), encoder)

    def logits(self, prompts: Sequence[str]) -> np.ndarray:
        if not prompts:
            return np.zeros(0, np.float32)
        vectors = np.asarray(self.encoder.encode(list(prompts), batch_size=64, convert_to_numpy=True,
                                                 normalize_embeddings=True, show_progress_bar=False), np.float32)
        if vectors.shape[1] != self.head.weight.shape[0]:
            raise DetectorError(f"the harmful-request head expects {self.head.weight.shape[0]}-dimensional embeddings "
                                f"from {self.head.encoder}, got {vectors.shape[1]}")
        return vectors @ self.head.weight + self.head.bias

    def detect(self, texts: Sequence[str]) -> Classification:
        """The request's most harmful-looking piece (each text is scored on its own)."""
        return max(self.detect_each(texts), key=lambda c: c.scores[0].score, default=Classification())

    def detect_each(self, texts: Sequence[str]) -> list[Classification]:
        """Each text scores its most harmful-looking piece (sentence or window), so a request buried after
        filler past the encoder's 256 tokens is still read; one embedding pass for the whole batch."""
        pieces = [[piece.text for piece in split_pieces([text])] or [text] for text in texts]
        distinct = list(dict.fromkeys(piece for text_pieces in pieces for piece in text_pieces))
        logit_of = dict(zip(distinct, self.logits(distinct).tolist()))
        threshold = self.head.threshold
        scores = []
        for text_pieces in pieces:
            logit, piece = max((logit_of[piece], piece) for piece in text_pieces)
            scores.append(Classification([ConceptScore(
                concept_id=self.concept_id, score=logit, threshold=threshold, flagged=logit > threshold,
                detector=self.name, evidence=f"'{clip(piece)}' scores logit {logit:.3f}")]))
        return scores
