"""erase-and-check: certified detection of harmful prompts under adversarial tokens (Kumar et al., COLM 2024).

An attacker hides a harmful prompt P behind adversarial tokens α (a suffix, k inserted blocks, or tokens
scattered anywhere) so that the filter misses P ⊕ α. erase-and-check labels a prompt harmful if the filter
flags the prompt itself or any version of it with up to d tokens erased. One of those versions is P, so
**every harmful prompt the filter catches stays caught under any attack of at most d tokens**: certified
accuracy on attacked harmful prompts is at least the filter's accuracy on clean ones.

Tokens are the word pieces of the filter's own tokenizer (MiniLM's WordPiece for the shipped filters), as in
the paper. Erased versions are rebuilt from the prompt's character offsets, never by decoding token ids, so
removing exactly the attacker's tokens gives back P's text (suffix mode: byte-identical; insertion and
infusion: identical except for whitespace at the seams, which the WordPiece tokenizer ignores). An attack
that glues characters onto P's last word changes P's own tokens and is outside the threat model, as in
the paper.

Versions are deduplicated by text and classified in batches in which every filter shares one embedding
pass (:class:`CachedEncoder`), so certifying costs about one batched forward pass per prompt.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import numpy as np
from pydantic import ValidationError

from guard.errors import CertifyError
from guard.models import load_sentence_encoder
from guard.policy import CertifySettings, Policy

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from tokenizers import Tokenizer

    from detectors.base import Classification

Mode = Literal["suffix", "insertion", "infusion"]
Variant = Literal["exact", "randomized", "greedy"]
FilterName = Literal["policy", "harmful_classifier", "both"]
MODES: tuple[Mode, ...] = ("suffix", "insertion", "infusion")
VARIANTS: tuple[Variant, ...] = ("exact", "randomized", "greedy")
FILTERS: tuple[FilterName, ...] = ("policy", "harmful_classifier", "both")

# Infusion grows like C(n, d) and insertion like (n·d)^k: past this many erased versions a request would stall
# the server, so certification refuses (fail closed) instead of silently checking fewer.
MAX_SUBSEQUENCES = 100_000


# ---------------------------------------------------------------------------------------------------------------
# Filters


@runtime_checkable
class Filter(Protocol):
    """Anything that says which of a batch of prompts are harmful. Plug your own in."""

    name: str

    def is_harmful_batch(self, prompts: Sequence[str]) -> list[bool]: ...


@runtime_checkable
class ScoringFilter(Filter, Protocol):
    """A filter that also grades prompts: score > 0 exactly when the prompt is harmful.

    GreedyEC needs the grade to decide which token to erase next.
    """

    def harmful_scores(self, prompts: Sequence[str]) -> list[float]: ...


class CachedEncoder:
    """A SentenceTransformer stand-in that remembers recent vectors.

    All filters of one certifier embed through the same instance, and each batch is prefetched in one
    forward pass, so the policy detectors and the harmful head never embed the same erased version twice.
    ``capacity=0`` remembers nothing between calls (benchmarks use it so every prompt pays its own way).
    """

    def __init__(self, encoder: SentenceTransformer, capacity: int = 16_384):
        self.encoder = encoder
        self.capacity = capacity
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def tokenizer(self):  # noqa: ANN201 - the wrapped encoder's tokenizer
        return self.encoder.tokenizer

    def get_embedding_dimension(self) -> int:
        return int(self.encoder.get_embedding_dimension())

    def clear(self) -> None:
        """Forget every vector, so the next prompt pays for its own embeddings (benchmarks of a fresh prompt)."""
        with self._lock:
            self._vectors.clear()

    def encode(self, sentences: Sequence[str], batch_size: int = 64, convert_to_numpy: bool = True,
               normalize_embeddings: bool = True, show_progress_bar: bool = False) -> np.ndarray:
        """Unit-length float32 vectors, one row per sentence; only unseen sentences reach the model."""
        if not (convert_to_numpy and normalize_embeddings):
            raise CertifyError("the shared certification encoder only returns normalised numpy vectors")
        sentences = list(sentences)
        with self._lock:
            missing = list(dict.fromkeys(s for s in sentences if s not in self._vectors))
            if missing:
                fresh = self.encoder.encode(missing, batch_size=batch_size, convert_to_numpy=True,
                                            normalize_embeddings=True, show_progress_bar=show_progress_bar)
                for sentence, vector in zip(missing, np.asarray(fresh, dtype=np.float32)):
                    self._vectors[sentence] = vector
            for sentence in sentences:
                self._vectors.move_to_end(sentence)
            rows = [self._vectors[s] for s in sentences]
            while len(self._vectors) > self.capacity:
                self._vectors.popitem(last=False)
        if not rows:
            return np.zeros((0, self.get_embedding_dimension()), np.float32)
        return np.ascontiguousarray(np.stack(rows), dtype=np.float32)


def _margin(classification: Classification, thresholds: dict[str, float]) -> float:
    """> 0 iff a concept is flagged; otherwise how far the closest concept is below its threshold."""
    if classification.flagged:
        return 1.0 + max(s.score - thresholds[s.concept_id] for s in classification.flagged)
    if not classification.scores:
        return -1.0
    # A vetoed concept (closer to a negative exemplar) can sit above its threshold: keep it just below zero.
    return max(min(s.score - thresholds[s.concept_id], -1e-6) for s in classification.scores)


class PolicyFilter:
    """The policy's own detectors as an erase-and-check filter: harmful iff any concept is flagged."""

    name = "policy"

    def __init__(self, policy: Policy, encoder: CachedEncoder):
        from detectors.classifier import PolicyClassifier

        self.encoder = encoder
        self.classifier = PolicyClassifier(policy)
        # This classifier is ours alone: route its embeddings through the shared cache so a batch of erased
        # versions costs one forward pass instead of one per version.
        self.classifier.semantic.encoder = encoder
        self._thresholds = {c.id: c.detection.semantic_threshold for c in policy.concepts}

    def harmful_scores(self, prompts: Sequence[str]) -> list[float]:
        from detectors.semantic import split_pieces

        self.encoder.encode([piece for prompt in prompts for piece in split_pieces([prompt])])
        return [_margin(self.classifier.classify([prompt]), self._thresholds) for prompt in prompts]

    def is_harmful_batch(self, prompts: Sequence[str]) -> list[bool]:
        return [score > 0 for score in self.harmful_scores(prompts)]


