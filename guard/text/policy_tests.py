"""``tests.must_not_leak`` answered in-process: the guarded, greedy answer each prompt gets from the model.

The answers are judged by :func:`guard.decision.leak_test_failures`; the server makes the same requests through its
own engine (:mod:`serving.guard_state`), so a reload is judged by the model it serves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from guard.decision import Guard
from guard.errors import ConceptRefused
from guard.settle import GenerationResult
from guard.text.generation import SamplingSettings, TextRequest, generate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LEAK_TEST_TOKENS = 64  # how long the guarded answer to a tests.must_not_leak prompt is


def leak_test_request(prompt: str) -> TextRequest:
    """The request a ``tests.must_not_leak`` prompt is judged by: one user turn, greedy."""
    return TextRequest.chat([{"role": "user", "content": prompt}],
                            SamplingSettings(max_new_tokens=LEAK_TEST_TOKENS, temperature=0))


def delivered_text(result: GenerationResult) -> str:
    """The model's text a client receives: none when the answer was withheld (the refusal is the policy's own)."""
    choice = result.choices[0]
    return "" if choice.finish_reason == "content_filter" else choice.text


def leak_test_answers(guard: Guard, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase") -> list[str]:
    """What the model delivers for each ``tests.must_not_leak`` prompt under the guard ("" when refused)."""
    answers = []
    for prompt in guard.policy.tests.must_not_leak:
        try:
            answers.append(delivered_text(generate(guard, model, tokenizer, leak_test_request(prompt))))
        except ConceptRefused:
            answers.append("")
    return answers
