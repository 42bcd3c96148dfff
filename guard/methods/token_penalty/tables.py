"""GUARD-style decode-time token penalties: forbidden names cannot be written, related words are discouraged.

Two penalties, compiled once per (policy, tokenizer) so that each decoding step costs a few set lookups
and one sparse vector add per penalised row:

* **Hard block.** An alias is forbidden as *text*, not as one token sequence: the model can spell
  "Harry Potter" as " Harry"+" Potter", "H"+"arry"+" Pot"+"ter", or a dozen other ways. Matching is
  done on the lower-cased generated text, and a sorted index of every vocabulary token's text answers
  "which tokens would complete the alias from here?" with a binary search. That is equivalent to a
  trie over *every* tokenization of every casing, with or without a leading space, without enumerating
  them. The token that would complete the alias — or, with ``block_ratio`` < 1 (GUARD's β), bring the
  text to that share of it — gets logit -inf, so "Hogwar…" cannot even start to appear.
* **Soft penalty.** Each vocabulary word is embedded once with the policy's sentence encoder (cached on
  disk per tokenizer) and compared with the concept's aliases; words at least
  ``semantic_threshold`` similar lose ``soft_penalty × similarity`` logits (times a per-row strength).

The per-step core (:class:`RowPenalty`) only needs one row's generated ids and its logits, so engines
can drive it: :mod:`.transformers` wraps it as a ``LogitsProcessor`` with per-row settings, :mod:`.vllm` as a
vLLM logits processor, and :mod:`.logit_bias` turns the tables into a static OpenAI ``logit_bias``.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import os
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from detectors.alias import MIN_SQUASHED_LENGTH
from detectors.terms import is_distinctive
from guard.errors import TokenPenaltyError
from guard.models import cache_dir
from guard.policy import Concept, Policy

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedTokenizerBase

# OpenAI's logit_bias accepts values in [-100, 100] for at most a few hundred tokens.
OPENAI_BIAS_LIMIT = 100.0
OPENAI_MAX_BIAS_ENTRIES = 300
# Shorter vocabulary words are mostly abbreviations whose embeddings say little.
MIN_EMBEDDED_LETTERS = 3
# A block before an alias is complete (block_ratio < 1) never fires on fewer characters than this: short
# prefixes ("por" of "porn", "hog" of "Hogwarts") begin ordinary words.
MIN_PARTIAL_BLOCK = 6
# BPE vocabularies number tokens roughly in merge order, i.e. by frequency: pieces below this rank ("ther",
# "old", "itch") occur inside too many ordinary words for a static -100 bias.
COMMON_TOKEN_RANK = 10_000
# A distinctive part of a multi-word alias is blocked alone only from this length ("Han" of "Han Solo" is not).
MIN_NAME_PART = 4
_APOSTROPHES = ("'", "\u2019")
# What can stand between an alias's words besides one space: the model writes "Harry-Potter", "Harry_Potter",
# "harry.potter", "Harry\nPotter" (a line break), a tab or a doubled space, and each must be blocked like a space.
_WORD_SEPARATORS = ("-", "_", ".", "\n", "\t", "  ")


@dataclass(frozen=True)
class PenaltyRow:
    """What one batch row penalises: concept ids, a multiplier on the soft penalty (regenerations use > 1), and the
    request's own forbidden terms (the forget-store n-grams retrieved for it: :mod:`detectors.forget`)."""

    concept_ids: tuple[str, ...]
    strength: float = 1.0
    terms: tuple[str, ...] = ()


