"""Every erasure method the product has, in one table: its policy key, where it acts, where its code lives.

A concept's ``methods:`` block in a policy has one entry per method listed here (a test holds the two together),
``guard policy check`` shows which are on for each concept, and the docs list them from here. Adding a method is
one new module under :mod:`guard.methods`, its settings model in :mod:`guard.policy`, and one entry below.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

from guard.errors import WeightEditError
from guard.policy import Concept, ConceptKind, Policy

Stage = Literal["decoding", "prompt embeddings", "cross-attention values", "weights"]


@dataclass(frozen=True)
class ErasureMethod:
    name: str  # the key under a concept's ``methods:`` in a policy file
    modality: Literal["text", "image"]
    stage: Stage  # where it erases: a decoding step, the prompt's embeddings, attention values, or the weights
    module: str  # where its code lives
    reference: str  # the published method (see shared/reference/ALGORITHMS.md)

    @property
    def persistent(self) -> bool:
        """A weight edit outlives the server (``guard edit``); the others act per request."""
        return self.stage == "weights"

    def enabled(self, concept: Concept) -> bool:
        """Whether the concept asks for this method (settings without an ``enabled`` switch are always on)."""
        return bool(getattr(getattr(concept.methods, self.name), "enabled", True))

    def load(self) -> ModuleType:
        return importlib.import_module(self.module)


METHODS: tuple[ErasureMethod, ...] = (
    ErasureMethod("token_penalty", "text", "decoding", "guard.methods.token_penalty", "GUARD (token penalties)"),
    ErasureMethod("semantic_surgery", "image", "prompt embeddings", "guard.methods.semantic_surgery",
                  "Semantic Surgery"),
    ErasureMethod("adavd", "image", "cross-attention values", "guard.methods.adavd", "AdaVD"),
    ErasureMethod("uce", "image", "weights", "guard.methods.uce", "UCE / RECE"),
    ErasureMethod("stamp", "text", "weights", "guard.methods.stamp", "STAMP (RePAIR) / STAMP-LR / AlphaEdit"),
)


def method(name: str) -> ErasureMethod:
    for entry in METHODS:
        if entry.name == name:
            return entry
    raise KeyError(f"no erasure method '{name}' (known: {', '.join(m.name for m in METHODS)})")


def enabled_methods(concept: Concept) -> list[ErasureMethod]:
    """The methods a concept has switched on, in registry order."""
    return [entry for entry in METHODS if entry.enabled(concept)]


def concepts_to_edit(policy: Policy, concept_ids: Sequence[str], kinds: Sequence[ConceptKind]) -> list[Concept]:
    """The named concepts (each once, unknown ids an error), else every concept of the given kinds."""
    known = [concept.id for concept in policy.concepts]
    if concept_ids:
        unknown = [concept_id for concept_id in concept_ids if concept_id not in known]
        if unknown:
            raise WeightEditError(f"unknown concept id {', '.join(repr(u) for u in unknown)} "
                                  f"(policy '{policy.name}' defines: {', '.join(known)})")
        return [policy.concept(concept_id) for concept_id in dict.fromkeys(concept_ids)]
    chosen = [concept for concept in policy.concepts if concept.kind in kinds]
    if not chosen:
        raise WeightEditError(f"policy '{policy.name}' has no {'/'.join(kind.value for kind in kinds)} concepts; "
                              "name the concepts to edit with --concept")
    return chosen
