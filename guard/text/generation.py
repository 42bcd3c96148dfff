"""Guarded generation for in-process transformers models.

One request goes: prompt check -> decode with per-row token penalties -> output check -> bounded
regeneration with stronger penalties (the settle loop of :mod:`guard.settle`, shared with every engine).
Several requests share one ``model.generate`` call; every batch row carries its own penalties, sampling
settings and seed, so batching never changes a result.

Public API:

* :class:`TextRequest` — chat messages (chat template applied) or a raw prompt, with :class:`SamplingSettings`.
* :func:`generate` — one request; raises :class:`~guard.errors.ConceptRefused` /
  :class:`~guard.errors.GuardUnavailable`.
* :func:`generate_batch` — many requests in one decode; a refused request comes back as its
  :class:`ConceptRefused` instance in the result list instead of failing the others.
* :func:`start_stream` — one request (``n == 1``) as text deltas; the prompt check runs before it
  returns, the output check is the caller's (e.g. a sliding window in the HTTP server), because text
  already sent cannot be regenerated.

``guard=None`` means unguarded: the same decode path without checks or penalties (baselines, tests).
Sampling happens inside a logits processor with one ``torch.Generator`` per row (``generate`` itself
runs greedy and picks the single token left), which is what lets rows with different temperatures,
top-p values and seeds share a batch.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from guard.decision import Guard, PromptDecision
from guard.errors import ConceptRefused
from guard.methods.token_penalty.tables import PenaltyRow
from guard.methods.token_penalty.transformers import TokenPenaltyProcessor
from guard.settle import (
    Attempt,
    Choice,
    Decoded,
    FinishReason,
    GenerationResult,
    penalty_row,
    seed_for_choice,
    settle,
    text_choices,
    text_judge,
    unguarded_choices,
)
from guard.text.detokenize import IncrementalDetokenizer

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class SamplingSettings:
    """OpenAI-style decoding settings. ``temperature == 0`` is greedy decoding."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # choice i of a seeded request samples with seed + i (guard.settle.seed_for_choice)
    stop: tuple[str, ...] = ()  # generation ends before the first occurrence; the stop string is not returned
    n: int = 1
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> bias in [-100, 100]

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise ValueError("temperature must be 0 or greater")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.n < 1:
            raise ValueError("n must be at least 1")
        if any(not stop for stop in self.stop):
            raise ValueError("stop strings must not be empty")
        if any(not -100 <= bias <= 100 for bias in self.logit_bias.values()):
            raise ValueError("logit_bias values must be in [-100, 100]")


def message_text(message: dict[str, Any]) -> str:
    """What the prompt check reads of one chat message: its content, then each tool call it makes as
    ``name(arguments)`` (a call's arguments are text the model conditions on on the next turn)."""
    calls = [f"{call['function']['name']}({call['function']['arguments']})" for call in message.get("tool_calls") or ()]
    return "\n".join(part for part in [message.get("content") or "", *calls] if part)


@dataclass(frozen=True)
class TextRequest:
    """What a client asked every text engine for: a chat conversation (``messages``) or a raw ``prompt``."""

    settings: SamplingSettings = field(default_factory=SamplingSettings)
    messages: list[dict[str, Any]] | None = None  # [{"role": ..., "content": str}, ...] (+ tool fields); chat template
    prompt: str | None = None  # decoded as given, no chat template (OpenAI completions)
    user: str | None = None  # the client's end-user id: forwarded upstream, named in block logs

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("a text request has either messages or a prompt")

    @classmethod
    def chat(cls, messages: list[dict[str, Any]], settings: SamplingSettings | None = None) -> "TextRequest":
        return cls(settings or SamplingSettings(), messages=messages)

    @classmethod
    def completion(cls, prompt: str, settings: SamplingSettings | None = None) -> "TextRequest":
        return cls(settings or SamplingSettings(), prompt=prompt)

    @property
    def guard_texts(self) -> list[str]:
        """What the prompt check reads: every message (history included, so earlier turns cannot smuggle)."""
        if self.messages is not None:
            return [text for m in self.messages if (text := message_text(m))]
        return [self.prompt or ""]


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a stream: new text, and on the last delta the finish reason."""

    text: str
    finish_reason: FinishReason | None = None


# -------------------------------------------------------------------------------------------------
# one decode over many rows


@dataclass(frozen=True)
class _Row:
    """One choice of one request, for one attempt."""

    request: int
    choice: int
    prompt_ids: list[int]
    settings: SamplingSettings
    penalty: PenaltyRow | None
    kept: tuple[int, ...] = ()  # generated ids a regeneration keeps (decoding continues after them)


class _ClientBias(LogitsProcessor):
    """The client's logit_bias; on guarded rows only negative entries count, so a client cannot undo a penalty."""

    def __init__(self, rows: Sequence[_Row], vocab_size: int):
        self.rows: list[tuple[torch.Tensor, torch.Tensor] | None] = []
        for row in rows:
            bias = {t: b for t, b in row.settings.logit_bias.items() if row.penalty is None or b < 0}
            if any(not 0 <= token_id < vocab_size for token_id in bias):
                raise ValueError(f"logit_bias names a token id outside the vocabulary (0..{vocab_size - 1})")
            self.rows.append((torch.tensor(list(bias), dtype=torch.int64), torch.tensor(list(bias.values())))
                             if bias else None)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, entry in enumerate(self.rows):
            if entry is not None:
                scores[index].index_add_(0, entry[0], entry[1].to(scores.dtype))
        return scores


