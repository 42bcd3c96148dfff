"""Semantic Surgery (Xiong et al., NeurIPS 2025): zero-shot concept erasure on diffusion prompt embeddings.

Why it suits a per-request guard: the presence of each concept is read off the prompt's own text embedding
(one cosine per token position, no extra model), and the edit is a calibrated subtraction that is exactly the
identity when no concept is present, so unrelated prompts generate bit-identical images.

For a concept with probe text c and a prompt embedding φ(p) (the full padded token sequence):

* direction      Δe = φ(c) − φ("")
* presence       α = mean over positions j of cos(Δe[j], φ(p)[j]);  ρ̂ = sigmoid((α − t) / γ)
* active set     probes with ρ̂ ≥ τ   (t, γ, τ: ``methods.semantic_surgery`` threshold, gamma, activation)
* co-occurrence  one direction for everything active at once: Δe_co = φ(", ".join(active)) − φ(anchor)
* surgery        e' = e − max ρ̂ · Δe_co   on the conditional embedding only

Design choices (not in the paper): a concept's probe texts are its ``aliases`` (its names, the short strings the
paper's thresholds were calibrated on), or its ``description`` when it has none; a concept's presence is the best
of its probes. Presence is always measured against the empty prompt, as calibrated, while the erasure direction
points from the concept to the concept's ``anchor`` (several active concepts join their anchors like their
probes), so the edit replaces the concept by its anchor. Pipelines with a pooled text embedding (SDXL) get the
same calibrated subtraction on the pooled vector.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from guard.policy import Concept


@dataclass(frozen=True)
class TextEmbeddings:
    """A pipeline's text conditioning for a batch of texts: the token sequence and, for SDXL, a pooled vector."""

    sequence: torch.Tensor  # (batch, tokens, dim)
    pooled: torch.Tensor | None = None  # (batch, dim)

    def rows(self, index: int | slice) -> "TextEmbeddings":
        index = slice(index, index + 1) if isinstance(index, int) else index
        return TextEmbeddings(self.sequence[index], None if self.pooled is None else self.pooled[index])

    @staticmethod
    def stack(parts: Sequence["TextEmbeddings"]) -> "TextEmbeddings":
        pooled = [p.pooled for p in parts if p.pooled is not None]
        return TextEmbeddings(torch.cat([p.sequence for p in parts]),
                              torch.cat(pooled) if len(pooled) == len(parts) else None)


TextEncoder = Callable[[Sequence[str]], TextEmbeddings]


def probe_texts(concept: Concept) -> list[str]:
    """The strings whose embeddings stand for a concept: its names, else its description."""
    return list(concept.aliases) or [concept.description]


@dataclass(frozen=True)
class Probe:
    concept_id: str
    text: str
    threshold: float
    gamma: float
    activation: float


@dataclass(frozen=True)
class ProbeScore:
    probe: Probe
    alpha: float  # mean token-wise cosine to the probe's direction
    presence: float  # ρ̂ in [0, 1]

    @property
    def active(self) -> bool:
        return self.presence >= self.probe.activation


@dataclass(frozen=True)
class ConceptPresence:
    concept_id: str
    probes: tuple[ProbeScore, ...]

    @property
    def best(self) -> ProbeScore:
        return max(self.probes, key=lambda score: score.presence)

    @property
    def presence(self) -> float:
        return self.best.presence

    @property
    def active(self) -> bool:
        return any(score.active for score in self.probes)

    @property
    def matched(self) -> tuple[ProbeScore, ...]:
        return tuple(score for score in self.probes if score.active)


@dataclass(frozen=True)
class ErasureTarget:
    """One text to erase, how strongly, and what it should become."""

    text: str
    strength: float
    anchor: str = ""


@dataclass(frozen=True)
class SurgeryEdit:
    embeddings: TextEmbeddings
    strength: float  # ρ̂_joint
    erased_text: str  # the co-occurrence prompt
    anchor_text: str


