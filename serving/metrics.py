"""Prometheus metrics: what was asked, what was blocked (per concept) and what the guard cost.

Each app owns its registry, so several servers in one process (tests, an app embedding ours) never collide.
The guard's own checks are measured by wrapping the guard (:class:`MeasuredGuard`), so the decision code in
:mod:`guard.decision` knows nothing of Prometheus.
"""

from __future__ import annotations

from typing import Any, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.context_managers import Timer

from guard.decision import Guard, OutputDecision, PromptDecision
from guard.errors import ConceptRefused

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("guard_requests", "Requests by endpoint and outcome (ok, blocked_prompt, "
                                "blocked_output, guard_unavailable, invalid, error, disconnected; the check-only "
                                "endpoints: ok, flagged).",
                                ["endpoint", "outcome"], registry=self.registry)
        self.blocks = Counter("guard_blocks", "Blocked prompts or outputs per concept and stage.",
                              ["concept", "stage"], registry=self.registry)
        self.flags = Counter("guard_flags", "Concepts flagged in prompts (any action: refuse, steer or log).",
                             ["concept", "action"], registry=self.registry)
        self.regenerations = Counter("guard_regenerations", "Answers regenerated with stronger penalties.",
                                     registry=self.registry)
        self.guard_latency = Histogram("guard_added_latency_seconds",
                                       "Time spent in guard checks per call (prompt, certify, output, stream_output).",
                                       ["stage"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_latency = Histogram("guard_request_duration_seconds",
                                         "Latency until the response starts (the whole answer unless streamed).",
                                         ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("guard_batch_size", "Requests decoded together by the transformers engine.",
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=self.registry)
        self.policy_reloads = Counter("guard_policy_reloads", "Policy reload attempts by result (applied, rejected).",
                                      ["result"], registry=self.registry)
        self.admitted = Gauge("guard_admitted_requests", "POST /v1 requests in the server now (at most --max-queue).",
                              registry=self.registry)
        self.rejected = Counter("guard_rejected_requests", "Requests answered 429 before any work, by reason "
                                "(queue_full).", ["reason"], registry=self.registry)
        self.policy_info = Gauge("guard_policy_info", "The active policy (value 1), labelled by its version tag.",
                                 ["version"], registry=self.registry)

    def guard_timer(self, stage: str) -> Timer:
        """Time a guard call as the latency it adds at ``stage`` (a context manager; observes on errors too)."""
        return self.guard_latency.labels(stage=stage).time()

    def record_block(self, concept_ids: Sequence[str], stage: str) -> None:
        for concept_id in concept_ids:
            self.blocks.labels(concept=concept_id, stage=stage).inc()

    def set_policy(self, version_tag: str, previous: str | None = None) -> None:
        """Mark ``version_tag`` active (replacing ``previous``: with --policy-map several policies are active)."""
        if previous is not None and previous != version_tag:
            try:
                self.policy_info.remove(previous)
            except KeyError:
                pass
        self.policy_info.labels(version=version_tag).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MeasuredGuard:
    """A guard whose prompt and output checks report their latency and flagged concepts to the metrics.

    It wraps the guard instead of subclassing it: engines and the settle loop receive it wherever they take a
    :class:`~guard.decision.Guard`, and every attribute not measured here is the wrapped guard's own.
    """

    def __init__(self, guard: Guard, metrics: ServerMetrics):
        self.guard = guard
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self.guard, name)

    def check_prompt(self, texts: Sequence[str]) -> PromptDecision:
        try:
            with self.metrics.guard_timer("prompt"):
                decision = self.guard.check_prompt(texts)
        except ConceptRefused as refused:
            for concept_id in refused.concept_ids:
                self.metrics.flags.labels(concept=concept_id, action="refuse").inc()
            raise
        verdict = decision.verdict
        for action, ids in (("steer", verdict.steered), ("log", verdict.logged)):
            for concept_id in ids:
                self.metrics.flags.labels(concept=concept_id, action=action).inc()
        return decision

    def check_output(self, text: str, decision: PromptDecision, attempt: int = 0) -> OutputDecision:
        with self.metrics.guard_timer("output"):
            return self.guard.check_output(text, decision, attempt)