def _spellings(alias: str) -> list[str]:
    """Lower-cased spellings to forbid. Matching ignores case, so only apostrophe styles and word separators
    multiply: "harry potter", "harrypotter" (squashed only when long, like the alias detector), and the words
    joined by each of ``_WORD_SEPARATORS`` ("harry-potter", "harry_potter", "harry\npotter", ...)."""
    base = " ".join(alias.lower().split())
    spellings = {base}
    for apostrophe in _APOSTROPHES:
        if apostrophe in base:
            for other in _APOSTROPHES:
                spellings.add(base.replace(apostrophe, other))
    for spelling in list(spellings):
        if " " in spelling:
            spellings.update(spelling.replace(" ", separator) for separator in _WORD_SEPARATORS)
            if len(spelling.replace(" ", "")) >= MIN_SQUASHED_LENGTH:
                spellings.add(spelling.replace(" ", ""))
    return sorted(spellings)


def _is_boundary(char: str) -> bool:
    return not char.isalnum()


def _after_boundaries(text: str) -> list[str]:
    return [text[i:] for i in range(1, len(text)) if _is_boundary(text[i - 1])]


class _TokenIndex:
    """Lower-cased text of every token, sorted, to list the tokens that start with a given string.

    With ``after_boundary``, the keys are instead what follows each separator inside a token (".hog" -> "hog"), to
    list the tokens that hold a string right after a separator."""

    def __init__(self, texts: list[str], excluded: set[int], after_boundary: bool = False):
        pairs = sorted((key, token_id) for token_id, text in enumerate(texts) if token_id not in excluded and text
                       for key in (_after_boundaries(text.lower()) if after_boundary else [text.lower()]))
        self._keys = [text for text, _ in pairs]
        self._ids = np.asarray([token_id for _, token_id in pairs], dtype=np.int64)
        self._cache: dict[str, torch.Tensor] = {}

    def starting_with(self, prefix: str) -> torch.Tensor:
        if prefix not in self._cache:
            lo = bisect.bisect_left(self._keys, prefix)
            hi = bisect.bisect_left(self._keys, prefix + "\U0010ffff")
            self._cache[prefix] = torch.from_numpy(self._ids[lo:hi].copy())
        return self._cache[prefix]


@dataclass(frozen=True)
class _Blocks:
    """Hard blocks of a set of forbidden spellings for one tokenizer, keyed by how the generated text ends.

    ``by_tail[t]`` lists the tokens to block when the lower-cased text ends with ``t`` (a proper prefix of a
    spelling) at a word start: with ``block_ratio`` < 1, the tokens that bring it to that share of the spelling, past
    it (text that got there unchecked, e.g. penalties attached mid-generation) the tokens that complete it. A step
    costs one dictionary lookup per tail length, however many spellings there are.
    """

    by_tail: dict[str, torch.Tensor]
    longest: int
    at_word_start: torch.Tensor  # tokens that begin with a blocked prefix: blocked where a word may start
    anywhere: torch.Tensor  # tokens that hold a blocked prefix after a separator: always blocked

    def blocked(self, text: str, groups: list[torch.Tensor]) -> None:
        """Append the token groups this text blocks."""
        groups.append(self.anywhere)
        if not text or _is_boundary(text[-1]):
            groups.append(self.at_word_start)
        for k in range(1, min(self.longest, len(text)) + 1):
            tail = text[-k:]
            tokens = self.by_tail.get(tail)
            if tokens is not None and (len(text) == k or _is_boundary(text[-k - 1]) or _is_boundary(tail[0])):
                groups.append(tokens)


@dataclass(frozen=True)
class ConceptPenalty:
    """Compiled penalties of one concept for one tokenizer."""

    concept_id: str
    hard_block: bool
    block_ratio: float
    semantic_block: float  # GUARD's delta for the request's forbidden words
    blocks: _Blocks  # aliases, their distinctive parts and the profile's terms
    soft_ids: torch.Tensor  # vocabulary ids with a soft penalty
    soft_values: torch.Tensor  # soft_penalty × similarity for those ids (before the row strength)
    soft_similarity: torch.Tensor  # the similarities themselves

    @property
    def at_word_start(self) -> torch.Tensor:
        return self.blocks.at_word_start

    @property
    def anywhere(self) -> torch.Tensor:
        return self.blocks.anywhere


