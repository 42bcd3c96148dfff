"""The active guard and its hot reload.

A request takes the guard once and keeps it to the end, so it is judged by one policy even if a reload lands
mid-request. A reload builds the new guard completely (detectors, erase-and-check, the engine's penalty tables,
the image guard) before swapping it in; a policy that fails to load or build is rejected with a log line and the
old one stays active — a broken edit must never leave the server unguarded or down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from anyio import to_thread

from guard.certification import Certificate, EraseAndCheck
from guard.decision import Guard, OutputDecision, PromptDecision
from guard.errors import ConceptRefused
from guard.policy import ActionType, Policy, load_policy
from serving.engines.base import Engine
from serving.metrics import ServerMetrics

if TYPE_CHECKING:
    from guard.images.pipeline import ImageGuard

logger = logging.getLogger("serving")


def refusal_policy(policy: Policy) -> Policy:
    """The policy's refused concepts only: what erase-and-check certifies against.

    Its verdict refuses the request, so concepts the policy steers or only logs must not take part — certifying
    them would turn "answer without naming it" into a refusal.
    """
    return policy.model_copy(update={"concepts": [c for c in policy.concepts if c.action.type == ActionType.refuse]})


class MeteredGuard(Guard):
    """A Guard that reports the latency it adds and the concepts it flags to the server's metrics."""

    def __init__(self, policy: Policy, metrics: ServerMetrics):
        super().__init__(policy)
        self.metrics = metrics
        # Built with the guard, so each policy version certifies with its own settings and concepts.
        self.certifier = EraseAndCheck.from_policy(refusal_policy(policy)) if policy.certify is not None else None

    def certify(self, prompt: str) -> Certificate:
        """erase-and-check ``prompt`` (only for policies with a ``certify:`` block; blocking — run it in a thread)."""
        if self.certifier is None:
            raise ValueError(f"policy {self.policy.version_tag} has no certify block")
        started = time.perf_counter()
        try:
            return self.certifier.certify(prompt)
        finally:
            self.metrics.guard_latency.labels(stage="certify").observe(time.perf_counter() - started)

    def check_prompt(self, texts: Sequence[str]) -> PromptDecision:
        started = time.perf_counter()
        try:
            decision = super().check_prompt(texts)
        except ConceptRefused as refused:
            for concept_id in refused.concept_ids:
                self.metrics.flags.labels(concept=concept_id, action="refuse").inc()
            raise
        finally:
            self.metrics.guard_latency.labels(stage="prompt").observe(time.perf_counter() - started)
        verdict = decision.verdict
        for action, ids in (("steer", verdict.steered), ("log", verdict.logged)):
            for concept_id in ids:
                self.metrics.flags.labels(concept=concept_id, action=action).inc()
        return decision

    def check_output(self, text: str, decision: PromptDecision, attempt: int = 0) -> OutputDecision:
        started = time.perf_counter()
        try:
            return super().check_output(text, decision, attempt)
        finally:
            self.metrics.guard_latency.labels(stage="output").observe(time.perf_counter() - started)


class GuardState:
    def __init__(self, policy_path: Path, engine: Engine, metrics: ServerMetrics, image_model: str | None = None,
                 image_nsfw_threshold: float | None = None):
        """Load the policy and build its guards now: a server must not even start without a working guard."""
        self.policy_path = policy_path
        self.engine = engine
        self.metrics = metrics
        self._guard = MeteredGuard(load_policy(policy_path), metrics)
        self.images: ImageGuard | None = None
        if image_model is not None:
            from guard.images.pipeline import ImageGuard

            self.images = ImageGuard(image_model, self._guard.policy, nsfw_threshold=image_nsfw_threshold)

    @property
    def guard(self) -> MeteredGuard:
        return self._guard

    async def start(self) -> None:
        """Prepare the engine for the first guard (inside the server's event loop, before any request)."""
        await self.engine.prepare(self._guard)
        self.metrics.set_policy(self._guard.policy.version_tag)
        logger.info("policy %s active (%d concepts)", self._guard.policy.version_tag,
                    len(self._guard.policy.concepts))

    async def reload(self) -> bool:
        """Apply the policy file as it is now; True when a new policy became active."""
        try:
            policy = await to_thread.run_sync(load_policy, self.policy_path)
            if policy.fingerprint == self._guard.policy.fingerprint:
                return False
            guard = await to_thread.run_sync(MeteredGuard, policy, self.metrics)
            await self.engine.prepare(guard)
            if self.images is not None:
                await to_thread.run_sync(self.images.use_policy, policy)
        except Exception as err:  # noqa: BLE001 - a bad policy, missing model or detector failure keeps the old one
            self.metrics.policy_reloads.labels(result="rejected").inc()
            logger.error("policy reload rejected, keeping %s: %s", self.guard.policy.version_tag, err)
            return False
        previous = self.guard.policy.version_tag
        self._guard = guard
        self.metrics.policy_reloads.labels(result="applied").inc()
        self.metrics.set_policy(guard.policy.version_tag)
        logger.info("policy reloaded: %s -> %s", previous, guard.policy.version_tag)
        return True

    def watched_paths(self) -> list[Path]:
        """The policy's folder and the folders of the files it extends (edits there change the policy)."""
        folders = {self.policy_path.resolve().parent}
        for include in self.guard.policy.extends:
            folders.add((self.policy_path.parent / include).resolve().parent)
        return sorted(folders)

    async def watch(self) -> None:
        """Reload on every change to a YAML file in the watched folders (runs until cancelled)."""
        from watchfiles import awatch

        def relevant(_change: object, path: str) -> bool:
            return path.endswith((".yaml", ".yml"))

        async for _changes in awatch(*self.watched_paths(), watch_filter=relevant, debounce=300, step=50):
            await self.reload()


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