class EitherFilter:
    """Harmful if any of the filters says so (the policy's ``filter: both``)."""

    def __init__(self, filters: Sequence[ScoringFilter], name: str = "both"):
        if not filters:
            raise CertifyError("EitherFilter needs at least one filter")
        self.filters = list(filters)
        self.name = name

    def harmful_scores(self, prompts: Sequence[str]) -> list[float]:
        columns = [f.harmful_scores(prompts) for f in self.filters]
        return [max(row) for row in zip(*columns)]

    def is_harmful_batch(self, prompts: Sequence[str]) -> list[bool]:
        return [score > 0 for score in self.harmful_scores(prompts)]


def build_filter(policy: Policy, name: FilterName) -> tuple[ScoringFilter, CachedEncoder]:
    """The filter named by ``policy.certify.filter``, plus the shared encoder whose tokenizer defines tokens."""
    from detectors.harmful import HarmfulHead, HarmfulRequestClassifier

    if name not in FILTERS:
        raise CertifyError(f"unknown filter '{name}' (known: {', '.join(FILTERS)})")
    if name == "policy":
        encoder = CachedEncoder(load_sentence_encoder(policy.models.embedding))
        return PolicyFilter(policy, encoder), encoder
    head = HarmfulHead.load()
    encoder = CachedEncoder(load_sentence_encoder(head.encoder))
    harmful = HarmfulRequestClassifier(head, encoder)
    if name == "harmful_classifier":
        return harmful, encoder
    # Erasure works on the head's tokens; both filters read the same erased texts and share one embedding
    # pass when the policy embeds with the head's encoder (the default).
    policy_encoder = encoder if policy.models.embedding == head.encoder else CachedEncoder(
        load_sentence_encoder(policy.models.embedding))
    return EitherFilter([PolicyFilter(policy, policy_encoder), harmful]), encoder