class _RowSampler(LogitsProcessor):
    """Temperature / top-p sampling per row with the row's own generator; leaves greedy rows untouched."""

    def __init__(self, rows: Sequence[_Row]):
        self.rows: list[tuple[float, float, torch.Generator] | None] = []
        for row in rows:
            if row.settings.temperature == 0:
                self.rows.append(None)
                continue
            generator = torch.Generator()
            seed = seed_for_choice(row.settings.seed, row.choice)
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(seed)
            self.rows.append((row.settings.temperature, row.settings.top_p, generator))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        for index, entry in enumerate(self.rows):
            if entry is None:
                continue
            temperature, top_p, generator = entry
            probs = torch.softmax(scores[index].float() / temperature, dim=-1)
            if top_p < 1:
                sorted_probs, order = torch.sort(probs, descending=True)
                outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= top_p  # keeps at least one token
                probs = probs.index_fill(0, order[outside], 0.0)
            token = torch.multinomial(probs, 1, generator=generator)
            scores[index].fill_(float("-inf"))
            scores[index, token] = 0.0
        return scores


class _RowStopper(StoppingCriteria):
    """Per-row stop strings and token budgets, plus cancellation of the whole decode."""

    def __init__(self, rows: Sequence[_Row], tokenizer: "PreTrainedTokenizerBase", prompt_width: int,
                 cancel: threading.Event | None):
        self.rows = rows
        self.tokenizer = tokenizer
        self.prompt_width = prompt_width
        self.cancel = cancel
        self.stopped_at: dict[int, int] = {}  # row -> generated tokens when a stop string appeared
        self._texts = [IncrementalDetokenizer(tokenizer) for _ in rows]  # rows with stop strings, read per token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor | None, **kwargs) -> torch.BoolTensor:
        generated = input_ids.shape[1] - self.prompt_width
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        if self.cancel is not None and self.cancel.is_set():
            return ~done
        for index, row in enumerate(self.rows):
            if index in self.stopped_at or generated + len(row.kept) >= row.settings.max_new_tokens:
                done[index] = True
            elif row.settings.stop:
                text = self._texts[index]
                text.add(input_ids[index, self.prompt_width + len(text.ids):].tolist())
                if any(stop in text.text for stop in row.settings.stop):
                    self.stopped_at[index] = generated
                    done[index] = True
        return done


