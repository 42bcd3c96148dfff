"""Incremental detokenisation: the text of a growing token sequence at a cost per token that does not grow.

Decoding all ids after every new token makes a stream quadratic in its length. Like vLLM's
``detokenize_incrementally``, :class:`IncrementalDetokenizer` decodes only a short window: the tokens since the last
clean character boundary, with the token before them as context. The text of the window with and without the new
tokens differs exactly by the new text (the context token absorbs what tokenizers do to a window's first token,
e.g. SentencePiece dropping its leading space), and nothing is emitted while the window ends inside a multi-byte
character (decoded as U+FFFD), so the concatenated deltas equal the full decode.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

INCOMPLETE = "\ufffd"  # what a decode shows for the first bytes of a character whose last byte has not come yet


class IncrementalDetokenizer:
    """``add(ids)`` returns the text the new ids complete; ``text`` is everything so far."""

    def __init__(self, tokenizer: "PreTrainedTokenizerBase", skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._context = 0  # ids[_context:_read] were decoded already: the window's context
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def add(self, ids: Iterable[int]) -> str:
        self.ids.extend(ids)
        if len(self.ids) == self._read:
            return ""
        known = self._decode(self.ids[self._context:self._read])
        window = self._decode(self.ids[self._context:])
        if len(window) <= len(known) or window.endswith(INCOMPLETE):
            return ""  # a special token, or half a character: wait for more
        delta = window[len(known):]
        self._context, self._read = self._read, len(self.ids)
        self.text += delta
        return delta
