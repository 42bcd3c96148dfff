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

The filter is any :class:`detectors.base.Detector`: a version is harmful iff the detector flags anything in it.
Versions are deduplicated by text and classified in batches in which every detector shares one embedding
pass (:class:`detectors.encoder.CachedEncoder`), so certifying costs about one batched forward pass per prompt.
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
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
from pydantic import ValidationError

from detectors.base import Classification, CombinedDetector, Detector
from detectors.classifier import PolicyClassifier
from detectors.encoder import CachedEncoder
from detectors.harmful import HarmfulHead, HarmfulRequestClassifier
from guard.errors import CertifyError
from guard.models import load_sentence_encoder
from guard.policy import CertifySettings, Policy

if TYPE_CHECKING:
    from tokenizers import Tokenizer

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
# Filters: any Detector; a prompt is harmful iff the detector flags anything in it


def _greedy_grade(classification: Classification) -> float:
    """How harmful a version looks to GreedyEC: > 0 iff anything is flagged (then 1 + the best flagged margin),
    otherwise the best margin, kept below zero (a vetoed concept can sit above its threshold)."""
    if classification.flagged:
        return 1.0 + max(s.margin for s in classification.flagged)
    return max((min(s.margin, -1e-6) for s in classification.scores), default=-1.0)


def build_filter(policy: Policy, name: FilterName,
                 cache: CachedEncoder | None = None) -> tuple[Detector, CachedEncoder]:
    """The detector named by ``policy.certify.filter``, plus the shared encoder whose tokenizer defines tokens.

    ``cache``: an embedding cache to share where it wraps the model a detector needs (the server passes its
    guard's, so the prompt check reads the vectors certification has just computed)."""
    if name not in FILTERS:
        raise CertifyError(f"unknown filter '{name}' (known: {', '.join(FILTERS)})")

    def cached(reference: str) -> CachedEncoder:
        model = load_sentence_encoder(reference)
        return cache if cache is not None and cache.encoder is model else CachedEncoder(model)

    if name == "policy":
        encoder = cached(policy.models.embedding)
        return PolicyClassifier(policy, query_cache=encoder), encoder
    head = HarmfulHead.load()
    encoder = cached(head.encoder)
    harmful = HarmfulRequestClassifier(head, encoder)
    if name == "harmful_classifier":
        return harmful, encoder
    # Erasure works on the head's tokens; both detectors read the same erased texts and share one embedding
    # pass when the policy embeds with the head's encoder (the default).
    policy_encoder = encoder if policy.models.embedding == head.encoder else cached(policy.models.embedding)
    return CombinedDetector([PolicyClassifier(policy, query_cache=policy_encoder), harmful], name="both"), encoder


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

    def header_value(self, text: str | None = None) -> str:
        """Compact form for an HTTP response header (the trigger text is left out: it may be long); ``text`` names
        what was certified (e.g. ``messages[0:3]``)."""
        subject = "" if text is None else f"text={text}; "
        return (f"{subject}flagged={str(self.flagged).lower()}; mode={self.mode}; d={self.max_erase}; "
                f"variant={self.variant}; "
                f"filter={self.filter}; certified={str(self.certified).lower()}; "
                f"checked={self.subsequences_checked}/{self.subsequences_total}; ms={self.elapsed_s * 1000:.1f}")


