"""Distinctive terms of a concept's knowledge: what in an answer gives the concept away.

An alias list names a concept; its knowledge is spread over other words — the franchise's own vocabulary
("lightsaber", "Horcrux"), related people and companies ("Bill Gates", "SpaceX"), translations ("Poudlard"). This
module finds them in text, with no model beyond word frequencies:

* a word is **distinctive** when it is rare in general English (``wordfreq`` Zipf frequency below
  ``COMMON_ZIPF``: "Hogwarts" 3.2, "lightsaber" 3.0, "wrench" 3.4 — not "wizard" 3.9 or "builds" 3.9);
* a **name** is a run of capitalised words inside a sentence ("Paul Allen", "Satya Nadella"), whatever the
  frequency of its words; a name's part is distinctive on its own below ``NAME_PART_ZIPF`` ("Musk" 3.5,
  "Tesla" 3.8, "Nepal" 3.8 — not "Bill" or "Gates" 4.3);
* :func:`distinctive_ngrams` lists what of a text can be blocked without blocking ordinary language: its names
  (word n-grams, n ≤ 5, GUARD's forbidden sequences), their distinctive parts and its distinctive words. Every
  other n-gram (GUARD blocks them all) holds only common words, and blocking those garbles any answer;
* :func:`draw_terms` contrasts answers about a concept with answers to benign prompts (document frequency, as
  TF-IDF does) to pick the terms a profile keeps.
"""

from __future__ import annotations

import bisect
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache

from wordfreq import top_n_list, zipf_frequency

# Zipf frequency (log10 of occurrences per billion words) below which a word is not common English.
COMMON_ZIPF = 3.5
NAME_PART_ZIPF = 4.0
RARE_NAME_ZIPF = 3.0  # a one-word name this rare identifies its concept in a request ("Charmander", "Neuralink")
MIN_TERM_LETTERS = 3
MAX_NGRAM = 5
# A name is blocked from its distinctive prefix on: the shortest prefix (at least MIN_PREFIX characters) that begins
# none of the COMMON_WORDS most frequent English words ("hogw" of "Hogwarts", "skyw" of "Skywalker", "dumbl").
MIN_PREFIX = 4
COMMON_WORDS = 30_000
_WORD = re.compile(r"[^\W_](?:[\w'’.-]*[^\W_])?")
_SENTENCE_END = re.compile(r"[.!?:;\n]\s|[()\"“”]|\s[-–—]\s")
# Words that carry no knowledge: never a term, never the edge of an n-gram.
_FUNCTION_WORDS = frozenset("""
a an the and or but nor of to in on at by for with from as into onto over under about after before between through
during without within against among is are was were be been being am do does did has have had having it its it's
this that these those there here he she they we you i me him her them us my your his their our who whom whose which
what where when why how not no yes so than then also very more most some any all each every other such can could
will would shall should may might must just only own same too both either neither one two three first second new
le la les un une des de du et est en il elle el los las y es que der die das und ist ein eine ich sie er
""".split())


@lru_cache(maxsize=65536)
def zipf(word: str) -> float:
    """General-English frequency of a word (0 for unknown words)."""
    return zipf_frequency(word.casefold(), "en")


def is_common(word: str) -> bool:
    """An everyday English word (Zipf ≥ ``COMMON_ZIPF``)."""
    return zipf(word) >= COMMON_ZIPF


def is_distinctive(word: str, name_part: bool = False) -> bool:
    """A word rare enough in general English that blocking it alone does not block ordinary language (a part of
    a name may be a little more common: "Tesla", "Nepal")."""
    letters = sum(ch.isalpha() for ch in word)
    return (letters >= MIN_TERM_LETTERS and word.casefold() not in _FUNCTION_WORDS
            and zipf(word) < (NAME_PART_ZIPF if name_part else COMMON_ZIPF))


@lru_cache(maxsize=1)
def _common_words() -> list[str]:
    return sorted(top_n_list("en", COMMON_WORDS))


@lru_cache(maxsize=65536)
def distinctive_prefix(word: str) -> int | None:
    """Length of the shortest proper prefix of ``word`` (at least ``MIN_PREFIX``) that begins no common English word
    other than ``word``'s own forms, or None. Once a text reaches it, only this word (or a near miss of it:
    "Hogwrastrain") can follow, so decoding may block it there."""
    word = word.casefold()
    common = _common_words()
    for length in range(MIN_PREFIX, len(word)):
        prefix = word[:length]
        start = bisect.bisect_left(common, prefix)
        others = (w for w in common[start:bisect.bisect_left(common, prefix + "\U0010ffff")] if not w.startswith(word))
        if next(others, None) is None:
            return length
    return None


