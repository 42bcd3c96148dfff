"""Alias detector: finds a concept's names in text even when they are disguised.

Adversaries write "H@rry P0tter", "h a r r y potter", "Hаrry" (Cyrillic а) or "Härry". Both the text
and the aliases are folded to the same canonical form before matching, so each trick costs us one
table entry instead of one regular expression per alias.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import ahocorasick

from detectors.base import Classification, ConceptScore, Detector

# Look-alike letters from other scripts, folded onto Latin.
_HOMOGLYPHS = str.maketrans({
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i", "ј": "j", "ѕ": "s",
    "ԁ": "d", "һ": "h", "ԛ": "q", "ԝ": "w", "ո": "n", "ɡ": "g", "ι": "i", "ο": "o", "α": "a", "ν": "v",
    "τ": "t", "κ": "k", "ρ": "p", "ε": "e", "Α": "a", "Β": "b", "Ε": "e", "Η": "h", "Ι": "i", "Κ": "k",
    "Μ": "m", "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Χ": "x", "Υ": "y", "Ζ": "z", "А": "a", "В": "b",
    "Е": "e", "К": "k", "М": "m", "Н": "h", "О": "o", "Р": "p", "С": "c", "Т": "t", "Х": "x", "ı": "i",
    "ł": "l", "ø": "o", "đ": "d", "ß": "ss", "æ": "ae", "œ": "oe",
})
# Digits and symbols used as letters. '1' and '|' are ambiguous (i or l): both readings are tried.
_LEET = str.maketrans({"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g", "@": "a", "$": "s",
                       "€": "e", "£": "l", "+": "t", "!": "i"})
_AMBIGUOUS = ("1", "|")
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_NON_ALNUM = re.compile(r"[^a-z0-9]+")

# Squashed matching ignores all separators ("h.a.r.r.y"); only aliases this long are matched that way,
# because short names squashed together occur inside ordinary words.
MIN_SQUASHED_LENGTH = 7
# Shorter aliases are matched squashed only inside a run of letters written one by one ("n u d e", "n.u.d.e"):
# at least this many single-letter words in a row, which ordinary text ("a I a") rarely has and never spells
# an alias with.
MIN_SPELLED_LETTERS = 3
_SPELLED_RUN = re.compile(rf"(?<![a-z0-9])[a-z](?: [a-z]){{{MIN_SPELLED_LETTERS - 1},}}(?![a-z0-9])")


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    text = text.translate(_HOMOGLYPHS)
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return text.casefold().translate(_HOMOGLYPHS)


_WORDLIKE = re.compile(r"[a-z0-9@$€£+!|]+")
_TRAILING_SYMBOLS = re.compile(r"[@$€£+!|]+$")


def _unleet(word: str, ambiguous_as: str) -> str:
    """Read a word's digits and symbols as letters. A run with no letter ("101", "$5") is a number and stays
    one; symbols that only end a word ("Hagrid!") are punctuation, not letters."""
    if not re.search("[a-z]", word):
        return word
    tail = _TRAILING_SYMBOLS.search(word)
    core = word[: tail.start()] if tail else word
    for ambiguous in _AMBIGUOUS:
        core = core.replace(ambiguous, ambiguous_as)
    return core.translate(_LEET)


def _canonical(folded: str, reading: str) -> str:
    return _NON_ALNUM.sub(" ", _WORDLIKE.sub(lambda m: _unleet(m.group(0), reading), folded)).strip()


def canonical_forms(text: str) -> set[str]:
    """Spaced canonical forms of ``text`` ("harry potter"), one per reading of ambiguous characters."""
    folded = _fold(text)
    readings = ("i", "l") if any(ch in folded for ch in _AMBIGUOUS) else ("i",)
    return {_canonical(folded, reading) for reading in readings}


@dataclass(frozen=True)
class AliasHit:
    concept_id: str
    alias: str
    matched: str  # the canonical text span that matched
    count: int = 1  # how many matches (of any matcher) the alias has in the text's most matching reading


class AliasDetector(Detector):
    """Finds every alias of every concept with hash lookups, so cost grows with the text, not the alias count.

    Spaced matching looks up each run of 1..n consecutive words (n = the longest alias in words), with an
    optional plural/possessive "s"; squashed matching looks up each substring whose length is one of the
    long aliases' lengths; spelled matching does the same for every alias (at least ``MIN_SPELLED_LETTERS``
    letters) inside runs of letters written one by one, and spaced matching also reads each such run as one
    word ("harry p o t t e r").
    """

    name = "alias"

    def __init__(self, aliases: Mapping[str, Sequence[str]], thresholds: Mapping[str, float] | None = None,
                 exceptions: Mapping[str, Sequence[str]] | None = None):
        """A hit is certain, so it scores 1.0 (a perfect match). ``thresholds`` puts it on another detector's
        scale per concept (the policy passes its semantic thresholds, all at most 1.0); the default is 1.0.
        ``exceptions``: per concept, phrases in which its aliases do not count ("naked eye"), as written (any case);
        a disguised exception is not recognised, so the alias then counts (fail closed)."""
        self._thresholds = dict(thresholds or {})
        self._exceptions = {concept_id: re.compile("|".join(rf"(?<!\w){re.escape(p)}(?!\w)" for p in phrases),
                                                   re.IGNORECASE)
                            for concept_id, phrases in (exceptions or {}).items() if phrases}
        self._spaced: dict[str, list[tuple[str, str]]] = {}
        self._squashed: dict[str, list[tuple[str, str]]] = {}
        self._spelled: dict[str, list[tuple[str, str]]] = {}
        for concept_id, names in aliases.items():
            for alias in names:
                for form in canonical_forms(alias):
                    if not form:
                        continue
                    self._spaced.setdefault(form, []).append((concept_id, alias))
                    squashed = form.replace(" ", "")
                    if len(squashed) >= MIN_SQUASHED_LENGTH:
                        self._squashed.setdefault(squashed, []).append((concept_id, alias))
                    if len(squashed) >= MIN_SPELLED_LETTERS:
                        self._spelled.setdefault(squashed, []).append((concept_id, alias))
        self._max_words = max((form.count(" ") + 1 for form in self._spaced), default=0)
        self._squashed_lengths = sorted({len(form) for form in self._squashed})
        self._spelled_lengths = sorted({len(form) for form in self._spelled})

    def squashed_forms(self) -> set[str]:
        """Every alias form with separators removed: each spaced, squashed or spelled match contains one."""
        return {form.replace(" ", "") for form in self._spaced}

    def threshold(self, concept_id: str) -> float:
        """The scale a hit of this concept is reported on."""
        return self._thresholds.get(concept_id, 1.0)

    def _spaced_matches(self, form: str) -> list[str]:
        words = form.split()
        found = []
        for start in range(len(words)):
            for count in range(1, min(self._max_words, len(words) - start) + 1):
                phrase = " ".join(words[start:start + count])
                if phrase in self._spaced:
                    found.append(phrase)
                elif phrase.endswith("s") and phrase[:-1] in self._spaced:  # "dumbledores", "potters"
                    found.append(phrase[:-1])
        return found

    def _squashed_matches(self, form: str) -> list[str]:
        text = form.replace(" ", "")
        return [text[i:i + n] for n in self._squashed_lengths for i in range(len(text) - n + 1)
                if text[i:i + n] in self._squashed]

    def _spelled_matches(self, runs: Sequence[str]) -> list[str]:
        return [run[i:i + n] for run in runs for n in self._spelled_lengths for i in range(len(run) - n + 1)
                if run[i:i + n] in self._spelled]

    def detect(self, texts: Sequence[str]) -> Classification:
        """Aliases in each of the request's texts, each text read alone (an alias never spans two messages);
        one score per concept (its first hit)."""
        scores: dict[str, ConceptScore] = {}
        for hit in (hit for text in texts for hit in self.find(text)):
            if hit.concept_id not in scores:
                scores[hit.concept_id] = ConceptScore(
                    concept_id=hit.concept_id, score=1.0, threshold=self.threshold(hit.concept_id),
                    flagged=True, detector=self.name, evidence=f"alias '{hit.alias}' matched '{hit.matched}'")
        return Classification(list(scores.values()))

    def find(self, text: str) -> list[AliasHit]:
        """Every (concept, alias) pair found in ``text``, each once, with the span that matched; a concept's hits
        that only occur inside its exception phrases are dropped."""
        hits = self._find(text)
        for concept_id in {hit.concept_id for hit in hits} & self._exceptions.keys():
            outside = {hit.alias for hit in self._find(self._exceptions[concept_id].sub(" ", text))
                       if hit.concept_id == concept_id}
            hits = [hit for hit in hits if hit.concept_id != concept_id or hit.alias in outside]
        return hits

    def _find(self, text: str) -> list[AliasHit]:
        hits: dict[tuple[str, str], AliasHit] = {}
        counts: dict[tuple[str, str], int] = {}
        for form in canonical_forms(text):
            form_counts: dict[tuple[str, str], int] = {}
            runs = [run.group(0).replace(" ", "") for run in _SPELLED_RUN.finditer(form)]
            spaced = self._spaced_matches(form)
            if runs:
                spaced += self._spaced_matches(_SPELLED_RUN.sub(lambda run: run.group(0).replace(" ", ""), form))
            for owner, matches in ((self._spaced, spaced), (self._squashed, self._squashed_matches(form)),
                                   (self._spelled, self._spelled_matches(runs))):
                for matched in matches:
                    for concept_id, alias in owner[matched]:
                        hits.setdefault((concept_id, alias), AliasHit(concept_id, alias, matched))
                        form_counts[concept_id, alias] = form_counts.get((concept_id, alias), 0) + 1
            for key, count in form_counts.items():
                counts[key] = max(counts.get(key, 0), count)
        return [replace(hit, count=counts[key]) for key, hit in hits.items()]


# ---------------------------------------------------------------------------------------------------------------
# Streams: where an alias may still be under way in text that arrives piece by piece

_LAST_SPACE = re.compile(r"\s\S*\Z")
_WORD = re.compile(r"\S+")
_READINGS = ("i", "l")


def _squashed_chars(word: str, offset: int, reading: str) -> list[tuple[str, int]]:
    """The squashed canonical letters of one whitespace-free word, each with the text offset it comes from:
    its own character's where the word folds letter by letter, else the word's start (leetspeak reads a
    character by its neighbours)."""
    squashed = _canonical(_fold(word), reading).replace(" ", "")
    per_char = [(letter, offset + i) for i, ch in enumerate(word)
                for letter in _canonical(_fold(ch), reading).replace(" ", "")]
    if "".join(letter for letter, _ in per_char) == squashed:
        return per_char
    return [(letter, offset) for letter in squashed]


@dataclass(frozen=True)
class AliasScan:
    safe_end: int  # no alias that may still be being written starts before this offset
    completed: bool  # the new text may have completed an alias: run the alias check before releasing it


class AliasAutomaton:
    """An Aho–Corasick automaton (pyahocorasick) over the squashed form of every alias of a detector.

    Squashed text (folded, leetspeak read, every separator removed) contains every alias the detector can find
    (spaced, squashed and spelled matches all squash to the alias form), so the automaton over-approximates the
    detector: where it sees no alias form under way, the detector cannot find one either.
    """

    def __init__(self, detector: AliasDetector):
        self._automaton = ahocorasick.Automaton()
        forms = [form for form in detector.squashed_forms() if form]
        for form in forms:
            self._automaton.add_word(form, len(form))
        self.longest = max(map(len, forms), default=0)
        if forms:
            self._automaton.make_automaton()

    def stream(self) -> AliasStream:
        return AliasStream(self)

    def ends(self, letters: str) -> list[int]:
        """Index of the last letter of every alias form in ``letters``."""
        return [end for end, _ in self._automaton.iter(letters)]

    def spans(self, letters: str) -> list[tuple[int, int]]:
        """(first, last) letter index of every alias form in ``letters``."""
        return [(end - length + 1, end) for end, length in self._automaton.iter(letters)]

    def pending_start(self, letters: str) -> int:
        """Index of the longest suffix of ``letters`` that an alias form starts with (``len(letters)``: none)."""
        for start in range(max(0, len(letters) - self.longest + 1), len(letters)):
            if self._automaton.match(letters[start:]):
                return start
        return len(letters)


class AliasStream:
    """Follows one growing text (a streamed answer): after each piece, how much of it no alias can still reach.

    Finished words (followed by whitespace) are squashed once and advanced through the automaton together with
    the last ``longest - 1`` letters before them, so each piece costs time in its own length, not the answer's.
    The unfinished last word is read provisionally while it is letters only (more letters cannot change the
    earlier ones); with a digit or symbol in it (leetspeak reads those by their neighbours) it is read both ways
    it may still turn out (see ``_unfinished_safe_end``), so "312." or "Paris," is not held back until the next
    space. Both readings of "1" and "|" are followed.
    """

    def __init__(self, automaton: AliasAutomaton):
        self.automaton = automaton
        self.text = ""
        self._finished = 0  # text[:_finished] ends with whitespace: its words are final
        self._tails: dict[str, list[tuple[str, int]]] = {reading: [] for reading in _READINGS}
        self._reported = -1  # text offset of the last completion reported

    def feed(self, piece: str) -> AliasScan:
        self.text += piece
        text, longest = self.text, self.automaton.longest
        if not longest:
            return AliasScan(len(text), False)
        last_space = _LAST_SPACE.search(text, self._finished)
        finished = last_space.start() + 1 if last_space else self._finished
        partial = text[finished:]
        provisional = partial.isalpha()
        safe_end, completed = len(text), False  # lowered below to where an alias may be under way
        for reading in _READINGS:
            tail = self._tails[reading]
            new = [pair for word in _WORD.finditer(text, self._finished, finished)
                   for pair in _squashed_chars(word.group(0), word.start(), reading)]
            letters = tail + new + (_squashed_chars(partial, finished, reading) if provisional else [])
            joined = "".join(letter for letter, _ in letters)
            ends = [end for end in self.automaton.ends(joined) if end >= len(tail)]
            if ends and letters[max(ends)][1] > self._reported:
                completed = True
                self._reported = max(self._reported, letters[max(ends)][1])
            if partial and not provisional:  # an alias under way ends in the unfinished word's letters, however read
                safe_end = min(safe_end, self._unfinished_safe_end(tail + new, partial, finished, reading))
            elif (pending := self.automaton.pending_start(joined)) < len(letters):
                safe_end = min(safe_end, letters[pending][1])
            self._tails[reading] = (tail + new)[-(longest - 1):] if longest > 1 else []
        self._finished = finished
        return AliasScan(safe_end, completed)

    def _unfinished_safe_end(self, before: list[tuple[str, int]], partial: str, start: int, reading: str) -> int:
        """How far an unfinished word with digits or symbols ("312.", "Paris,", "p0tt") may be released.

        What follows can change only how its last run reads: as now (a number stays digits, symbols that end it
        are punctuation), or, once a letter follows, with every digit and symbol read as a letter. Under both
        readings only the letters where an alias may be under way are held back; a word in which either reading
        may already complete an alias is held whole until it ends, when the completion is reported and checked.
        """
        safe_end = len(self.text)
        for letters in (_squashed_chars(partial, start, reading), _squashed_chars(partial + "a", start, reading)[:-1]):
            read = before + letters
            joined = "".join(letter for letter, _ in read)
            for first, last in self.automaton.spans(joined):
                if last >= len(before):  # held from where that alias starts, at most from the word's start
                    safe_end = min(safe_end, start, read[first][1])
            pending = self.automaton.pending_start(joined)
            if pending < len(read):
                safe_end = min(safe_end, read[pending][1])
        return safe_end
