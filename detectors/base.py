"""What every detector reports: per-concept scored evidence, strongest first."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ConceptScore:
    concept_id: str
    score: float
    flagged: bool
    detector: str  # "alias", "semantic" or "none"
    evidence: str


@dataclass(frozen=True)
class Classification:
    scores: list[ConceptScore] = field(default_factory=list)  # strongest first

    @property
    def flagged(self) -> list[ConceptScore]:
        return [s for s in self.scores if s.flagged]

    @property
    def flagged_ids(self) -> list[str]:
        return [s.concept_id for s in self.scores if s.flagged]