def words(text: str) -> list[str]:
    return _WORD.findall(text)


def _clauses(text: str) -> list[list[str]]:
    """Word lists of the text's clauses (an n-gram never spans a sentence end)."""
    return [found for part in _SENTENCE_END.split(text) if (found := words(part))]


def _is_name_word(word: str, at_start: bool) -> bool:
    return (word[:1].isupper() and not at_start and word.casefold() not in _FUNCTION_WORDS
            and sum(ch.isalpha() for ch in word) >= 2)


def names(text: str) -> list[str]:
    """Runs of capitalised words inside clauses ("Bill Gates", "Redmond"); a clause's first word counts only when
    it continues into a capitalised second word ("Elon Musk is ...")."""
    found: list[str] = []
    for clause in _clauses(text):
        run: list[str] = []
        for i, word in enumerate(clause + [""]):
            capital = bool(word) and (_is_name_word(word, i == 0)
                                      or (i == 0 and word[:1].isupper() and len(clause) > 1
                                          and _is_name_word(clause[1], False)
                                          and word.casefold() not in _FUNCTION_WORDS))
            if capital:
                run.append(word)
                continue
            if run:
                found.append(" ".join(run[:MAX_NGRAM]))
            run = []
    return found


def is_rare_name(name: str) -> bool:
    """A name that points at one thing on its own, whatever the case it is written in: several words, one of them
    not common English ("Pallet Town" no, "Satoshi Tajiri" yes), or one rare word ("Charmander", not "Bern")."""
    parts = name.split()
    if len(parts) > 1:
        return any(is_distinctive(part) for part in parts)
    return bool(parts) and is_distinctive(parts[0]) and zipf(parts[0]) < RARE_NAME_ZIPF


def knowledge_names(texts: Iterable[str], terms: Iterable[str] = (), exclude: Iterable[str] = ()) -> list[str]:
    """The rare names (:func:`is_rare_name`) of ``texts`` (:func:`names`) and of ``terms`` that are capitalised;
    ``exclude``: names already known (a concept's aliases)."""
    known = {name.casefold() for name in exclude}
    candidates = [name for text in texts for name in names(text)] + [t for t in terms if t[:1].isupper()]
    found = dict.fromkeys(name for name in candidates if is_rare_name(name) and name.casefold() not in known)
    return list(found)


def distinctive_ngrams(text: str, max_n: int = MAX_NGRAM) -> list[str]:
    """What of the text can be blocked: its names (n ≤ ``max_n`` words), their distinctive parts, and its
    distinctive words, in order of appearance."""
    found: dict[str, None] = {}
    for name in names(text):
        found[name] = None
        for part in name.split():
            if is_distinctive(part, name_part=True):
                found[part] = None
    for word in words(text):
        if is_distinctive(word):
            found[word] = None
    return [term for term in found if len(term.split()) <= max_n]


def draw_terms(concept_answers: Sequence[str], benign_answers: Sequence[str], seeds: Iterable[str] = (),
               limit: int = 60) -> list[str]:
    """Terms that tell answers about a concept apart from answers to benign prompts.

    Candidates are each answer's :func:`distinctive_ngrams` (and ``seeds``: the concept's aliases and forget store
    texts count as answers too). A candidate is kept when it appears in at least two concept texts (once is enough
    for a rare word, Zipf < 3) and in no benign answer; they are ranked by document frequency times inverse
    general-English frequency (a TF-IDF with wordfreq as the background corpus).
    """
    texts = list(concept_answers) + list(seeds)
    benign = " \n ".join(benign_answers).casefold()
    benign_words = set(words(benign))
    frequency: Counter[str] = Counter()
    spelled: dict[str, Counter[str]] = {}
    for text in texts:
        candidates = set(distinctive_ngrams(text))
        for candidate in candidates:
            key = candidate.casefold()
            frequency[key] += 1
            spelled.setdefault(key, Counter())[candidate] += 1
    scored = []
    for key, count in frequency.items():
        parts = key.split()
        if key in benign_words or (len(parts) > 1 and f" {key} " in f" {benign} "):
            continue
        rarest = min(zipf(p) for p in parts)
        if count < 2 and rarest >= 3.0:
            continue
        if all(p in _FUNCTION_WORDS for p in parts):
            continue
        scored.append((count * (8.0 - rarest) * math.log1p(len(parts)), spelled[key].most_common(1)[0][0]))
    scored.sort(key=lambda item: (-item[0], item[1]))
    return [term for _, term in scored[:limit]]
