"""Alias detector: finds a concept's names in text even when they are disguised.

Adversaries write "H@rry P0tter", "h a r r y potter", "Hаrry" (Cyrillic а) or "Härry". Both the text
and the aliases are folded to the same canonical form before matching, so each trick costs us one
table entry instead of one regular expression per alias.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

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


def _fold(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH)
    text = text.translate(_HOMOGLYPHS)
    text = "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))
    return text.casefold().translate(_HOMOGLYPHS)


def canonical_forms(text: str) -> set[str]:
    """Spaced canonical forms of ``text`` ("harry potter"), one per reading of ambiguous characters."""
    folded = _fold(text)
    readings = {folded.replace("1", "i").replace("|", "i"), folded.replace("1", "l").replace("|", "l")}
    if not any(ch in folded for ch in _AMBIGUOUS):
        readings = {folded}
    forms = set()
    for reading in readings:
        # A digit inside a word is a letter in disguise; a stand-alone number stays a number.
        spaced = re.sub(r"[a-z0-9@$€£+!]+", lambda m: m.group(0).translate(_LEET) if re.search("[a-z]", m.group(0))
                        else m.group(0), reading)
        forms.add(_NON_ALNUM.sub(" ", spaced).strip())
    return forms


@dataclass(frozen=True)
class AliasHit:
    concept_id: str
    alias: str
    matched: str  # the canonical text span that matched


class AliasDetector:
    """Matches every alias of every concept in one regular-expression pass per text form."""

    def __init__(self, aliases: dict[str, list[str]]):
        self._owner: dict[str, list[tuple[str, str]]] = {}
        squashed_owner: dict[str, list[tuple[str, str]]] = {}
        for concept_id, names in aliases.items():
            for name in names:
                for form in canonical_forms(name):
                    if not form:
                        continue
                    self._owner.setdefault(form, []).append((concept_id, name))
                    squashed = form.replace(" ", "")
                    if len(squashed) >= MIN_SQUASHED_LENGTH:
                        squashed_owner.setdefault(squashed, []).append((concept_id, name))
        self._squashed_owner = squashed_owner
        self._spaced = self._compile(self._owner, bounded=True)
        self._squashed = self._compile(squashed_owner, bounded=False)

    @staticmethod
    def _compile(owner: dict[str, list[tuple[str, str]]], bounded: bool) -> re.Pattern[str] | None:
        if not owner:
            return None
        alternatives = "|".join(re.escape(form) for form in sorted(owner, key=len, reverse=True))
        # Plural/possessive endings ("dumbledores", "potter s") still name the concept.
        return re.compile(rf"(?<![a-z0-9])(?:{alternatives})(?:s)?(?![a-z0-9])" if bounded else f"(?:{alternatives})")

    def find(self, text: str) -> list[AliasHit]:
        hits: dict[tuple[str, str], AliasHit] = {}
        for form in canonical_forms(text):
            for pattern, owner, haystack in ((self._spaced, self._owner, form),
                                             (self._squashed, self._squashed_owner, form.replace(" ", ""))):
                if pattern is None:
                    continue
                for match in pattern.finditer(haystack):
                    key = match.group(0)
                    key = key if key in owner else key[:-1]
                    for concept_id, alias in owner[key]:
                        hits.setdefault((concept_id, alias), AliasHit(concept_id, alias, match.group(0)))
        return list(hits.values())
