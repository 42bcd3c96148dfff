"""The pieces a request is read as: every sentence, and the whole text in windows the encoder can read.

MiniLM reads 256 word pieces and truncates the rest silently, so no piece is longer than ``MAX_WORDS`` words: a
harmful request buried after pages of filler is still a piece of its own, and so is every window around it.
Nothing is capped: a longer request costs more pieces, never fewer checks.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

MAX_WORDS = 120  # ~1.3 word pieces per English word keeps a window inside MiniLM's 256
STRIDE = 60  # consecutive windows of one long sentence overlap by half
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
MIN_SENTENCE_CHARS = 4  # shorter fragments ("Hi.", "1.") carry no meaning alone; they stay inside windows
# A "sentence" this long is run-on text: a request glued into filler without punctuation drowns in a 120-word
# window, so such sentences are also read in short windows. Ordinary sentences are shorter and cost nothing more.
RUN_ON_WORDS = 40
SHORT_WINDOW, SHORT_STRIDE = 20, 10
# "Write a poem that answers this: <request>": a frame before a colon dilutes the request in its sentence, so
# what follows a colon is also read alone (when it is at least this many words).
COLON = re.compile(r":\s+")
MIN_CLAUSE_WORDS = 3


@dataclass(frozen=True)
class Piece:
    text: str
    source: int  # index of the input text (chat message) the piece comes from


def _word_windows(words: list[str]) -> list[str]:
    """Overlapping ``MAX_WORDS``-word windows (stride ``STRIDE``) covering every word."""
    if len(words) <= MAX_WORDS:
        return [" ".join(words)]
    starts = range(0, len(words) - MAX_WORDS + STRIDE, STRIDE)
    return [" ".join(words[start:start + MAX_WORDS]) for start in starts]


def _units(text: str) -> list[str]:
    """Every sentence of the text, each one too long for the encoder cut into overlapping word windows."""
    return [window for sentence in SENTENCE_END.split(text) if sentence.split()
            for window in _word_windows(sentence.split())]


def _run_on_windows(text: str) -> list[str]:
    """Short overlapping windows over each run-on sentence (longer than ``RUN_ON_WORDS`` words)."""
    windows = []
    for sentence in SENTENCE_END.split(text):
        words = sentence.split()
        if len(words) > RUN_ON_WORDS:
            starts = range(0, len(words) - SHORT_WINDOW + SHORT_STRIDE, SHORT_STRIDE)
            windows += [" ".join(words[start:start + SHORT_WINDOW]) for start in starts]
    return windows


def _after_colons(text: str) -> list[str]:
    """What follows each colon of each sentence (a framed request), where it is at least ``MIN_CLAUSE_WORDS``."""
    clauses = []
    for unit in _units(text):
        for found in COLON.finditer(unit):
            rest = unit[found.end():]
            if len(rest.split()) >= MIN_CLAUSE_WORDS:
                clauses.append(rest)
    return clauses


def sentences(text: str) -> list[str]:
    """The sentences (or windows of long ones) that mean something read alone."""
    return [unit for unit in _units(text) if len(unit) >= MIN_SENTENCE_CHARS]


def _sentence_windows(units: list[str]) -> list[str]:
    """Runs of consecutive sentences of at most ``MAX_WORDS`` words, each starting with the previous one's last
    sentence, so a request split across a sentence boundary is read together in some window."""
    lengths = [len(unit.split()) for unit in units]
    windows: list[str] = []
    start = 0
    while start < len(units):
        end, words = start, 0
        while end < len(units) and (end == start or words + lengths[end] <= MAX_WORDS):
            words += lengths[end]
            end += 1
        windows.append(" ".join(units[start:end]))
        if end == len(units):
            break
        start = end - 1 if end - 1 > start else end
    return windows


def split_pieces(texts: Sequence[str]) -> list[Piece]:
    """Every sentence of every text, plus the whole text (or, past ``MAX_WORDS`` words, overlapping windows of
    its sentences), plus short windows over run-on sentences and what follows a colon; each distinct piece once,
    attributed to the first text it occurs in."""
    pieces: dict[str, Piece] = {}
    for source, text in enumerate(texts):
        text = text.strip()
        if not text:
            continue
        whole = [text] if len(text.split()) <= MAX_WORDS else _sentence_windows(_units(text))
        for piece in (*whole, *sentences(text), *_run_on_windows(text), *_after_colons(text)):
            pieces.setdefault(piece, Piece(piece, source))
    return list(pieces.values())