class RowPenalty:
    """Per-row decoding state and the per-step core, independent of any engine's processor interface.

    Feed it the row's whole generation so far (it reads only the ids it has not seen yet) and the row's
    logits; it writes -inf and soft penalties into the logits in place.
    """

    def __init__(self, owner: "TokenPenalties", row: PenaltyRow):
        self._owner = owner
        self._concepts = [owner.concept(cid) for cid in row.concept_ids]
        self._blocks = [c.blocks for c in self._concepts if c.hard_block]
        hard = any(c.hard_block for c in self._concepts)
        self._semantic = torch.zeros(0, dtype=torch.int64)
        if row.terms and hard:
            self._blocks.append(owner.term_blocks(row.terms, min(c.block_ratio for c in self._concepts)))
            self._semantic = owner.similar_words(row.terms, min(c.semantic_block for c in self._concepts))
        self._text = ""  # lower-cased generated text
        self._seen = 0
        soft_ids = [c.soft_ids for c in self._concepts if len(c.soft_ids)]
        if soft_ids:
            merged = torch.zeros(owner.vocab_size, dtype=torch.float32)
            for concept in self._concepts:
                merged.index_add_(0, concept.soft_ids, concept.soft_values)
            self._soft_ids = torch.nonzero(merged).flatten()
            self._soft_values = merged[self._soft_ids] * row.strength
        else:
            self._soft_ids = torch.zeros(0, dtype=torch.int64)
            self._soft_values = torch.zeros(0, dtype=torch.float32)

    @property
    def text(self) -> str:
        return self._text

    def observe(self, generated_ids: Sequence[int]) -> None:
        """Advance the text by the ids not seen yet (``generated_ids`` is the row's whole generation so far)."""
        texts = self._owner.lower_texts
        for token_id in generated_ids[self._seen:]:
            self._text += texts[int(token_id)] if 0 <= int(token_id) < len(texts) else ""
        self._seen = len(generated_ids)

    def blocked_ids(self) -> list[torch.Tensor]:
        """Token-id groups that would complete (or, per ``block_ratio``, nearly complete) a forbidden spelling now,
        and the vocabulary words as close in meaning to the request's forbidden words as ``semantic_block``."""
        groups: list[torch.Tensor] = [self._semantic]
        for blocks in self._blocks:
            blocks.blocked(self._text, groups)
        return [g for g in groups if len(g)]

    def apply(self, logits: torch.Tensor) -> None:
        """Penalise one row's logits (1-D, vocabulary-sized or larger, on any device) in place."""
        if len(self._soft_ids):
            if self._soft_ids.device != logits.device or self._soft_values.dtype != logits.dtype:
                self._soft_ids = self._soft_ids.to(logits.device)
                self._soft_values = self._soft_values.to(device=logits.device, dtype=logits.dtype)
            logits.index_add_(0, self._soft_ids, -self._soft_values)
        groups = self.blocked_ids()
        if groups:
            logits.index_fill_(0, torch.cat(groups).to(logits.device), float("-inf"))

    def step(self, generated_ids: Sequence[int], logits: torch.Tensor) -> None:
        self.observe(generated_ids)
        self.apply(logits)