class SemanticSurgery:
    """Presence estimation and calibrated subtraction for a set of concepts on one pipeline's text encoder."""

    _CACHE_SIZE = 256

    def __init__(self, concepts: Sequence[Concept], encode: TextEncoder):
        self._encode = encode
        self.probes = tuple(
            Probe(c.id, text, c.methods.semantic_surgery.threshold, c.methods.semantic_surgery.gamma,
                  c.methods.semantic_surgery.activation)
            for c in concepts for text in dict.fromkeys(probe_texts(c)))
        self._cache: OrderedDict[str, TextEmbeddings] = OrderedDict()
        encoded = encode(["", *(p.text for p in self.probes)]) if self.probes else encode([""])
        self.neutral = encoded.rows(0)
        self._remember("", self.neutral)
        self.probe_embeddings = encoded.rows(slice(1, None))
        for i, probe in enumerate(self.probes):
            self._remember(probe.text, self.probe_embeddings.rows(i))
        self._directions = (self.probe_embeddings.sequence.float() - self.neutral.sequence.float())
        self._thresholds = torch.tensor([p.threshold for p in self.probes], device=self._directions.device)
        self._gammas = torch.tensor([p.gamma for p in self.probes], device=self._directions.device)

    def _remember(self, text: str, embeddings: TextEmbeddings) -> None:
        self._cache[text] = embeddings
        self._cache.move_to_end(text)
        while len(self._cache) > self._CACHE_SIZE:
            self._cache.popitem(last=False)

    def embed(self, text: str) -> TextEmbeddings:
        """φ(text), cached: co-occurrence prompts and anchors repeat across requests."""
        if text not in self._cache:
            self._remember(text, self._encode([text]))
        self._cache.move_to_end(text)
        return self._cache[text]

    def presence(self, prompt: TextEmbeddings) -> list[ConceptPresence]:
        """Score every probe against one prompt's embedding (``sequence`` of shape (1, tokens, dim))."""
        if prompt.sequence.shape[0] != 1:
            raise ValueError(f"presence is measured for one prompt at a time, not {prompt.sequence.shape[0]}")
        if not self.probes:
            return []
        sequence = prompt.sequence.float().to(self._directions.device)
        alphas = F.cosine_similarity(self._directions, sequence, dim=-1).mean(dim=-1)
        presences = torch.sigmoid((alphas - self._thresholds) / self._gammas)
        scores: dict[str, list[ProbeScore]] = {}
        for probe, alpha, presence in zip(self.probes, alphas.tolist(), presences.tolist(), strict=True):
            scores.setdefault(probe.concept_id, []).append(ProbeScore(probe, alpha, presence))
        return [ConceptPresence(concept_id, tuple(found)) for concept_id, found in scores.items()]

    def erase(self, prompt: TextEmbeddings, targets: Sequence[ErasureTarget]) -> SurgeryEdit:
        """e' = e − ρ̂_joint · (φ(co-occurrence prompt) − φ(joined anchors)); the identity without targets."""
        if not targets:
            return SurgeryEdit(prompt, 0.0, "", "")
        ordered = sorted(targets, key=lambda target: -target.strength)
        erased_text = ", ".join(dict.fromkeys(target.text for target in ordered))
        anchor_text = ", ".join(dict.fromkeys(target.anchor for target in ordered if target.anchor))
        strength = ordered[0].strength
        concept, anchor = self.embed(erased_text), self.embed(anchor_text)
        sequence = _subtract(prompt.sequence, strength, concept.sequence, anchor.sequence)
        pooled = prompt.pooled
        if pooled is not None and concept.pooled is not None and anchor.pooled is not None:
            pooled = _subtract(pooled, strength, concept.pooled, anchor.pooled)
        return SurgeryEdit(TextEmbeddings(sequence, pooled), strength, erased_text, anchor_text)


def _subtract(embedding: torch.Tensor, strength: float, concept: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    direction = concept.float() - anchor.float()
    return (embedding.float() - strength * direction.to(embedding.device)).to(embedding.dtype)