def backend_tokenizer(encoder: CachedEncoder) -> Tokenizer:
    """A private copy of the encoder's fast tokenizer without padding or truncation: erasure needs every token
    of the prompt with its character offsets, and the encoder's own tokenizer must stay as it is."""
    from tokenizers import Tokenizer

    shared = getattr(encoder.tokenizer, "backend_tokenizer", None)
    if shared is None:
        raise CertifyError("erase-and-check needs a fast (Rust) tokenizer with character offsets "
                           "for the filter's encoder")
    tokenizer = Tokenizer.from_str(shared.to_str())
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Tokens and erased versions


class TokenizedPrompt:
    """A prompt as the filter's tokens, able to rebuild its text with any subset of tokens kept."""

    def __init__(self, text: str, tokenizer: Tokenizer):
        self.text = text
        encoding = tokenizer.encode(text, add_special_tokens=False)
        self.tokens: list[str] = list(encoding.tokens)
        self.spans: list[tuple[int, int]] = [tuple(o) for o in encoding.offsets]
        # A continuation piece ("##ing") has no boundary before it; rejoining it after an erasure needs no space.
        self.continues: list[bool] = [
            i > 0 and start == self.spans[i - 1][1] and text[start - 1].isalnum() and text[start].isalnum()
            for i, (start, _) in enumerate(self.spans)]

    def __len__(self) -> int:
        return len(self.tokens)

    def render(self, kept: Sequence[int]) -> str:
        """Text of the kept tokens: original characters where they were adjacent, the erased run's own gap at seams."""
        if len(kept) == len(self.tokens):
            return self.text
        if not kept:
            return ""
        spans = self.spans
        parts = [self.text[spans[kept[0]][0]:spans[kept[0]][1]]]
        for previous, current in zip(kept, kept[1:]):
            if current == previous + 1:
                parts.append(self.text[spans[previous][1]:spans[current][1]])
                continue
            if self.continues[current]:
                seam = ""
            else:
                before = self.text[spans[previous][1]:spans[previous + 1][0]]
                after = self.text[spans[current - 1][1]:spans[current][0]]
                seam = before or after or " "
            parts.append(seam + self.text[spans[current][0]:spans[current][1]])
        return "".join(parts).strip()


def _suffix_erasures(n: int, max_erase: int) -> Iterator[tuple[int, ...]]:
    for erased in range(1, min(max_erase, n - 1) + 1):
        yield tuple(range(n - erased))


def _insertion_erasures(n: int, max_erase: int, max_insertions: int) -> Iterator[tuple[int, ...]]:
    """Every erased set made of at most k blocks of at most d tokens, each set once, fewest erased first.

    A set is listed by its maximal runs; a run of L tokens needs ceil(L / d) blocks.
    """
    def runs(position: int, budget: int) -> Iterator[list[tuple[int, int]]]:
        yield []
        for start in range(position, n):
            for length in range(1, min(budget * max_erase, n - start) + 1):
                cost = math.ceil(length / max_erase)
                for rest in runs(start + length + 1, budget - cost):
                    yield [(start, length), *rest]

    if max_erase == 0:
        return
    erased_sets = []
    for chosen in runs(0, max_insertions):
        erased = {i for start, length in chosen for i in range(start, start + length)}
        if 0 < len(erased) < n:
            erased_sets.append(erased)
            if len(erased_sets) > MAX_SUBSEQUENCES:
                raise _too_many("insertion", n, max_erase)
    for erased in sorted(erased_sets, key=len):
        yield tuple(i for i in range(n) if i not in erased)


def _infusion_erasures(n: int, max_erase: int) -> Iterator[tuple[int, ...]]:
    for count in range(1, min(max_erase, n - 1) + 1):
        for erased in itertools.combinations(range(n), count):
            gone = set(erased)
            yield tuple(i for i in range(n) if i not in gone)


def _too_many(mode: str, n: int, max_erase: int) -> CertifyError:
    return CertifyError(f"{mode} mode with max_erase={max_erase} on a {n}-token prompt needs more than "
                        f"{MAX_SUBSEQUENCES:,} erased versions; lower max_erase or use suffix mode")