class TokenPenalties:
    """Penalty tables of every concept of a policy for one tokenizer."""

    def __init__(self, policy: Policy, tokenizer: "PreTrainedTokenizerBase", encoder: "SentenceTransformer",
                 show_progress: bool = True):
        self.policy = policy
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self.special_ids = set(tokenizer.all_special_ids)
        self.texts = _token_texts(tokenizer)
        self.lower_texts = [text.lower() for text in self.texts]
        self._index = _TokenIndex(self.texts, self.special_ids)
        self._after_boundary = _TokenIndex(self.texts, self.special_ids, after_boundary=True)
        self._encoder = encoder
        self._vocabulary = _VocabularyEmbeddings.load_or_build(tokenizer, self.texts, self.special_ids, encoder,
                                                               policy.models.embedding, show_progress)
        self._spelling_cache: dict[tuple[str, float], tuple[list[tuple[str, torch.Tensor]], str]] = {}
        self._word_cache: dict[tuple[str, float], torch.Tensor] = {}
        self._concepts = {c.id: self._compile(c) for c in policy.concepts}

    def concept(self, concept_id: str) -> ConceptPenalty:
        try:
            return self._concepts[concept_id]
        except KeyError:
            raise TokenPenaltyError(f"concept '{concept_id}' is not in policy '{self.policy.name}'") from None

    def check_rows(self, rows: Sequence[PenaltyRow | None]) -> None:
        """Raise TokenPenaltyError for a row naming a concept the policy does not have."""
        for row in rows:
            if row is not None:
                for concept_id in row.concept_ids:
                    self.concept(concept_id)

    def row(self, row: PenaltyRow) -> RowPenalty:
        """The engine-neutral per-row core (for engines that call it themselves, e.g. a vLLM processor)."""
        return RowPenalty(self, row)

    def logit_bias(self, concept_ids: Sequence[str], strength: float = 1.0) -> dict[int, float]:
        """A static OpenAI ``logit_bias`` approximating the penalties, for upstream servers without a trie.

        Static biases cannot see context, so alias pieces are chosen by specificity: tokens that hold a
        whole alias, and the pieces of the aliases' usual tokenizations that are related words (in the soft
        set) or rare (merge rank >= ``COMMON_TOKEN_RANK``) get -100; related words get their soft penalty.
        An alias made only of common pieces ("Voldemort" = V+old+em+ort) is left to the output check.
        The strongest ``OPENAI_MAX_BIAS_ENTRIES`` entries are returned.
        """
        bias: dict[int, float] = {}
        for concept_id in concept_ids:
            concept = self.concept(concept_id)
            similarity = dict(zip(concept.soft_ids.tolist(), concept.soft_similarity.tolist()))
            for token_id, value in zip(concept.soft_ids.tolist(), concept.soft_values.tolist()):
                bias[token_id] = min(bias.get(token_id, 0.0), -min(value * strength, OPENAI_BIAS_LIMIT))
            if not concept.hard_block:
                continue
            for token_id in torch.cat([concept.at_word_start, concept.anywhere]).tolist():
                bias[token_id] = -OPENAI_BIAS_LIMIT
            for pieces in self._usual_tokenizations(self.policy.concept(concept_id)):
                for token_id in pieces:
                    letters = sum(ch.isalpha() for ch in self.texts[token_id])
                    if token_id in similarity or (letters >= 3 and token_id >= COMMON_TOKEN_RANK):
                        bias[token_id] = -OPENAI_BIAS_LIMIT
        strongest = sorted(bias.items(), key=lambda item: (item[1], item[0]))[:OPENAI_MAX_BIAS_ENTRIES]
        return {token_id: value for token_id, value in strongest if value < 0}

    # ---------------------------------------------------------------------------------------------
    # compilation

    def _usual_tokenizations(self, concept: Concept) -> list[list[int]]:
        """The tokenizer's own tokenizations of each alias as written and title-cased, with and without a leading
        space (lower- and upper-case spellings tokenize into short generic pieces a static bias cannot spare)."""
        tokenizations = []
        for alias in concept.aliases:
            for cased in {alias, " ".join(w[:1].upper() + w[1:] for w in alias.split())}:
                for spaced in (cased, " " + cased):
                    pieces = [t for t in self._tokenizer.encode(spaced, add_special_tokens=False)
                              if t not in self.special_ids]
                    if pieces:
                        tokenizations.append(pieces)
        return tokenizations

    def _compile(self, concept: Concept) -> ConceptPenalty:
        settings = concept.methods.token_penalty
        blocks = self._blocks(forbidden_strings(concept), settings.block_ratio)
        # Aliases name the concept; a concept defined only by its description is compared with that.
        keywords = concept.aliases or [concept.description]
        soft_ids, soft_similarity = self._vocabulary.similar(self._encoder, keywords, settings.semantic_threshold)
        return ConceptPenalty(concept.id, settings.hard_block, settings.block_ratio, settings.semantic_block, blocks,
                              soft_ids, soft_similarity * settings.soft_penalty, soft_similarity)

    def term_blocks(self, terms: Sequence[str], block_ratio: float) -> _Blocks:
        """Hard blocks of a request's own forbidden terms (each term's tables are compiled once and cached)."""
        return self._blocks(terms, block_ratio)

    def similar_words(self, terms: Sequence[str], threshold: float) -> torch.Tensor:
        """Whole-word vocabulary tokens at least ``threshold`` similar in meaning to a one-word term (GUARD's
        semantic match, with the vocabulary's embeddings cached on disk and each term's result in memory)."""
        groups = []
        for term in terms:
            if " " in term.strip() or not term.strip():
                continue
            key = (term.casefold(), threshold)
            if key not in self._word_cache:
                self._word_cache[key] = self._vocabulary.similar(self._encoder, [term], threshold)[0]
            groups.append(self._word_cache[key])
        return torch.unique(torch.cat(groups)) if groups else torch.zeros(0, dtype=torch.int64)

    def _spelling_tables(self, spelling: str, block_ratio: float) -> tuple[list[tuple[str, torch.Tensor]], str]:
        """(tail, tokens to block) pairs of one spelling, and the prefix whose tokens are blocked at a word start."""
        key = (spelling, block_ratio)
        if key not in self._spelling_cache:
            reach = max(math.ceil(block_ratio * len(spelling)), min(len(spelling), MIN_PARTIAL_BLOCK))
            tails = [(spelling[:k], self._index.starting_with(spelling[k:reach if k < reach else len(spelling)]))
                     for k in range(1, len(spelling))]
            self._spelling_cache[key] = ([(tail, tokens) for tail, tokens in tails if len(tokens)], spelling[:reach])
        return self._spelling_cache[key]

    def _blocks(self, strings: Sequence[str], block_ratio: float) -> _Blocks:
        by_tail: dict[str, list[torch.Tensor]] = {}
        starts: set[str] = set()
        for string in strings:
            for spelling in _spellings(string):
                tails, start = self._spelling_tables(spelling, block_ratio)
                for tail, tokens in tails:
                    by_tail.setdefault(tail, []).append(tokens)
                starts.add(start)
        at_start: set[int] = set()
        anywhere: set[int] = set()
        for start in starts:
            at_start.update(self._index.starting_with(start).tolist())
            anywhere.update(self._after_boundary.starting_with(start).tolist())
        merged = {tail: torch.unique(torch.cat(groups)) if len(groups) > 1 else groups[0]
                  for tail, groups in by_tail.items()}
        return _Blocks(merged, max(map(len, merged), default=0),
                       torch.tensor(sorted(at_start - anywhere), dtype=torch.int64),
                       torch.tensor(sorted(anywhere), dtype=torch.int64))


