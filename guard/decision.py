"""The engine-agnostic guard: what to do with a request and with what the model wrote.

Engines (transformers, vLLM, an upstream server) and the HTTP layer only ask this module two
questions — "may this prompt be answered, and with which concepts erased?" and "may this output be
sent?" — so every path through the product applies the same policy the same way.
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from detectors.alias import AliasAutomaton, AliasDetector, AliasHit
from detectors.base import Classification, ConceptScore
from detectors.classifier import PolicyClassifier
from detectors.forget import ForgetRetriever
from detectors.fuzzy import FuzzyAliasDetector
from detectors.language import LanguageDetector, LanguageReport
from detectors.terms import knowledge_names
from guard.errors import ConceptRefused, DetectorError, GuardUnavailable, PolicyError
from guard.policy import ActionType, Policy, load_policy

_WORD = re.compile(r"\S+")
_EDGE_PUNCTUATION = re.compile(r"^\W+|\W+$")
_SENTENCE_END = re.compile(r"[.!?:;,]$")  # a word ending a clause is not part of the name after it
TERM_DETECTORS_KEPT = 256  # requests' forbidden-term matchers kept compiled (a request's regenerations reuse its own)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from guard.methods.token_penalty.tables import TokenPenalties


@dataclass(frozen=True)
class Verdict:
    """A classification split by the action the policy assigns to each flagged concept."""

    classification: Classification
    refused: list[str] = field(default_factory=list)
    steered: list[str] = field(default_factory=list)
    logged: list[str] = field(default_factory=list)

    @property
    def flagged(self) -> list[str]:
        return self.classification.flagged_ids


@dataclass(frozen=True)
class PromptDecision:
    verdict: Verdict
    penalized: list[str]  # concepts whose token penalties apply while decoding this request
    ms: float = 0.0  # how long the prompt check took (engines decide in their own threads; the log reads it here)
    terms: tuple[str, ...] = ()  # this request's forbidden terms: n-grams of the closest forget-store entries


class OutputAction(str, Enum):
    send = "send"
    regenerate = "regenerate"
    block = "block"


@dataclass(frozen=True)
class OutputDecision:
    action: OutputAction
    verdict: Verdict
    penalized: list[str] = field(default_factory=list)  # for a regeneration: the wider set to penalise
    strength: float = 1.0  # for a regeneration: penalty multiplier
    message: str = ""  # for a block: the policy's message; for a fallback (or its regeneration): the fallback
    fallback: bool = False  # the choice ends with ``message`` as its answer (finish_reason "stop"), not a block
    leaked: list[str] = field(default_factory=list)  # the concepts that keep the text from being sent as is
    ms: float = 0.0  # time spent checking: this check, plus the earlier checks of the same choice (settle loop)
    terms: tuple[str, ...] = ()  # for a regeneration: the request's forbidden terms, with those of newly leaked concepts
    # and the leaked spelling itself
    leak_start: int = 0  # for a regeneration: where the first leaked name starts; the text before it is kept


class Guard:
    """A loaded policy with its detectors; safe to share between concurrent requests."""

    def __init__(self, policy: Policy, show_progress: bool = False):
        self.policy = policy
        try:
            self.classifier = PolicyClassifier(policy, show_progress=show_progress)
            self.forget = ForgetRetriever(policy, self.classifier.encoder, self.classifier.query_cache)
            languages = policy.languages
            self.languages = LanguageDetector(languages.covered, languages.uncovered, languages.min_confidence)
        except DetectorError as err:
            raise GuardUnavailable(str(err)) from err
        self._refused = frozenset(c.id for c in policy.concepts if c.action.type is ActionType.refuse)
        self._penalties: dict[int, "TokenPenalties"] = {}
        self._penalties_lock = threading.Lock()
        self.always_penalized = [c.id for c in policy.concepts
                                 if c.methods.token_penalty.enabled and c.methods.token_penalty.apply == "always"]
        # Near-miss names count as naming a steered concept in the output check only (never in the prompt check).
        tokenizer = getattr(self.classifier.encoder, "tokenizer", None)  # its whole words are the common words
        vocabulary = tokenizer.get_vocab() if tokenizer is not None else {}
        self.alias_automaton = AliasAutomaton(self.classifier.aliases)  # streams: where an alias may be under way
        steered = [c for c in policy.concepts if c.action.type is ActionType.steer and c.detection.aliases]
        self.near_misses = FuzzyAliasDetector({c.id: c.aliases for c in steered},
                                              common_words=[word for word in vocabulary if word.isalpha()])
        # A profile's terms and their near misses name a concept only in answers to requests penalised for it: they
        # are the concept's vocabulary, which unrelated answers may use freely. Names only for near misses.
        self.profile_terms = AliasDetector({c.id: c.profile_terms for c in steered if c.profile_terms})
        self.profile_near_misses = FuzzyAliasDetector(
            {c.id: [t for t in c.profile_terms if t[:1].isupper()] for c in steered if c.profile_terms},
            common_words=[word for word in vocabulary if word.isalpha()])
        # Rare names of a steered concept's knowledge (its forget store and profile): in a request they steer the
        # concept, never refuse it, and join the request's forbidden terms, so the answer cannot echo them.
        self.knowledge_names = AliasDetector({
            c.id: found for c in policy.concepts
            if c.action.type is ActionType.steer and c.methods.token_penalty.enabled
            and (found := knowledge_names([e.text for e in c.forget_entries], c.profile_terms, exclude=c.aliases))})
        self._term_detectors: OrderedDict[tuple[str, ...], AliasDetector] = OrderedDict()
        self._term_detectors_lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path, show_progress: bool = False) -> "Guard":
        return cls(load_policy(path), show_progress=show_progress)

    @property
    def concept_ids(self) -> list[str]:
        return [c.id for c in self.policy.concepts]

    def classify(self, texts: Sequence[str], stop_on_refusal: bool = False) -> Verdict:
        """The verdict on ``texts``; with ``stop_on_refusal`` an alias of a refused concept that nothing can veto
        decides at once (early exit: the request is refused whatever else it touches, so the verdict then lists
        the alias-named refused concepts only)."""
        try:
            classification = self.classifier.detect(texts, self._refused if stop_on_refusal else ())
        except DetectorError as err:
            raise GuardUnavailable(str(err)) from err
        refused, steered, logged = [], [], []
        for concept_id in classification.flagged_ids:
            action = self.policy.concept(concept_id).action.type
            {ActionType.refuse: refused, ActionType.steer: steered, ActionType.log: logged}[action].append(concept_id)
        return Verdict(classification, refused, steered, logged)

    def classify_prompt(self, texts: Sequence[str], stop_on_refusal: bool = False) -> Verdict:
        """The verdict on a request's texts: :meth:`classify`, and a steered concept not flagged otherwise whose
        knowledge names a text uses ("Charmander" for a pokemon concept) is steered too — weak evidence, so it
        never refuses."""
        return self._classify_prompt(texts, stop_on_refusal)[0]

    def _classify_prompt(self, texts: Sequence[str], stop_on_refusal: bool
                         ) -> tuple[Verdict, list[tuple[int, AliasHit]]]:
        """:meth:`classify_prompt`, with the knowledge-name hits it read (none when the request is refused)."""
        verdict = self.classify(texts, stop_on_refusal)
        if verdict.refused:
            return verdict, []
        hits = self._knowledge_hits(texts)
        flagged = set(verdict.flagged)
        found: dict[str, ConceptScore] = {}
        for source, hit in hits:
            if hit.concept_id not in flagged and hit.concept_id not in found:
                found[hit.concept_id] = ConceptScore(
                    concept_id=hit.concept_id, score=1.0, threshold=1.0, flagged=True, detector="knowledge",
                    evidence=f"knowledge name '{hit.alias}' of its forget store or profile in message {source}")
        if not found:
            return verdict, hits
        scores = [s for s in verdict.classification.scores if s.concept_id not in found] + list(found.values())
        return Verdict(Classification.ranked(scores), verdict.refused, verdict.steered + list(found),
                       verdict.logged), hits

    def _knowledge_hits(self, texts: Sequence[str]) -> list[tuple[int, AliasHit]]:
        try:
            return [(source, hit) for source, text in enumerate(texts) for hit in self.knowledge_names.find(text)]
        except Exception as err:  # noqa: BLE001 - a matcher failure must fail closed
            raise GuardUnavailable(f"knowledge-name check failed: {err}") from err

    def refusal_message(self, concept_ids: Sequence[str]) -> str:
        return self.policy.refusal_message(concept_ids)

    def language_report(self, texts: Sequence[str]) -> LanguageReport:
        """The languages of ``texts`` and what the policy's ``languages`` block does about uncovered ones."""
        try:
            return self.languages.report(texts)
        except DetectorError as err:
            raise GuardUnavailable(str(err)) from err

    def check_prompt(self, texts: Sequence[str]) -> PromptDecision:
        """Raise :class:`ConceptRefused` for refused concepts; otherwise say which concepts to erase."""
        started = time.perf_counter()
        verdict, named = self._classify_prompt(texts, stop_on_refusal=True)
        ms = (time.perf_counter() - started) * 1000
        if verdict.refused:
            raise ConceptRefused(verdict.refused, self.refusal_message(verdict.refused), ms=ms)
        decision = self.prompt_decision(verdict)
        if decision.penalized:
            echoed = [hit.alias for _, hit in named if hit.concept_id in decision.penalized]
            terms = self._forget_terms(texts, decision.penalized)
            decision = replace(decision, terms=terms + tuple(t for t in dict.fromkeys(echoed) if t not in terms))
        return replace(decision, ms=(time.perf_counter() - started) * 1000)

    def _forget_terms(self, texts: Sequence[str], concept_ids: Sequence[str]) -> tuple[str, ...]:
        """Forbidden terms of the forget entries closest to ``texts`` (GUARD's retrieval); fails closed."""
        if not concept_ids:
            return ()
        try:
            return self.forget.terms(texts, concept_ids)
        except DetectorError as err:
            raise GuardUnavailable(str(err)) from err

    def prompt_decision(self, verdict: Verdict) -> PromptDecision:
        """Which concepts decoding erases for a prompt judged ``verdict`` (refused concepts aside); check-only
        callers take it to judge an output without raising for a refused prompt."""
        penalized = [cid for cid in verdict.steered if self.policy.concept(cid).methods.token_penalty.enabled]
        return PromptDecision(verdict, list(dict.fromkeys(penalized + self.always_penalized)))

    def check_output(self, text: str, decision: PromptDecision, attempt: int = 0) -> OutputDecision:
        """Decide about generated text; ``attempt`` counts regenerations already made.

        A refused concept leaks on any evidence. A steered concept leaks only when the text *names* it (alias
        evidence, or a near miss of a distinctive alias: :mod:`detectors.fuzzy`): steering exists to answer
        on-topic requests without the forbidden names, and exemplars are questions, so meaning-level similarity
        of an answer would block every on-topic reply.

        When regenerations are used up and every leaked concept is steered with an ``action.fallback``, the
        choice is answered with the first leaked concept's fallback; otherwise it is blocked.
        """
        started = time.perf_counter()
        decided = self._judge_output(text, decision, attempt)
        return replace(decided, ms=(time.perf_counter() - started) * 1000)

    def _judge_output(self, text: str, decision: PromptDecision, attempt: int) -> OutputDecision:
        verdict = self.classify([text], stop_on_refusal=True)
        try:
            near = self.near_misses.detect([text])
        except Exception as err:  # noqa: BLE001 - any matcher failure must fail closed, like the classifier's
            raise GuardUnavailable(f"near-miss check failed: {err}") from err
        named = {s.concept_id for s in verdict.classification.flagged if s.detector == "alias"}
        vocabulary = [s for s in self._vocabulary_named(text, decision) if s.concept_id not in named]
        named |= {s.concept_id for s in vocabulary}
        # A near miss is evidence only where no exact alias already names the concept (one row per concept).
        misses = [s for s in near.flagged if s.concept_id not in named] + vocabulary
        named |= {s.concept_id for s in misses}
        steered = list(dict.fromkeys(verdict.steered + [s.concept_id for s in misses]))  # near misses: steer only
        if misses:
            verdict = Verdict(Classification.ranked(verdict.classification.scores + misses), verdict.refused,
                              steered, verdict.logged)
        leaked = verdict.refused + [cid for cid in steered if cid in named]
        if not leaked:
            return OutputDecision(OutputAction.send, verdict)
        fallbacks = [self.policy.concept(cid).action.fallback for cid in leaked]
        fallback = fallbacks[0] if not verdict.refused and None not in fallbacks else None
        retries = min(self.policy.concept(cid).methods.token_penalty.max_regenerations for cid in leaked)
        if not verdict.refused and attempt < retries:
            enabled = [cid for cid in leaked if self.policy.concept(cid).methods.token_penalty.enabled]
            penalized = list(dict.fromkeys(decision.penalized + enabled))
            # A concept the prompt check missed gets the forget entries closest to what the model wrote about it.
            terms = decision.terms + tuple(t for t in self._forget_terms([text], [c for c in enabled
                                                                                  if c not in decision.penalized])
                                           if t not in decision.terms)
            start, spelling = self._leak_span(text, decision, leaked, terms)
            if spelling and spelling not in terms:
                terms += (spelling,)
            return OutputDecision(OutputAction.regenerate, verdict, penalized, strength=2.0 ** (attempt + 1),
                                  message=fallback or "", fallback=fallback is not None, leaked=leaked, terms=terms,
                                  leak_start=start)
        if fallback is not None:
            return OutputDecision(OutputAction.block, verdict, message=fallback, fallback=True, leaked=leaked)
        return OutputDecision(OutputAction.block, verdict, message=self.refusal_message(leaked), leaked=leaked)

    def _leak_span(self, text: str, decision: PromptDecision, leaked: Sequence[str],
                   terms: tuple[str, ...]) -> tuple[int, str]:
        """Where the kept text of a regeneration ends, and the leaked name's spelling.

        The cut is at the first name of a ``leaked`` concept or the first of the regeneration's forbidden
        ``terms``, whichever comes first: the shortest prefix (in words) that holds one, then the fewest of its
        last words that still do (the spelling). The cut moves back over the capitalised words just before it, the
        other parts of the same name ("Elon" before "Musk"), so a kept prefix never ends inside a name.
        ``(0, "")`` when no name is found word by word (e.g. the evidence was a refused concept): the whole answer
        is regenerated."""
        concepts = set(leaked)
        forbidden = self._term_detector(terms) if terms else None

        def holds_name(span: str) -> bool:
            return self._names(span, decision, concepts) or (forbidden is not None and bool(forbidden.find(span)))

        words = list(_WORD.finditer(text))
        for last, word in enumerate(words):
            if not holds_name(text[: word.end()]):
                continue
            first = next(first for first in range(last, -1, -1) if holds_name(text[words[first].start(): word.end()]))
            spelling = _EDGE_PUNCTUATION.sub("", text[words[first].start(): word.end()])
            while first > 0 and words[first - 1].group()[:1].isupper() and not _SENTENCE_END.search(
                    words[first - 1].group()):
                first -= 1
            return words[first].start(), spelling
        return 0, ""

    def _names(self, text: str, decision: PromptDecision, concepts: set[str]) -> bool:
        """Whether ``text`` names one of ``concepts``: an alias, a near miss, or (penalised ones) their vocabulary."""
        try:
            named = {hit.concept_id for hit in self.classifier.aliases.find(text)}
            named |= {score.concept_id for score in self.near_misses.detect([text]).flagged}
        except Exception as err:  # noqa: BLE001 - a matcher failure must fail closed
            raise GuardUnavailable(f"near-miss check failed: {err}") from err
        return bool(named & concepts) or any(s.concept_id in concepts for s in self._vocabulary_named(text, decision))

    def _term_detector(self, terms: tuple[str, ...]) -> AliasDetector:
        """The matcher of a request's forbidden terms, compiled once per term set (every output check reuses it)."""
        with self._term_detectors_lock:
            detector = self._term_detectors.get(terms)
            if detector is not None:
                self._term_detectors.move_to_end(terms)
                return detector
        detector = AliasDetector({"terms": list(terms)})
        with self._term_detectors_lock:
            self._term_detectors[terms] = detector
            while len(self._term_detectors) > TERM_DETECTORS_KEPT:
                self._term_detectors.popitem(last=False)
        return detector

    def named_concepts(self, text: str) -> list[str]:
        """Every concept ``text`` names — an alias however disguised, or a near miss of a steered concept's alias —
        whatever the concept's action: the output check's evidence of a leak, for ``tests.must_not_leak``."""
        verdict = self.classify([text])
        try:
            near = self.near_misses.detect([text])
        except Exception as err:  # noqa: BLE001 - as in check_output: a matcher failure must fail closed
            raise GuardUnavailable(f"near-miss check failed: {err}") from err
        named = [s.concept_id for s in verdict.classification.flagged if s.detector == "alias"]
        return list(dict.fromkeys(named + [s.concept_id for s in near.flagged]))

    def _vocabulary_named(self, text: str, decision: PromptDecision) -> list[ConceptScore]:
        """Scores of penalised concepts that the text names by their vocabulary: a profile term or its near miss,
        or one of the request's forbidden terms (each penalised concept counts at most once)."""
        penalized = set(decision.penalized)
        try:
            found = [s for s in self.profile_terms.detect([text]).flagged + self.profile_near_misses.detect([text]).flagged
                     if s.concept_id in penalized]
            if decision.terms and not found:
                hits = self._term_detector(decision.terms).find(text)
                if hits:
                    found = [ConceptScore(concept_id=cid, score=1.0, threshold=1.0, flagged=True, detector="forget",
                                          evidence=f"forbidden term '{hits[0].alias}' of the forget store")
                             for cid in decision.penalized if cid in self.forget.concept_ids][:1]
        except Exception as err:  # noqa: BLE001 - a matcher failure must fail closed
            raise GuardUnavailable(f"vocabulary check failed: {err}") from err
        unique: dict[str, ConceptScore] = {}
        for score in found:
            unique.setdefault(score.concept_id, score)
        return list(unique.values())

    def token_penalties(self, tokenizer: "PreTrainedTokenizerBase") -> "TokenPenalties":
        """Per-tokenizer penalty tables, compiled once (tries and vocabulary masks are costly to build)."""
        from guard.methods.token_penalty.tables import TokenPenalties

        key = id(tokenizer)
        with self._penalties_lock:
            if key not in self._penalties:
                self._penalties[key] = TokenPenalties(self.policy, tokenizer, self.classifier.encoder)
            return self._penalties[key]


