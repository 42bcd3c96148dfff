"""The active guard with its certifier, and their hot reload.

A request takes the active guard once and keeps it to the end, so it is judged by one policy even if a reload
lands mid-request. A reload builds the new guard completely (detectors, erase-and-check, the engine's penalty tables,
the image guard) before swapping it in; a policy that fails to load or build is rejected with a log line and the
old one stays active — a broken edit must never leave the server unguarded or down.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyio import to_thread

from guard.certification import EraseAndCheck
from guard.decision import Guard, check_policy_tests
from guard.policy import ActionType, Policy, load_policy
from serving.engines.base import Engine
from serving.metrics import MeasuredGuard, ServerMetrics

if TYPE_CHECKING:
    from guard.images.pipeline import ImageGuard

logger = logging.getLogger("serving")


def refusal_policy(policy: Policy) -> Policy:
    """The policy's refused concepts only: what erase-and-check certifies against.

    Its verdict refuses the request, so concepts the policy steers or only logs must not take part — certifying
    them would turn "answer without naming it" into a refusal.
    """
    return policy.model_copy(update={"concepts": [c for c in policy.concepts if c.action.type == ActionType.refuse]})


@dataclass(frozen=True)
class ActiveGuard:
    """One policy version ready to serve: its guard (checks measured) and its erase-and-check certifier.

    Built together and swapped together, so a request that takes it once is checked and certified by the same
    policy version, with that version's certify settings and concepts.
    """

    guard: MeasuredGuard
    certifier: EraseAndCheck | None  # None: the policy has no ``certify:`` block

    @classmethod
    def build(cls, policy: Policy, metrics: ServerMetrics) -> ActiveGuard:
        """Load the policy's detectors and certifier (blocking: seconds for a new embedding model)."""
        plain = Guard(policy)
        check_policy_tests(plain)  # a policy that fails its own tests never becomes active
        guard = MeasuredGuard(plain, metrics)
        # One embedding cache for both: the prompt check then reads the vectors certification just computed.
        certifier = (EraseAndCheck.from_policy(refusal_policy(policy), cache=plain.classifier.query_cache)
                     if policy.certify is not None else None)
        return cls(guard, certifier)


class GuardState:
    def __init__(self, policy: Policy, policy_path: Path, engine: Engine, metrics: ServerMetrics,
                 image_model: str | None = None, image_nsfw_threshold: float | None = None):
        """Build the guards of ``policy`` (read from ``policy_path``, which reloads re-read) now: a server must
        not even start without a working guard."""
        self.policy_path = policy_path
        self.engine = engine
        self.metrics = metrics
        self.active = ActiveGuard.build(policy, metrics)
        self.images: ImageGuard | None = None
        if image_model is not None:
            from guard.images.pipeline import ImageGuard

            self.images = ImageGuard(image_model, policy, nsfw_threshold=image_nsfw_threshold)

    @property
    def guard(self) -> MeasuredGuard:
        return self.active.guard

    async def start(self) -> None:
        """Prepare the engine for the first guard (inside the server's event loop, before any request)."""
        await self.engine.prepare(self.guard)
        self.metrics.set_policy(self.guard.policy.version_tag)
        logger.info("policy %s active (%d concepts)", self.guard.policy.version_tag, len(self.guard.policy.concepts))

    async def reload(self) -> bool:
        """Apply the policy file as it is now; True when a new policy became active."""
        try:
            policy = await to_thread.run_sync(load_policy, self.policy_path)
            if policy.fingerprint == self.guard.policy.fingerprint:
                return False
            active = await to_thread.run_sync(ActiveGuard.build, policy, self.metrics)
            await self.engine.prepare(active.guard)
            if self.images is not None:
                await to_thread.run_sync(self.images.use_policy, policy)
        except Exception as err:  # noqa: BLE001 - a bad policy, missing model or detector failure keeps the old one
            self.metrics.policy_reloads.labels(result="rejected").inc()
            logger.error("policy reload rejected, keeping %s: %s", self.guard.policy.version_tag, err)
            return False
        previous = self.guard.policy.version_tag
        self.active = active
        self.metrics.policy_reloads.labels(result="applied").inc()
        self.metrics.set_policy(policy.version_tag)
        logger.info("policy reloaded: %s -> %s", previous, policy.version_tag)
        return True

    def watched_paths(self) -> list[Path]:
        """The policy's folder and the folders of the files it extends and of its calibration (edits there change
        the policy)."""
        folders = {self.policy_path.resolve().parent}
        for include in self.guard.policy.extends:
            folders.add((self.policy_path.parent / include).resolve().parent)
        if self.guard.policy.calibration_path is not None:
            folders.add(self.guard.policy.calibration_path.parent)
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
