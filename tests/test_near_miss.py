"""Near-miss names in the output check (detectors/fuzzy.py), on the default policy and the real encoder vocabulary.

The examples were chosen before tuning and kept as found: the ones the rule misses are asserted as misses, a
documented limitation, so a change that starts catching them (or starts flagging benign words) shows up here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from detectors.base import Detector
from guard.decision import Guard, OutputAction

ROOT = Path(__file__).resolve().parents[1]
SAFE_PROMPTS = ROOT / "guard" / "data" / "erase-and-check" / "safe_prompts_train.txt"


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard.from_file(ROOT / "policies" / "default.yaml")


@pytest.mark.parametrize("text", ["The headmaster was Albus Dumbeldore.", "Voldemyr returned.",
                                  "She studied at Hogwards.", "Hermoine helped him.", "the Gryfindor common room",
                                  "Harry Pottr and his friends"])
def test_near_misses_of_distinctive_names_are_caught(guard: Guard, text: str) -> None:
    assert guard.near_misses.detect([text]).flagged_ids == ["harry-potter"], text


@pytest.mark.parametrize("text", ["Hogwrastrain is a school.", "It was written by J.K. Rowe."])
def test_known_misses(guard: Guard, text: str) -> None:
    """Limitation: a ratio on whole words misses a name buried in a longer invention, or cut to a short stem."""
    assert guard.near_misses.detect([text]).flagged_ids == [], text


@pytest.mark.parametrize("text", ["He went to Harvard.", "She makes pottery.", "Hogmanay is a Scottish holiday.",
                                  "The rowing team won.", "Prince Harry visited.", "A stone bridge over the river.",
                                  "Hermes was a messenger god.", "The potter's wheel turned.",
                                  "Harold wrote about a harbour.", "Who was Harry S. Truman?"])
def test_benign_words_are_not_near_misses(guard: Guard, text: str) -> None:
    assert guard.near_misses.detect([text]).flagged_ids == [], text


def test_no_false_positive_on_safe_prompts(guard: Guard) -> None:
    prompts = [line.strip() for line in SAFE_PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert len(prompts) > 300
    flagged = [p for p in prompts if guard.near_misses.detect([p]).flagged]
    assert flagged == []


def test_near_misses_count_in_the_output_check_only(guard: Guard) -> None:
    """A user who misspells a name is answered (prompt check); a model that writes the near miss is regenerated."""
    assert isinstance(guard.near_misses, Detector)
    decision = guard.check_prompt(["Tell me about the wizard school in British novels, Hogwards."])
    assert all(s.detector != "fuzzy_alias" for s in decision.verdict.classification.scores)
    checked = guard.check_output("The school is called Hogwards.", decision)
    assert checked.action is OutputAction.regenerate and "harry-potter" in checked.verdict.steered
    final = guard.check_output("The school is called Hogwards.", decision, attempt=1)
    assert final.action is OutputAction.block and final.fallback
    assert final.message == guard.policy.concept("harry-potter").action.fallback