@dataclass(frozen=True)
class PolicyTestFailure:
    case: str  # e.g. "tests.must_refuse[2]"
    text: str
    problem: str  # "was not refused", "was refused (weapons)"
    file: Path | None
    line: int | None

    def error(self, others: int = 0) -> PolicyError:
        more = f" (and {others} more failing case{'s' if others > 1 else ''})" if others else ""
        return PolicyError(self.file or "policy", f"'{self.text}' {self.problem}{more}", self.line, self.case)


def run_policy_tests(guard: Guard) -> list[PolicyTestFailure]:
    """Every ``tests:`` case of the guard's policy that the prompt check decides otherwise (detector errors raise)."""
    failures = []
    tests = guard.policy.tests
    for kind, cases in (("must_refuse", tests.must_refuse), ("must_allow", tests.must_allow)):
        for index, text in enumerate(cases):
            refused = guard.classify([text]).refused
            if kind == "must_refuse" and not refused:
                problem = "was not refused"
            elif kind == "must_allow" and refused:
                problem = f"was refused ({', '.join(refused)})"
            else:
                continue
            failures.append(PolicyTestFailure(f"tests.{kind}[{index}]", text, problem,
                                              *guard.policy.test_location(kind, index)))
    return failures


def leak_test_failures(guard: Guard, answers: Sequence[str]) -> list[PolicyTestFailure]:
    """The ``tests.must_not_leak`` cases whose guarded answer (``answers[i]`` for case i, made by the caller's
    engine; "" where the prompt was refused or the answer withheld) names a concept."""
    failures = []
    for index, (prompt, answer) in enumerate(zip(guard.policy.tests.must_not_leak, answers, strict=True)):
        named = guard.named_concepts(answer)
        if named:
            failures.append(PolicyTestFailure(f"tests.must_not_leak[{index}]", prompt,
                                              f"was answered naming {', '.join(named)}: {answer[:120]!r}",
                                              *guard.policy.test_location("must_not_leak", index)))
    return failures


def check_policy_tests(guard: Guard) -> None:
    """Raise :class:`PolicyError` naming the first failing ``tests:`` case (file:line), if any fails."""
    failures = run_policy_tests(guard)
    if failures:
        raise failures[0].error(len(failures) - 1)
