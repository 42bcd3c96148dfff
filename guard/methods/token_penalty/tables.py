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
import re
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from detectors.alias import MIN_SQUASHED_LENGTH
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
_APOSTROPHES = ("'", "\u2019")
# What can stand between an alias's words besides one space: the model writes "Harry-Potter", "Harry_Potter",
# "harry.potter", "Harry\nPotter" (a line break), a tab or a doubled space, and each must be blocked like a space.
_WORD_SEPARATORS = ("-", "_", ".", "\n", "\t", "  ")


@dataclass(frozen=True)
class PenaltyRow:
    """What one batch row penalises: concept ids, and a multiplier on the soft penalty (regenerations use > 1)."""

    concept_ids: tuple[str, ...]
    strength: float = 1.0


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


class _TokenIndex:
    """Lower-cased text of every token, sorted, to list the tokens that start with a given string."""

    def __init__(self, texts: list[str], excluded: set[int]):
        pairs = sorted((text.lower(), token_id) for token_id, text in enumerate(texts)
                       if token_id not in excluded and text)
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
class _AliasTable:
    """Tokens to block for one forbidden spelling, by how much of it the generated text already ends with."""

    spelling: str
    after_prefix: tuple[torch.Tensor, ...]  # [k]: tokens blocked when the text ends with spelling[:k] (k >= 1)


@dataclass(frozen=True)
class ConceptPenalty:
    """Compiled penalties of one concept for one tokenizer."""

    concept_id: str
    hard_block: bool
    aliases: tuple[_AliasTable, ...]
    at_word_start: torch.Tensor  # tokens that begin with a blocked alias prefix: blocked where a word may start
    anywhere: torch.Tensor  # tokens that hold a blocked alias prefix after a separator: always blocked
    soft_ids: torch.Tensor  # vocabulary ids with a soft penalty
    soft_values: torch.Tensor  # soft_penalty × similarity for those ids (before the row strength)
    soft_similarity: torch.Tensor  # the similarities themselves


class RowPenalty:
    """Per-row decoding state and the per-step core, independent of any engine's processor interface.

    Feed it the row's whole generation so far (it reads only the ids it has not seen yet) and the row's
    logits; it writes -inf and soft penalties into the logits in place.
    """

    def __init__(self, owner: "TokenPenalties", row: PenaltyRow):
        self._owner = owner
        self._concepts = [owner.concept(cid) for cid in row.concept_ids]
        self._hard = [c for c in self._concepts if c.hard_block]
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
        """Token-id groups that would complete (or, per ``block_ratio``, nearly complete) an alias now."""
        text = self._text
        at_word_start = not text or _is_boundary(text[-1])
        groups: list[torch.Tensor] = []
        for concept in self._hard:
            groups.append(concept.anywhere)
            if at_word_start:
                groups.append(concept.at_word_start)
            for table in concept.aliases:
                spelling = table.spelling
                for k in range(1, len(table.after_prefix)):
                    if text.endswith(spelling[:k]) and (len(text) == k or _is_boundary(text[-k - 1])
                                                        or _is_boundary(spelling[0])):
                        groups.append(table.after_prefix[k])
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
        vocabulary = _VocabularyEmbeddings.load_or_build(tokenizer, self.texts, self.special_ids, encoder,
                                                         policy.models.embedding, show_progress)
        self._concepts = {c.id: self._compile(c, vocabulary, encoder) for c in policy.concepts}

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

    def _compile(self, concept: Concept, vocabulary: "_VocabularyEmbeddings",
                 encoder: "SentenceTransformer") -> ConceptPenalty:
        settings = concept.methods.token_penalty
        tables = []
        starts: list[str] = []
        for alias in concept.aliases:
            for spelling in _spellings(alias):
                reach = max(math.ceil(settings.block_ratio * len(spelling)), min(len(spelling), MIN_PARTIAL_BLOCK))
                after = [torch.zeros(0, dtype=torch.int64)]
                for k in range(1, len(spelling)):
                    # Before the blocked share: tokens reaching it. Past it (text that got there unchecked,
                    # e.g. penalties attached mid-generation): tokens completing the alias.
                    after.append(self._index.starting_with(spelling[k:reach if k < reach else len(spelling)]))
                tables.append(_AliasTable(spelling, tuple(after)))
                starts.append(spelling[:reach])
        at_word_start, anywhere = self._whole_alias_tokens(starts)
        # Aliases name the concept; a concept defined only by its description is compared with that.
        keywords = concept.aliases or [concept.description]
        soft_ids, soft_similarity = vocabulary.similar(encoder, keywords, settings.semantic_threshold)
        return ConceptPenalty(concept.id, settings.hard_block, tuple(tables), at_word_start, anywhere, soft_ids,
                              soft_similarity * settings.soft_penalty, soft_similarity)

    def _whole_alias_tokens(self, starts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens that spell a (block-ratio) alias prefix by themselves: at their start, or after a separator."""
        at_start: set[int] = set()
        anywhere: set[int] = set()
        for start in set(starts):
            at_start.update(self._index.starting_with(start).tolist())
        if starts:
            pattern = re.compile("|".join(re.escape(s) for s in sorted(set(starts), key=len, reverse=True)))
            for token_id, text in enumerate(self.lower_texts):
                if token_id in self.special_ids:
                    continue
                for match in pattern.finditer(text):
                    if match.start() > 0 and _is_boundary(text[match.start() - 1]):
                        anywhere.add(token_id)
                        break
        return (torch.tensor(sorted(at_start - anywhere), dtype=torch.int64),
                torch.tensor(sorted(anywhere), dtype=torch.int64))


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