def forbidden_strings(concept: Concept) -> list[str]:
    """What decoding forbids for a concept on every penalised request: its aliases, the distinctive parts of
    multi-word aliases ("Skywalker", "Musk"; not "Harry" or "Potter", which are common words, nor "Sorcerer's")
    and its profile's terms."""
    parts = [word for alias in concept.aliases if len(alias.split()) > 1 for word in alias.split()
             if len(word) >= MIN_NAME_PART and word.isalpha() and is_distinctive(word, name_part=True)]
    return list(dict.fromkeys(concept.aliases + parts + concept.profile_terms))


def _token_texts(tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    """Each token's text as it appears inside running text (leading space kept, also for SentencePiece)."""
    anchor = tokenizer.encode("a", add_special_tokens=False)
    if not anchor:
        raise TokenPenaltyError("the tokenizer cannot encode 'a'; cannot index its vocabulary")
    anchor_text = tokenizer.decode(anchor, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    decoded = tokenizer.batch_decode([anchor + [token_id] for token_id in range(len(tokenizer))],
                                     skip_special_tokens=False, clean_up_tokenization_spaces=False)
    texts = [text[len(anchor_text):] if text.startswith(anchor_text) else text for text in decoded]
    probe = "Hello world, this is Harry Potter's wand at Hogwarts."
    probe_ids = tokenizer.encode(probe, add_special_tokens=False)
    if "".join(texts[i] for i in probe_ids).strip() != probe:
        raise TokenPenaltyError("this tokenizer's tokens do not concatenate to its text; alias matching would be "
                                "unreliable, so token penalties cannot be compiled for it")
    return texts


class _VocabularyEmbeddings:
    """Sentence-encoder embeddings of the vocabulary's words, cached on disk per (tokenizer, encoder).

    Embedding ~30k words takes tens of seconds on a CPU; the cache makes every later start-up load a file.
    """

    def __init__(self, token_word: np.ndarray, vectors: np.ndarray):
        self.token_word = token_word  # vocabulary id -> row in vectors, -1 for pieces that are not words
        self.vectors = vectors

    @classmethod
    def load_or_build(cls, tokenizer: "PreTrainedTokenizerBase", texts: list[str], special_ids: set[int],
                      encoder: "SentenceTransformer", encoder_reference: str,
                      show_progress: bool) -> "_VocabularyEmbeddings":
        # Only word-start tokens that the encoder knows as whole words are embedded: fragments such as
        # "havior" or "volunt" get embeddings that resemble names by spelling, not meaning, and penalising
        # them would garble unrelated words.
        known_words = set(encoder.tokenizer.get_vocab())
        key = hashlib.sha256(json.dumps([texts, encoder_reference, sorted(known_words), MIN_EMBEDDED_LETTERS])
                             .encode()).hexdigest()[:20]
        path = cache_dir() / "vocabulary-embeddings" / f"{key}.npz"
        if path.exists():
            try:
                with np.load(path) as data:
                    return cls(data["token_word"], data["vectors"].astype(np.float32))
            except (OSError, ValueError, KeyError):
                path.unlink(missing_ok=True)  # a damaged cache is rebuilt, never trusted
        words: dict[str, int] = {}
        token_word = np.full(len(texts), -1, dtype=np.int32)
        for token_id, text in enumerate(texts):
            word = text.strip().lower()
            if (token_id not in special_ids and text[:1].isspace() and word in known_words
                    and len(word) >= MIN_EMBEDDED_LETTERS and word.isalpha()):
                token_word[token_id] = words.setdefault(word, len(words))
        vectors = encoder.encode(list(words), batch_size=256, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=show_progress).astype(np.float32)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".npz")
        os.close(handle)
        np.savez(staging, token_word=token_word, vectors=vectors.astype(np.float16))
        os.replace(staging, path)  # atomic: concurrent start-ups never read half a file
        return cls(token_word, vectors)

    def similar(self, encoder: "SentenceTransformer", keywords: Sequence[str],
                threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Vocabulary ids whose word is at least ``threshold`` cosine-similar to a keyword, and the similarity."""
        if not keywords:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.float32)
        keys = encoder.encode(list(keywords), convert_to_numpy=True, normalize_embeddings=True).astype(np.float32)
        word_similarity = (self.vectors @ keys.T).max(axis=1)
        has_word = self.token_word >= 0
        similarity = np.where(has_word, word_similarity[np.maximum(self.token_word, 0)], -1.0)
        ids = np.flatnonzero(similarity >= threshold)
        return torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(similarity[ids].astype(np.float32))
