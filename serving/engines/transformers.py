"""The default engine: a transformers causal LM in this process, guarded by :mod:`guard.text.generation`.

Concurrent requests are batched: a worker thread takes the first waiting request, waits ``batch_wait_ms`` for
more (up to ``max_batch_size``) and answers them with one batched ``generate`` call, in which every row
carries its own penalties, sampling settings and seed (so batching never changes an answer). Streams decode
in their own threads, one per choice, and hand text deltas to the event loop as they come.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import AsyncIterator

from anyio import to_thread

from guard.decision import Guard, PromptDecision
from guard.errors import ConceptRefused
from guard.methods.token_penalty.logit_bias import client_bias_within_guard, protected_tokens
from guard.models import load_language_model
from guard.settle import GenerationResult, seed_for_choice
from guard.text.generation import GuardedStream, TextRequest, generate_batch, start_stream
from serving.config import ServerSettings
from serving.engines.base import ChoiceDelta
from serving.metrics import ServerMetrics

logger = logging.getLogger("serving")


@dataclass
class _Job:
    guard: Guard
    request: TextRequest
    future: Future[GenerationResult]


class BatchWorker:
    """One thread that owns batched decoding; jobs arriving within ``wait_s`` of each other share a batch."""

    def __init__(self, model: object, tokenizer: object, wait_s: float, max_batch: int, metrics: ServerMetrics):
        self.metrics = metrics
        self.model = model
        self.tokenizer = tokenizer
        self.wait_s = wait_s
        self.max_batch = max_batch
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="guard-batch-worker", daemon=True)
        self._thread.start()

    def submit(self, guard: Guard, request: TextRequest) -> Future[GenerationResult]:
        future: Future[GenerationResult] = Future()
        self._jobs.put(_Job(guard, request, future))
        return future

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=30)

    def _collect(self, first: _Job) -> tuple[list[_Job], bool]:
        batch = [first]
        deadline = time.monotonic() + self.wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                job = self._jobs.get(timeout=remaining)
            except queue.Empty:
                break
            if job is None:
                return batch, True
            batch.append(job)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._jobs.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            self.metrics.batch_size.observe(len(batch))
            # A policy reload may land between two requests of a batch: each guard decodes its own group.
            groups: dict[int, list[_Job]] = {}
            for job in batch:
                groups.setdefault(id(job.guard), []).append(job)
            for jobs in groups.values():
                self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        live = [job for job in jobs if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            results = generate_batch(live[0].guard, self.model, self.tokenizer, [job.request for job in live])
        except BaseException as err:  # noqa: BLE001 - GuardUnavailable and bugs alike go back to their requests
            for job in live:
                job.future.set_exception(err)
            return
        for job, result in zip(live, results):
            if isinstance(result, ConceptRefused):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


class TransformersEngine:
    def __init__(self, settings: ServerSettings, metrics: ServerMetrics):
        self.model, self.tokenizer = load_language_model(settings.model)
        self.model_id = settings.model_id
        self.description = f"transformers in-process ({settings.model})"
        self.vocab_size = len(self.tokenizer)
        self.worker = BatchWorker(self.model, self.tokenizer, settings.batch_wait_ms / 1000, settings.max_batch_size,
                                  metrics)
        self._protected: weakref.WeakKeyDictionary[Guard, frozenset[int]] = weakref.WeakKeyDictionary()

    async def prepare(self, guard: Guard) -> None:
        penalties = await to_thread.run_sync(guard.token_penalties, self.tokenizer)
        self._protected[guard] = await to_thread.run_sync(protected_tokens, penalties)

    def _within_guard(self, guard: Guard, request: TextRequest) -> TextRequest:
        """The request with the client's logit_bias unable to raise protected tokens."""
        bias = client_bias_within_guard(request.settings.logit_bias, self._protected[guard])
        return replace(request, settings=replace(request.settings, logit_bias=bias))

    async def generate(self, guard: Guard, request: TextRequest) -> GenerationResult:
        return await asyncio.wrap_future(self.worker.submit(guard, self._within_guard(guard, request)))

    async def open_stream(self, guard: Guard, request: TextRequest) -> "TransformersStream":
        request = self._within_guard(guard, request)
        settings = request.settings
        streams: list[GuardedStream] = []
        try:
            for choice in range(settings.n):
                # One decode per choice (each checks the prompt), seeded as choice ``choice`` of a batch.
                one = replace(request, settings=replace(settings, n=1, seed=seed_for_choice(settings.seed, choice)))
                streams.append(await to_thread.run_sync(start_stream, guard, self.model, self.tokenizer, one))
        except BaseException:
            for stream in streams:
                await to_thread.run_sync(stream.close)
            raise
        return TransformersStream(streams[0].decision, streams, asyncio.get_running_loop())

    async def close(self) -> None:
        await to_thread.run_sync(self.worker.stop)


_END = object()


class TransformersStream:
    """Merges the per-choice decode threads into one async iterator of :class:`ChoiceDelta`."""

    def __init__(self, decision: PromptDecision, streams: list[GuardedStream], loop: asyncio.AbstractEventLoop):
        self.decision = decision
        self._streams = streams
        self._loop = loop
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._threads = [threading.Thread(target=self._pump, args=(i, s), name=f"guard-stream-{i}", daemon=True)
                         for i, s in enumerate(streams)]
        for thread in self._threads:
            thread.start()

    def _pump(self, index: int, stream: GuardedStream) -> None:
        try:
            for delta in stream:
                self._loop.call_soon_threadsafe(self._queue.put_nowait,
                                                ChoiceDelta(index, delta.text, delta.finish_reason))
        except BaseException as err:  # noqa: BLE001 - handed to the event loop, raised there
            self._loop.call_soon_threadsafe(self._queue.put_nowait, err)
        finally:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, _END)

    @property
    def prompt_tokens(self) -> int:
        return self._streams[0].prompt_tokens

    @property
    def completion_tokens(self) -> int:
        return sum(stream.completion_tokens for stream in self._streams)

    def __aiter__(self) -> AsyncIterator[ChoiceDelta]:
        return self._merged()

    async def _merged(self) -> AsyncIterator[ChoiceDelta]:
        running = len(self._streams)
        while running:
            item = await self._queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item  # type: ignore[misc]

    async def cancel(self, index: int) -> None:
        await to_thread.run_sync(self._streams[index].close)  # close() waits for the decode step to end

    async def aclose(self) -> None:
        for stream in self._streams:  # every decode is told at once, even if the waits below are cancelled
            stream.cancel()
        for stream in self._streams:
            await to_thread.run_sync(stream.close)