def erased_versions(prompt: TokenizedPrompt, mode: Mode, max_erase: int,
                    max_insertions: int = 1) -> list[tuple[str, int]]:
    """(text, tokens erased) for the prompt itself and every distinct erased version, fewest erased first."""
    n = len(prompt)
    if mode == "suffix":
        kept_sets: Iterable[tuple[int, ...]] = _suffix_erasures(n, max_erase)
    elif mode == "insertion":
        kept_sets = _insertion_erasures(n, max_erase, max_insertions)
    elif mode == "infusion":
        if sum(math.comb(n, count) for count in range(min(max_erase, n - 1) + 1)) > MAX_SUBSEQUENCES:
            raise _too_many(mode, n, max_erase)
        kept_sets = _infusion_erasures(n, max_erase)
    else:
        raise CertifyError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
    versions: dict[str, int] = {prompt.text: 0}
    for kept in kept_sets:
        versions.setdefault(prompt.render(kept), n - len(kept))
        if len(versions) > MAX_SUBSEQUENCES:
            raise _too_many(mode, n, max_erase)
    return list(versions.items())


# ---------------------------------------------------------------------------------------------------------------
# Certification


@dataclass(frozen=True)
class Certificate:
    """The verdict of erase-and-check on one prompt.

    ``certified`` is true for the exact variant: then a ``flagged=False`` verdict means no prompt the filter
    would flag hides behind at most ``max_erase`` adversarial tokens (in the given mode), and a harmful prompt
    the filter flags is flagged whatever ≤ d tokens are added to it. RandEC and GreedyEC are empirical only.
    """

    flagged: bool
    mode: str
    max_erase: int
    max_insertions: int
    variant: str
    filter: str
    certified: bool
    tokens: int  # prompt length in the filter's tokens
    subsequences_total: int  # distinct versions (prompt included) the variant would check
    subsequences_checked: int  # versions classified before the verdict was known
    trigger: str | None  # the checked version the filter flagged (the prompt itself if nothing was erased)
    trigger_erased_tokens: int | None
    elapsed_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def header_value(self) -> str:
        """Compact form for an HTTP response header (the trigger text is left out: it may be long)."""
        return (f"flagged={str(self.flagged).lower()}; mode={self.mode}; d={self.max_erase}; variant={self.variant}; "
                f"filter={self.filter}; certified={str(self.certified).lower()}; "
                f"checked={self.subsequences_checked}/{self.subsequences_total}; ms={self.elapsed_s * 1000:.1f}")