def _eos_ids(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    configured = model.generation_config.eos_token_id
    ids = set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    positions = [text.find(stop) for stop in stops if stop in text]
    return (text[: min(positions)], True) if positions else (text, False)


def _decode(guard: Guard | None, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
            rows: Sequence[_Row], streamer: BaseStreamer | None = None,
            cancel: threading.Event | None = None) -> list[Decoded]:
    """One ``generate`` call over left-padded rows, each with its own penalties, sampling and budget."""
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos, default=0)
    width = max(len(row.prompt_ids) + len(row.kept) for row in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        context = row.prompt_ids + list(row.kept)
        input_ids[index, width - len(context):] = torch.tensor(context)
        attention_mask[index, width - len(context):] = 1

    processors = LogitsProcessorList([_ClientBias(rows, len(tokenizer))])
    if guard is not None and any(row.penalty is not None for row in rows):
        processors.append(TokenPenaltyProcessor(guard.token_penalties(tokenizer), [row.penalty for row in rows],
                                                [row.kept for row in rows]))
    processors.append(_RowSampler(rows))
    stopper = _RowStopper(rows, tokenizer, width, cancel)
    config = GenerationConfig(max_new_tokens=max(row.settings.max_new_tokens - len(row.kept) for row in rows),
                              do_sample=False,
                              pad_token_id=pad, eos_token_id=sorted(eos))
    with torch.inference_mode():
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                logits_processor=processors, stopping_criteria=StoppingCriteriaList([stopper]),
                                streamer=streamer)
    decoded = []
    for index, row in enumerate(rows):
        ids = output[index, width:].tolist()
        ended = next((i for i, token in enumerate(ids) if token in eos), None)
        if index in stopper.stopped_at:
            ids = ids[: stopper.stopped_at[index]]
        elif ended is not None:
            ids = ids[: ended + 1]
        ids = list(row.kept) + ids[: row.settings.max_new_tokens - len(row.kept)]
        text, stopped = _cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), row.settings.stop)
        finished = stopped or (ended is not None and ended + len(row.kept) < len(ids))
        decoded.append(Decoded(text, "stop" if finished else "length", len(ids), tuple(ids)))
    return decoded


# -------------------------------------------------------------------------------------------------
# public entry points


def _prompt_ids(tokenizer: "PreTrainedTokenizerBase", request: TextRequest) -> list[int]:
    if request.prompt is not None:
        ids = tokenizer.encode(request.prompt, add_special_tokens=False)
        if not ids:
            raise ValueError("the prompt is empty")
        return ids
    if not request.messages:
        raise ValueError("a chat request needs at least one message")
    text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _check_prompt(guard: Guard | None, request: TextRequest) -> PromptDecision | None:
    return None if guard is None else guard.check_prompt(request.guard_texts)


def _penalty(decision: PromptDecision | None) -> PenaltyRow | None:
    """The first attempt's penalties: the prompt decision's penalised concepts (none when unguarded)."""
    return None if decision is None else penalty_row(decision.penalized, terms=decision.terms)


def _kept(tokenizer: "PreTrainedTokenizerBase", attempt: Attempt[PenaltyRow | None]) -> tuple[int, ...]:
    """The generated ids a regeneration keeps: the most whose text ends before the leak (``attempt.keep``)."""
    if not attempt.keep or not isinstance(attempt.resume, Decoded):
        return ()
    ids = attempt.resume.token_ids
    for count in range(len(ids), 0, -1):
        if len(tokenizer.decode(ids[:count], skip_special_tokens=True)) <= attempt.keep:
            return ids[:count]
    return ()


def generate_batch(guard: Guard | None, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                   requests: Sequence[TextRequest]) -> list[GenerationResult | ConceptRefused]:
    """Answer several requests in one decode; refused ones come back as their ConceptRefused.

    :class:`~guard.errors.GuardUnavailable` (a detector failure) is raised for the whole batch: no request
    may be answered by a guard that cannot check it.
    """
    outcomes: list[GenerationResult | ConceptRefused | None] = [None] * len(requests)
    decisions: dict[int, PromptDecision | None] = {}
    prompts: dict[int, list[int]] = {}
    rows: list[_Row] = []  # attempt index -> the choice it decodes
    for index, request in enumerate(requests):
        try:
            decisions[index] = _check_prompt(guard, request)
        except ConceptRefused as refused:
            outcomes[index] = refused
            continue
        prompts[index] = _prompt_ids(tokenizer, request)
        for choice in range(request.settings.n):
            rows.append(_Row(index, choice, prompts[index], request.settings, _penalty(decisions[index])))

    def decode(attempts: list[Attempt[PenaltyRow | None]]) -> list[Decoded]:
        return _decode(guard, model, tokenizer, [replace(rows[a.index], penalty=a.plan, kept=_kept(tokenizer, a))
                                                 for a in attempts])

    first = [Attempt(i, row.penalty) for i, row in enumerate(rows)]
    decoded = decode(first) if first else []
    if guard is None:
        choices = unguarded_choices([(rows[a.index].choice, d) for a, d in zip(first, decoded)])
    else:
        judge = text_judge(guard, lambda i: decisions[rows[i].request])
        choices = text_choices(settle(list(zip(first, decoded)), judge, decode), lambda i: rows[i].choice)
    per_request: dict[int, list[Choice]] = {index: [] for index in prompts}
    for row, choice in zip(rows, choices):  # settled choices come back in attempt order, one per row
        per_request[row.request].append(choice)
    for index, mine in per_request.items():
        outcomes[index] = GenerationResult(mine, len(prompts[index]), decisions[index])
    return [outcome for outcome in outcomes if outcome is not None]


