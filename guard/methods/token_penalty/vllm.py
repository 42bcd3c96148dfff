"""The guard's vLLM logits processor (V1 interface), switched on per request through ``SamplingParams.extra_args``.

vLLM loads logits processors once, at engine start, and runs them on the whole batch; a request opts in with
``extra_args={"erasure_guard": {...}}`` which only the guard's server sets (client ``vllm_xargs`` are stripped
before they reach the engine). The arguments name a content-addressed snapshot of the resolved policy, so the
engine process penalises with exactly the policy that judged the prompt, whatever happens to the policy file
meanwhile. The per-step work is :class:`guard.token_penalty.RowPenalty`, shared with the transformers engine.

This module is imported by vLLM itself (in the engine process); it needs ``pip install .[vllm]``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from vllm import SamplingParams
from vllm.config import VllmConfig
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from guard.methods.token_penalty.tables import PenaltyRow, RowPenalty, TokenPenalties
from guard.models import load_sentence_encoder
from guard.policy import Policy

EXTRA_ARGS_KEY = "erasure_guard"
FQCN = "guard.methods.token_penalty.vllm:VLLMTokenPenaltyProcessor"


def guard_args(policy_snapshot: Path, fingerprint: str, concept_ids: list[str], strength: float,
               terms: Sequence[str] = ()) -> dict[str, Any]:
    """The ``extra_args`` that activate the processor for one request (``terms``: its forbidden forget-store terms)."""
    return {EXTRA_ARGS_KEY: {"policy": str(policy_snapshot), "fingerprint": fingerprint,
                             "concepts": list(concept_ids), "strength": float(strength), "terms": list(terms)}}


def _parse(params: SamplingParams) -> dict[str, Any] | None:
    args = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if args is None:
        return None
    if not isinstance(args, dict) or not isinstance(args.get("policy"), str) \
            or not isinstance(args.get("fingerprint"), str) or not isinstance(args.get("concepts"), list) \
            or not all(isinstance(c, str) for c in args["concepts"]) \
            or not isinstance(args.get("strength"), (int, float)) \
            or not isinstance(args.get("terms", []), list) or not all(isinstance(t, str) for t in args.get("terms", [])):
        raise ValueError(f"extra_args['{EXTRA_ARGS_KEY}'] must be {{policy: str, fingerprint: str, "
                         f"concepts: [str], strength: float, terms: [str]}}")
    return args


class VLLMTokenPenaltyProcessor(LogitsProcessor):
    """Token penalties for the rows whose requests carry guard arguments; other rows are untouched."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self._tokenizer_reference = vllm_config.model_config.tokenizer
        self._tokenizer: Any = None
        self._tables: dict[str, TokenPenalties] = {}  # policy fingerprint -> compiled penalties
        self._lock = threading.Lock()
        self._rows: dict[int, tuple[RowPenalty, list[int]]] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        args = _parse(sampling_params)
        if args is not None and not Path(args["policy"]).is_file():
            raise ValueError(f"guard policy snapshot {args['policy']} does not exist")

    def is_argmax_invariant(self) -> bool:
        return False  # hard blocks change the greedy choice

    def _penalties(self, snapshot: str, fingerprint: str) -> TokenPenalties:
        with self._lock:
            if fingerprint not in self._tables:
                policy = Policy.from_snapshot(json.loads(Path(snapshot).read_text(encoding="utf-8")))
                if policy.fingerprint != fingerprint:
                    raise ValueError(f"policy snapshot {snapshot} has fingerprint {policy.fingerprint}, "
                                     f"expected {fingerprint}")
                if self._tokenizer is None:
                    from transformers import AutoTokenizer

                    self._tokenizer = AutoTokenizer.from_pretrained(self._tokenizer_reference)
                encoder = load_sentence_encoder(policy.models.embedding)
                self._tables[fingerprint] = TokenPenalties(policy, self._tokenizer, encoder, show_progress=False)
            return self._tables[fingerprint]

    def _new_row(self, params: SamplingParams, _prompt_ids: list[int] | None,
                 output_ids: list[int]) -> tuple[RowPenalty, list[int]] | None:
        args = _parse(params)
        if args is None or not args["concepts"]:
            return None
        penalties = self._penalties(args["policy"], args["fingerprint"])
        # output_ids is vLLM's live list of the request's generated tokens: the row reads it every step.
        row = PenaltyRow(tuple(args["concepts"]), float(args["strength"]), tuple(args.get("terms", [])))
        return penalties.row(row), output_ids

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._rows, batch_update, self._new_row)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for index, (row, output_ids) in self._rows.items():
            row.step(output_ids, logits[index])
        return logits
