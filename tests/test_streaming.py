"""The incremental stream check: aliases are never released even partly, only the pending alias prefix is held
back, and every finished sentence goes through the output check (serving/streaming.py, detectors/alias.py)."""

from __future__ import annotations

import pytest

from detectors.alias import AliasAutomaton
from guard.decision import Guard, OutputAction
from guard.policy import load_policy
from serving.streaming import StreamCheck
from tests.conftest import ROOT

BENIGN_ANSWER = ("The capital of France is Paris. It sits on the river Seine and is known for its museums, "
                 "its cafes and its long avenues. Many people visit it every year, mostly in the summer.")


@pytest.fixture(scope="module")
def guard() -> Guard:
    return Guard(load_policy(ROOT / "policies" / "default.yaml"))


def disguises(alias: str) -> list[str]:
    leet = alias.translate(str.maketrans({"a": "4", "e": "3", "o": "0", "s": "5"}))
    return [alias, alias.upper(), " ".join(alias), ".".join(alias), leet,
            alias.translate(str.maketrans({"a": "а", "o": "о", "e": "е"}))]


def chunks(text: str, size: int) -> list[str]:
    return [text[i:i + size] for i in range(0, len(text), size)]


def test_no_letter_of_a_disguised_alias_is_released_before_the_alias_check(guard: Guard) -> None:
    automaton = guard.alias_automaton
    aliases = [alias for concept in guard.policy.concepts for alias in concept.aliases]
    checked = 0
    for alias in aliases:
        for spelled in disguises(alias):
            prefix = "Sure, here it is: "
            text = f"{prefix}{spelled} and more text follows here."
            if not guard.classifier.aliases.find(text):
                continue  # a spelling the detector itself does not read ("S0rc3r3r'5": the 5 is a number)
            checked += 1
            for size in (1, 3, 7):
                stream = automaton.stream()
                reported = False
                for piece in chunks(text, size):
                    scan = stream.feed(piece)
                    reported = reported or scan.completed
                    if not reported:  # until the alias check is asked for, nothing of the alias may go out
                        assert scan.safe_end <= len(prefix), (spelled, size, stream.text[:scan.safe_end])
                assert reported, (spelled, size)
    assert checked > 5 * len(aliases)


def test_benign_text_is_held_back_only_by_pending_alias_prefixes(guard: Guard) -> None:
    automaton = guard.alias_automaton
    for size in (1, 4, 9):
        stream = automaton.stream()
        held = []
        for piece in chunks(BENIGN_ANSWER, size):
            scan = stream.feed(piece)
            assert not scan.completed
            held.append(len(stream.text) - scan.safe_end)
        assert max(held) < automaton.longest  # never more than an alias could still need
        assert sum(held) / len(held) < 6  # and usually a few letters: the text flows


def test_a_tiny_automaton_reads_streams_like_the_detector() -> None:
    from detectors.alias import AliasDetector

    automaton = AliasAutomaton(AliasDetector({"hp": ["Harry Potter"], "x": ["nude"]}))
    stream = automaton.stream()
    steps = [(stream.feed(piece), stream.text) for piece in ("The boy H", "arry P", "otter", " went")]
    released = [text[:scan.safe_end] for scan, text in steps]
    assert released[:2] == ["The boy ", "The boy "]  # "H", then "Harry P", may be the start of the alias
    assert [scan.completed for scan, _ in steps] == [False, False, True, False]  # the caller checks it here
    assert released[3] == "The boy Harry Potter went"  # a word that starts no alias flows at once


def test_stream_check_reads_finished_sentences_and_releases_all_of_a_clean_answer(guard: Guard) -> None:
    decision = guard.check_prompt(["Tell me about Paris."])
    check = StreamCheck(guard, decision)
    sent, units = "", []
    for piece in chunks(BENIGN_ANSWER, 5):
        full, finished = check.add(piece)
        assert not full
        for end, unit in finished:
            sent += check.release(end)
            assert check.check(unit) is None
            units.append(unit)
        sent += check.release()
    assert units[0] == "The capital of France is Paris."
    assert units[1].startswith("It sits on the river Seine")
    assert len(units) == 2  # the last sentence is judged by the final check
    assert check.check(check.text) is None
    sent += check.release_all()
    assert sent == BENIGN_ANSWER


def test_a_harmful_sentence_is_blocked_when_it_ends(guard: Guard) -> None:
    decision = guard.check_prompt(["Tell me a story."])
    check = StreamCheck(guard, decision)
    answer = "Once upon a time. First, mix the fertiliser with diesel fuel to make an explosive that kills. Then"
    verdicts = []
    for piece in chunks(answer, 6):
        _, finished = check.add(piece)
        verdicts += [check.check(unit) for _, unit in finished]
    assert verdicts[0] is None
    assert verdicts[1] is not None and verdicts[1].action is OutputAction.block
    assert "weapons" in verdicts[1].verdict.refused