def generate(guard: Guard | None, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
             request: TextRequest) -> GenerationResult:
    """Answer one request under the guard; raises ConceptRefused or GuardUnavailable."""
    outcome = generate_batch(guard, model, tokenizer, [request])[0]
    if isinstance(outcome, ConceptRefused):
        raise outcome
    return outcome


# -------------------------------------------------------------------------------------------------
# streaming


class _TokenQueue(BaseStreamer):
    """Receives generated token ids from ``generate`` (the first ``put`` is the prompt, skipped)."""

    def __init__(self) -> None:
        self.queue: "queue.Queue[int | None]" = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        for token in value.flatten().tolist():
            self.queue.put(int(token))

    def end(self) -> None:
        self.queue.put(None)


class GuardedStream:
    """A running single-choice decode; iterate for :class:`StreamDelta` items, the last one with a finish reason.

    ``close()`` stops decoding early (client gone, or the caller's output check blocked the text).
    Attributes: ``decision`` (the PromptDecision, None unguarded), ``prompt_tokens``,
    ``completion_tokens`` (so far), ``text`` (sent so far), ``finish_reason`` (after the last delta).
    """

    def __init__(self, guard: Guard | None, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                 row: _Row, decision: PromptDecision | None):
        self.decision = decision
        self.prompt_tokens = len(row.prompt_ids)
        self.completion_tokens = 0
        self.text = ""
        self.finish_reason: FinishReason | None = None
        self._tokenizer = tokenizer
        self._stops = row.settings.stop
        self._eos = _eos_ids(model, tokenizer)
        self._tokens = _TokenQueue()
        self._cancel = threading.Event()
        self._result: list[Decoded] = []
        self._error: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, args=(guard, model, row), daemon=True,
                                        name="guarded-stream")
        self._thread.start()

    def _run(self, guard: Guard | None, model: "PreTrainedModel", row: _Row) -> None:
        try:
            self._result.extend(_decode(guard, model, self._tokenizer, [row], self._tokens, self._cancel))
        except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
            self._error.append(err)
            self._tokens.queue.put(None)

    def _sendable(self, text: str, final: bool) -> tuple[str, bool]:
        """Text safe to send now: cut at a stop string; hold back a possible stop prefix or half a character."""
        text, stopped = _cut_at_stop(text, self._stops)
        if stopped or final:
            return text, stopped
        hold = max((k for stop in self._stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
        text = text[: len(text) - hold]
        return text.rstrip("\ufffd"), False

    def __iter__(self) -> Iterator[StreamDelta]:
        text = IncrementalDetokenizer(self._tokenizer)  # a window per token, not all ids again
        while True:
            token = self._tokens.queue.get()
            if token is None:
                break
            if token in self._eos:
                continue
            text.add([token])
            self.completion_tokens = len(text.ids)
            ready, stopped = self._sendable(text.text, final=False)
            if len(ready) > len(self.text):
                delta, self.text = ready[len(self.text):], ready
                yield StreamDelta(delta)
            if stopped:
                self.close()
                self.finish_reason = "stop"
                yield StreamDelta("", "stop")
                return
        self._thread.join()
        if self._error:
            raise self._error[0]
        if self._cancel.is_set():
            return  # closed by the consumer: no finish reason to report
        result = self._result[0]
        remainder = result.text[len(self.text):]
        self.text, self.completion_tokens, self.finish_reason = (result.text, result.completion_tokens,
                                                                 result.finish_reason)
        yield StreamDelta(remainder, result.finish_reason)

    def cancel(self) -> None:
        """Ask the decode to stop after its current step, without waiting (safe from an event loop)."""
        self._cancel.set()

    def close(self) -> None:
        self.cancel()
        self._thread.join()


def start_stream(guard: Guard | None, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase",
                 request: TextRequest) -> GuardedStream:
    """Check the prompt now (raising ConceptRefused/GuardUnavailable) and return the running stream."""
    if request.settings.n != 1:
        raise ValueError("streaming supports n == 1 only")
    decision = _check_prompt(guard, request)
    row = _Row(0, 0, _prompt_ids(tokenizer, request), request.settings, _penalty(decision))
    return GuardedStream(guard, model, tokenizer, row, decision)
