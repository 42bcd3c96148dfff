"""The active guard with its certifier, their hot reload, and which policy guards which API key.

A request takes the active guard once and keeps it to the end, so it is judged by one policy even if a reload
lands mid-request. A reload builds the new guard completely (detectors, erase-and-check, the engine's penalty tables,
the image guard) before swapping it in; a policy that fails to load or build is rejected with a log line and the
old one stays active — a broken edit must never leave the server unguarded or down. With ``--policy-map`` each
policy has its own state (and watcher), and :class:`KeyPolicies` picks a request's state by its API key alone: no
request field can choose a policy, so a client cannot pick a weaker one.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from anyio import to_thread

from guard.certification import EraseAndCheck
from guard.decision import Guard, check_policy_tests, leak_test_failures
from guard.errors import ConceptRefused
from guard.policy import ActionType, Policy, load_policy
from guard.text.policy_tests import delivered_text, leak_test_request
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
        """Prepare the engine for the first guard and run its ``tests.must_not_leak`` (inside the server's event
        loop, before any request): a policy that fails them does not start a server."""
        await self.engine.prepare(self.guard)
        await self.check_leak_tests(self.guard)
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
            await self.check_leak_tests(active.guard)
            if self.images is not None:
                await to_thread.run_sync(self.images.use_policy, policy)
        except Exception as err:  # noqa: BLE001 - a bad policy, missing model or detector failure keeps the old one
            self.metrics.policy_reloads.labels(result="rejected").inc()
            logger.error("policy reload rejected, keeping %s: %s", self.guard.policy.version_tag, err)
            return False
        previous = self.guard.policy.version_tag
        self.active = active
        self.metrics.policy_reloads.labels(result="applied").inc()
        self.metrics.set_policy(policy.version_tag, previous)
        logger.info("policy reloaded: %s -> %s", previous, policy.version_tag)
        return True

    async def check_leak_tests(self, guard: MeasuredGuard) -> None:
        """Raise :class:`PolicyError` for the first ``tests.must_not_leak`` case whose answer, generated by this
        server's engine under ``guard``, names a concept (a refused prompt or withheld answer delivers none)."""
        answers = []
        for prompt in guard.policy.tests.must_not_leak:
            try:
                answers.append(delivered_text(await self.engine.generate(guard, leak_test_request(prompt))))
            except ConceptRefused:
                answers.append("")
        failures = await to_thread.run_sync(leak_test_failures, guard, answers)
        if failures:
            raise failures[0].error(len(failures) - 1)

    def watched_paths(self) -> list[Path]:
        """The policy's folder and the folders of the files it extends and references (calibration, profile, forget
        files): edits there change the policy."""
        folders = {self.policy_path.resolve().parent}
        for include in self.guard.policy.extends:
            folders.add((self.policy_path.parent / include).resolve().parent)
        folders.update(path.parent for path in self.guard.policy.referenced_files)
        return sorted(folders)

    async def watch(self) -> None:
        """Reload on every change to a YAML file in the watched folders (runs until cancelled)."""
        from watchfiles import awatch

        def relevant(_change: object, path: str) -> bool:
            referenced = {str(p) for p in self.guard.policy.referenced_files}
            return path.endswith((".yaml", ".yml")) or str(Path(path).resolve()) in referenced

        async for _changes in awatch(*self.watched_paths(), watch_filter=relevant, debounce=300, step=50):
            await self.reload()


@dataclass(frozen=True)
class KeyPolicies:
    """The policy state of each API key bound by ``--policy-map`` (by key id); every other key gets ``default``."""

    default: GuardState
    bound: dict[str, GuardState]  # key id -> its policy's state

    def for_key(self, key_id: str | None) -> GuardState:
        return self.default if key_id is None else self.bound.get(key_id, self.default)

    @property
    def states(self) -> list[GuardState]:
        """Every policy state once (keys bound to the same file share one)."""
        return list({id(s): s for s in (self.default, *self.bound.values())}.values())


async def cancel(task: asyncio.Task[None] | None) -> None:
    if task is None:
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