class EraseAndCheck:
    """Certifies prompts against one filter with fixed settings; reusable and safe to share between threads."""

    def __init__(self, filter: Detector, tokenizer: Tokenizer, mode: Mode = "suffix", max_erase: int = 10,
                 max_insertions: int = 1, variant: Variant = "exact", sample_fraction: float = 0.2, seed: int = 0,
                 batch_size: int = 128, cache_size: int = 4096):
        """``cache_size`` certificates are remembered by prompt hash (a verdict depends only on the prompt and these
        fixed settings), so a repeated prompt (a chat's earlier turns, retries) costs one lookup; 0 disables it."""
        if mode not in MODES:
            raise CertifyError(f"unknown mode '{mode}' (known: {', '.join(MODES)})")
        if variant not in VARIANTS:
            raise CertifyError(f"unknown variant '{variant}' (known: {', '.join(VARIANTS)})")
        if max_erase < 0 or max_insertions < 1 or batch_size < 1:
            raise CertifyError("max_erase must be ≥ 0, max_insertions ≥ 1 and batch_size ≥ 1")
        if not 0.0 <= sample_fraction <= 1.0:
            raise CertifyError("sample_fraction must be between 0 and 1")
        if not isinstance(filter, Detector):
            raise CertifyError(f"the filter must be a Detector (name, detect, detect_each); "
                               f"{type(filter).__name__} is not")
        self.filter = filter
        self.tokenizer = tokenizer
        self.mode = mode
        self.max_erase = max_erase
        self.max_insertions = max_insertions
        self.variant = variant
        self.sample_fraction = sample_fraction
        self.seed = seed
        self.batch_size = batch_size
        self.cache_size = cache_size
        self._certificates: OrderedDict[str, Certificate] = OrderedDict()  # by prompt hash, most recent last
        self._lock = threading.Lock()

    @classmethod
    def from_policy(cls, policy: Policy, mode: Mode | None = None, max_erase: int | None = None,
                    max_insertions: int | None = None, variant: Variant | None = None,
                    sample_fraction: float | None = None, filter: FilterName | None = None, seed: int = 0,
                    batch_size: int = 128, cache: CachedEncoder | None = None) -> EraseAndCheck:
        """Settings from ``policy.certify`` (defaults when the policy has none); arguments that are not None win;
        ``cache`` as for :func:`build_filter`."""
        overrides = {"mode": mode, "max_erase": max_erase, "max_insertions": max_insertions, "variant": variant,
                     "sample_fraction": sample_fraction, "filter": filter}
        settings = (policy.certify or CertifySettings()).model_dump()
        settings.update({key: value for key, value in overrides.items() if value is not None})
        try:
            checked = CertifySettings.model_validate(settings)
        except ValidationError as err:
            first = err.errors()[0]
            raise CertifyError(f"certify.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
        filter_, encoder = build_filter(policy, checked.filter, cache)
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
        """The certificate of ``prompt``; a prompt certified before returns its remembered verdict (``elapsed_s``
        is then the lookup's time)."""
        started = time.perf_counter()
        key = hashlib.sha256(prompt.encode("utf-8", "surrogatepass")).hexdigest()
        with self._lock:
            known = self._certificates.get(key)
            if known is not None:
                self._certificates.move_to_end(key)
        if known is not None:
            return replace(known, elapsed_s=time.perf_counter() - started)
        certificate = self._certify(prompt, started)
        if self.cache_size:
            with self._lock:
                self._certificates[key] = certificate
                while len(self._certificates) > self.cache_size:
                    self._certificates.popitem(last=False)
        return certificate

    def clear_cache(self) -> None:
        """Forget remembered certificates (benchmarks of fresh prompts)."""
        with self._lock:
            self._certificates.clear()

    def _certify(self, prompt: str, started: float) -> Certificate:
        tokenized = self.tokenize(prompt)
        if self.variant == "greedy":
            return self._greedy(tokenized, started)
        versions = self._versions(tokenized)
        checked = 0
        for first in range(0, len(versions), self.batch_size):
            batch = versions[first:first + self.batch_size]
            verdicts = self.filter.detect_each([text for text, _ in batch])
            if len(verdicts) != len(batch):
                raise CertifyError(f"filter '{self.filter.name}' returned {len(verdicts)} verdicts "
                                   f"for {len(batch)} prompts")
            checked += len(batch)
            for (text, erased), verdict in zip(batch, verdicts):
                if verdict.flagged:
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
        frontier: dict[str, list[int]] = {tokenized.text: list(range(len(tokenized)))}
        checked = 0
        for erased in range(min(self.max_erase, max(len(tokenized) - 1, 0)) + 1):
            texts = list(frontier)
            scores = [_greedy_grade(verdict) for verdict in self.filter.detect_each(texts)]
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
