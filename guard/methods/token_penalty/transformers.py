"""The token penalties as a transformers ``LogitsProcessor``, for the in-process engine and direct callers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from guard.errors import TokenPenaltyError
from guard.methods.token_penalty.tables import PenaltyRow, RowPenalty, TokenPenalties


class TokenPenaltyProcessor(LogitsProcessor):
    """Per-row token penalties for one ``generate`` call (it keeps per-row text state: use it once).

    ``rows[i]`` configures batch row i; rows whose entry is ``None`` are not touched at all, so their logits stay
    bit-identical. ``kept[i]``: ids row i already generated before this call (a regeneration that keeps the text
    before a leak), part of its prompt here but read as generated text.
    """

    def __init__(self, penalties: TokenPenalties, rows: Sequence[PenaltyRow | None],
                 kept: Sequence[Sequence[int]] = ()):
        penalties.check_rows(rows)
        self.rows = [RowPenalty(penalties, row) if row is not None and row.concept_ids else None for row in rows]
        self.kept = [list(ids) for ids in kept] or [[] for _ in rows]
        self._prompt_width: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[0] != len(self.rows):
            raise TokenPenaltyError(f"processor built for {len(self.rows)} rows got a batch of {input_ids.shape[0]}")
        if self._prompt_width is None:
            self._prompt_width = input_ids.shape[1]
        for index, row in enumerate(self.rows):
            if row is not None:
                row.step(self.kept[index] + input_ids[index, self._prompt_width:].tolist(), scores[index])
        return scores
