"""The guard's verdicts as the check-only endpoints report them (``/v1/moderations``, ``/v1/guard/checks``).

One place turns scores and decisions into :class:`~serving.protocol.ConceptReport` rows and an overall action,
so both endpoints say the same thing about the same text, and say what a chat request with it would meet.
"""

from __future__ import annotations

from typing import Any, Iterable, Literal

from detectors.base import Classification, ConceptScore
from guard.certification import Certificate
from guard.decision import OutputAction, OutputDecision, Verdict
from guard.policy import Policy
from serving.protocol import ConceptReport, GuardAction

SEVERITY: tuple[GuardAction, ...] = ("allow", "log", "steer", "refuse")


def strongest(actions: Iterable[GuardAction]) -> GuardAction:
    """The most severe of ``actions`` ("allow" for none): one refused concept refuses the whole request."""
    return max(actions, key=SEVERITY.index, default="allow")


def verdict_action(verdict: Verdict) -> GuardAction:
    """What a prompt judged ``verdict`` meets: its most severe flagged concept's action, else "allow"."""
    return "refuse" if verdict.refused else "steer" if verdict.steered else "log" if verdict.logged else "allow"


def report(score: ConceptScore, action: GuardAction, stage: Literal["prompt", "certify", "output"]) -> ConceptReport:
    return ConceptReport(id=score.concept_id, flagged=score.flagged, score=score.score, threshold=score.threshold,
                         detector=score.detector, evidence=score.evidence, action=action, stage=stage)


def prompt_reports(policy: Policy, classification: Classification,
                   stage: Literal["prompt", "certify"] = "prompt") -> list[ConceptReport]:
    """Every scored concept of a prompt: a flagged one meets its policy action, the others are allowed."""
    return [report(s, policy.concept(s.concept_id).action.type.value if s.flagged else "allow", stage)
            for s in classification.scores]


def output_reports(policy: Policy, decision: OutputDecision) -> list[ConceptReport]:
    """Every scored concept of an output. Only leaked concepts stop it (blocked: refuse; regenerated under
    stronger penalties: steer); other flags let it through, logged if the policy logs that concept."""
    leak_action: GuardAction = "refuse" if decision.action == OutputAction.block else "steer"
    rows = []
    for s in decision.verdict.classification.scores:
        if s.concept_id in decision.leaked:
            action: GuardAction = leak_action
        elif s.flagged and policy.concept(s.concept_id).action.type.value == "log":
            action = "log"
        else:
            action = "allow"
        rows.append(report(s, action, "output"))
    return rows


def certificate_body(certificate: Certificate, text: str) -> dict[str, Any]:
    """The certificate as JSON, naming what was certified (``input``, ``messages[0:2]``)."""
    return {"text": text, **certificate.to_dict()}
