"""Near-miss detector: names spelled close to an alias ("Dumbeldore", "Voldemyr", "Skywaker").

Token penalties block the exact alias while decoding, so a model that knows the answer often writes a near
miss instead. The alias detector cannot see those; this one compares each word and each 2-word span of the
text with the distinctive spellings of each concept's aliases. It is meant for the *output* check only: a user
who misspells a name in a prompt should not be refused for it.

The rule, on canonical forms (:func:`detectors.alias.canonical_forms`, separators removed):

* targets: every whole alias of at least ``MIN_TARGET_LETTERS`` letters ("harrypotter", "elonmusk"), and every
  alias word of at least that many letters that is not a common word ("dumbledore", "skywalker"; not "potter",
  "stone", "princess");
* candidates: words and 2-word spans of the text, unless every word of the span is a common word ("rowing",
  "harvard", "pottery" are never near misses);
* a candidate is a near miss when ``rapidfuzz.fuzz.ratio`` with a target is at least ``threshold`` (0-100).

"Common word" means a whole-word entry of a vocabulary the caller passes: the guard passes the sentence
encoder's WordPiece vocabulary (30k entries, lower case), which holds everyday English words and few invented
names. Without a vocabulary nothing is common and more is flagged (fail closed).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

from rapidfuzz import fuzz, process

from detectors.alias import canonical_forms
from detectors.base import Classification, ConceptScore, Detector

MIN_TARGET_LETTERS = 6
DEFAULT_THRESHOLD = 80.0


class FuzzyAliasDetector(Detector):
    """Flags a concept when a word or 2-word span is within ``threshold`` (rapidfuzz ratio) of a distinctive alias."""

    name = "fuzzy_alias"

    def __init__(self, aliases: Mapping[str, Sequence[str]], common_words: Collection[str] = (),
                 threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self.common = frozenset(word.casefold() for word in common_words)
        self._targets: dict[str, list[tuple[str, str]]] = {}  # squashed target -> [(concept, alias)]
        for concept_id, names in aliases.items():
            for alias in names:
                for form in canonical_forms(alias):
                    words = form.split()
                    parts = [w for w in words if len(w) >= MIN_TARGET_LETTERS and w not in self.common]
                    whole = "".join(words)
                    for target in ([whole] if len(whole) >= MIN_TARGET_LETTERS else []) + parts:
                        self._targets.setdefault(target, []).append((concept_id, alias))
        self._choices = list(self._targets)

    def candidates(self, text: str) -> list[str]:
        """Squashed words and 2-word spans of ``text`` that are not made of common words alone."""
        found: dict[str, None] = {}
        for form in canonical_forms(text):
            words = form.split()
            for size in (1, 2):
                for start in range(len(words) - size + 1):
                    span = words[start:start + size]
                    if all(w in self.common or len(w) < 3 for w in span):
                        continue
                    squashed = "".join(span)
                    if len(squashed) >= MIN_TARGET_LETTERS - 1:
                        found[squashed] = None
        return list(found)

    def detect(self, texts: Sequence[str]) -> Classification:
        """One score per concept: its best near miss (score = ratio / 100, threshold = ``threshold`` / 100)."""
        best: dict[str, ConceptScore] = {}
        if not self._choices:
            return Classification([])
        for text in texts:
            for candidate in self.candidates(text):
                match = process.extractOne(candidate, self._choices, scorer=fuzz.ratio, score_cutoff=self.threshold)
                if match is None:
                    continue
                target, score, _ = match
                for concept_id, alias in self._targets[target]:
                    if concept_id not in best or score / 100 > best[concept_id].score:
                        best[concept_id] = ConceptScore(
                            concept_id=concept_id, score=score / 100, threshold=self.threshold / 100, flagged=True,
                            detector=self.name, evidence=f"'{candidate}' is {score:.0f}% like alias '{alias}'")
        return Classification(sorted(best.values(), key=lambda s: -s.margin))