class EraseAndCheck:
    """Certifies prompts against one filter with fixed settings; reusable and safe to share between threads."""

    def __init__(self, filter: Filter, tokenizer: Tokenizer, mode: Mode = "suffix", max_erase: int = 10,
                 max_insertions: int = 1, variant: Variant = "exact", sample_fraction: float = 0.2, seed: int = 0,
                 batch_size: int = 128):
        if mode not in MODES:
            raise CertifyError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        if variant not in VARIANTS:
            raise CertifyError(f"unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
        if max_erase < 0 or max_insertions < 1 or batch_size < 1:
            raise CertifyError("max_erase must be ≥ 0, max_insertions ≥ 1 and batch_size ≥ 1")
        if not 0.0 <= sample_fraction <= 1.0:
            raise CertifyError("sample_fraction must be between 0 and 1")
        if variant == "greedy" and not isinstance(filter, ScoringFilter):
            raise CertifyError(f"the greedy variant needs a filter with harmful_scores(); '{filter.name}' has none")
        self.filter = filter
        self.tokenizer = tokenizer
        self.mode = mode
        self.max_erase = max_erase
        self.max_insertions = max_insertions
        self.variant = variant
        self.sample_fraction = sample_fraction
        self.seed = seed
        self.batch_size = batch_size

    @classmethod
    def from_policy(cls, policy: Policy, mode: Mode | None = None, max_erase: int | None = None,
                    max_insertions: int | None = None, variant: Variant | None = None,
                    sample_fraction: float | None = None, filter: FilterName | None = None, seed: int = 0,
                    batch_size: int = 128) -> EraseAndCheck:
        """Settings from ``policy.certify`` (defaults when the policy has none); arguments that are not None win."""
        overrides = {"mode": mode, "max_erase": max_erase, "max_insertions": max_insertions, "variant": variant,
                     "sample_fraction": sample_fraction, "filter": filter}
        settings = (policy.certify or CertifySettings()).model_dump()
        settings.update({key: value for key, value in overrides.items() if value is not None})
        try:
            checked = CertifySettings.model_validate(settings)
        except ValidationError as err:
            first = err.errors()[0]
            raise CertifyError(f"certify.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        filter_, encoder = build_filter(policy, checked.filter)
        return cls(filter_, backend_tokenizer(encoder), mode=checked.mode, max_erase=checked.max_erase,
                   max_insertions=checked.max_insertions, variant=checked.variant,
                   sample_fraction=checked.sample_fraction, seed=seed, batch_size=batch_size)

    def tokenize(self, prompt: str) -> TokenizedPrompt:
        return TokenizedPrompt(prompt, self.tokenizer)

    def versions(self, prompt: str) -> list[tuple[str, int]]:
        """(text, tokens erased) for each distinct version the exact or randomized variant checks, prompt first."""
        return self._versions(self.tokenize(prompt))

    def _versions(self, tokenized: TokenizedPrompt) -> list[tuple[str, int]]:
        versions = erased_versions(tokenized, self.mode, self.max_erase, self.max_insertions)
        if self.variant != "randomized":
            return versions
        # RandEC: the prompt plus ⌊ρ·(N−1)⌋ erased versions, drawn with a per-prompt seed so verdicts are
        # reproducible and independent of the order prompts arrive in.
        digest = hashlib.sha256(f"{self.seed}\0{tokenized.text}".encode()).digest()
        rng = random.Random(int.from_bytes(digest[:8], "big"))
        sampled = rng.sample(versions[1:], math.floor(self.sample_fraction * (len(versions) - 1)))
        return [versions[0], *sorted(sampled, key=lambda version: version[1])]

    def certify(self, prompt: str) -> Certificate:
        started = time.perf_counter()
        tokenized = self.tokenize(prompt)
        if self.variant == "greedy":
            return self._greedy(tokenized, started)
        versions = self._versions(tokenized)
        checked = 0
        for first in range(0, len(versions), self.batch_size):
            batch = versions[first:first + self.batch_size]
            verdicts = self.filter.is_harmful_batch([text for text, _ in batch])
            if len(verdicts) != len(batch):
                raise CertifyError(f"filter '{self.filter.name}' returned {len(verdicts)} verdicts "
                                   f"for {len(batch)} prompts")
            checked += len(batch)
            for (text, erased), harmful in zip(batch, verdicts):
                if harmful:
                    return self._certificate(tokenized, True, len(versions), checked, text, erased, started)
        return self._certificate(tokenized, False, len(versions), checked, None, None, started)

    def certify_many(self, prompts: Sequence[str],
                     on_done: Callable[[Certificate], None] | None = None) -> list[Certificate]:
        certificates = []
        for prompt in prompts:
            certificates.append(self.certify(prompt))
            if on_done is not None:
                on_done(certificates[-1])
        return certificates

    def _greedy(self, tokenized: TokenizedPrompt, started: float) -> Certificate:
        """GreedyEC: for up to d rounds, erase the one token whose erasure makes the prompt look most harmful."""
        scorer: ScoringFilter = self.filter  # type: ignore[assignment] - checked in __init__
        frontier: dict[str, list[int]] = {tokenized.text: list(range(len(tokenized)))}
        checked = 0
        for erased in range(min(self.max_erase, max(len(tokenized) - 1, 0)) + 1):
            texts = list(frontier)
            scores = scorer.harmful_scores(texts)
            checked += len(texts)
            best = int(np.argmax(scores))
            if scores[best] > 0:
                return self._certificate(tokenized, True, checked, checked, texts[best], erased, started)
            kept = frontier[texts[best]]
            frontier = {}
            for position in range(len(kept)):
                shorter = kept[:position] + kept[position + 1:]
                frontier.setdefault(tokenized.render(shorter), shorter)
        return self._certificate(tokenized, False, checked, checked, None, None, started)

    def _certificate(self, tokenized: TokenizedPrompt, flagged: bool, total: int, checked: int,
                     trigger: str | None, erased: int | None, started: float) -> Certificate:
        return Certificate(flagged=flagged, mode=self.mode, max_erase=self.max_erase,
                           max_insertions=self.max_insertions, variant=self.variant, filter=self.filter.name,
                           certified=self.variant == "exact", tokens=len(tokenized),
                           subsequences_total=total, subsequences_checked=checked, trigger=trigger,
                           trigger_erased_tokens=erased, elapsed_s=time.perf_counter() - started)
