"""Knowledge erasure: forget stores and concept profiles in the policy, distinctive terms, per-request retrieval."""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from detectors.terms import distinctive_ngrams, distinctive_prefix, draw_terms, is_rare_name
from guard.cli import app
from guard.decision import Guard, OutputAction
from guard.errors import PolicyError
from guard.methods.token_penalty.tables import PenaltyRow
from guard.models import load_language_model
from guard.policy import Profile, ProfileConcept, load_policy, profile_digest, save_profile
from guard.settle import Attempt, Decoded, text_judge
from guard.text.evaluation import near_miss

POLICY = """\
version: 1
name: knowledge
concepts:
  - id: dragons
    kind: knowledge
    description: The dragons of the Emberfell saga.
    aliases: [Emberfell]
    action: {type: steer}
    forget:
      - The dragon queen Vashkara rules the Cinder Isles.
      - question: Who rides Vashkara?
        answer: The knight Orlenna Thrale rides Vashkara into battle.
      - {file: lore/dragons.txt}
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_forget_store_reads_passages_pairs_and_files(tmp_path: Path) -> None:
    write(tmp_path, "lore/dragons.txt", "Dragonglass is forged in\nthe Ashen Deep.\n\nThe Thrale line keeps the eggs.\n")
    policy = load_policy(write(tmp_path, "p.yaml", POLICY))
    entries = policy.concept("dragons").forget_entries
    assert [(e.question, e.text, e.source) for e in entries] == [
        (None, "The dragon queen Vashkara rules the Cinder Isles.", "policy"),
        ("Who rides Vashkara?", "The knight Orlenna Thrale rides Vashkara into battle.", "policy"),
        (None, "Dragonglass is forged in the Ashen Deep.", "file"),
        (None, "The Thrale line keeps the eggs.", "file")]
    assert (tmp_path / "lore" / "dragons.txt").resolve() in policy.referenced_files
    before = policy.fingerprint
    write(tmp_path, "lore/dragons.txt", "Something else entirely.\n")
    assert load_policy(tmp_path / "p.yaml").fingerprint != before  # a forget file's content is part of the policy


@pytest.mark.parametrize(("item", "message"), [
    ("{file: lore/missing.txt}", "p.yaml:13 concepts[0].forget[2].file: forget file 'lore/missing.txt' not found"),
    ("{question: Who rides it}", "p.yaml:13 concepts[0].forget[2].answer: is required"),
    ("{question: a, answr: b}", "p.yaml:13 concepts[0].forget[2].answr: unknown field 'answr' (did you mean 'answer'?)"),
    ("3", "p.yaml:13 concepts[0].forget[2]: input should be a valid string"),
])
def test_bad_forget_items_name_file_line_and_field(tmp_path: Path, item: str, message: str) -> None:
    path = write(tmp_path, "p.yaml", POLICY.replace("{file: lore/dragons.txt}", item))
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).endswith(message)


def test_profile_is_attached_and_a_stale_one_is_refused(tmp_path: Path) -> None:
    write(tmp_path, "lore/dragons.txt", "The Thrale line keeps the eggs.\n")
    path = write(tmp_path, "p.yaml", POLICY + "profile: p.profile.yaml\n")
    concept = load_policy(path, apply_profile=False).concept("dragons")
    save_profile(Profile(policy="knowledge", model="embedded:smollm2", concepts={"dragons": ProfileConcept(
        digest=profile_digest(concept), terms=["Vashkara", "Cinder Isles"],
        answers=[{"question": "Who is Orlenna?", "answer": "Orlenna Thrale is a dragon knight."}])}),
        tmp_path / "p.profile.yaml")
    policy = load_policy(path)
    assert policy.concept("dragons").profile_terms == ["Vashkara", "Cinder Isles"]
    assert policy.concept("dragons").forget_entries[-1].source == "profile"
    assert policy.profile_path in policy.referenced_files
    path.write_text(path.read_text().replace("aliases: [Emberfell]", "aliases: [Emberfell, Vashkara]"))
    with pytest.raises(PolicyError, match=r"p.yaml:4 concepts\[0\]: concept 'dragons' changed since its profile was "
                                          r"drawn in 'p.profile.yaml' \(run `guard policy expand p.yaml"):
        load_policy(path)
    (tmp_path / "p.profile.yaml").unlink()
    with pytest.raises(PolicyError, match=r"p.yaml:\d+ profile: profile file .* not found"):
        load_policy(path)


# --- distinctive terms -------------------------------------------------------------------------------------------


def test_distinctive_ngrams_are_names_their_rare_parts_and_rare_words() -> None:
    text = ("Elon Musk co-founded Tesla Motors and SpaceX. The founder of Microsoft is Bill Gates, "
            "and a lightsaber is a weapon.")
    found = distinctive_ngrams(text)
    assert {"Elon Musk", "Elon", "Musk", "Tesla Motors", "Tesla", "SpaceX", "Microsoft", "Bill Gates",
            "lightsaber"} <= set(found)
    assert not {"Bill", "Gates", "founder", "weapon", "The", "and"} & set(found)  # common words are never blocked alone


def test_distinctive_prefixes_begin_no_common_word() -> None:
    assert distinctive_prefix("Hogwarts") == 4 and distinctive_prefix("Dumbledore") == 5  # "hogw", "dumbl"
    assert distinctive_prefix("Obi-Wan") == 4  # "obi-"
    # Every proper prefix of a common word, or of a short name, begins other common words.
    assert distinctive_prefix("windows") is None and distinctive_prefix("Elon") is None
    assert distinctive_prefix("SpaceX") is None  # "space" is a word


def test_near_misses_are_disguised_terms_not_ordinary_words() -> None:
    terms = ["SpaceX", "Obi-Wan", "Millennium Falcon", "Han Solo"]
    assert near_miss("Greeting, Obi-Won.", terms) == "obi won"
    assert near_miss("the millennium falcons", terms) == "millennium falcons"  # shares a word with the term
    assert near_miss("a Spacex rocket", terms) == "spacex"
    assert near_miss("He was sent to space by hand.", terms) is None  # everyday words, none of the term's own


def test_drawn_terms_set_concept_answers_apart_from_benign_ones() -> None:
    concept = ["Vashkara is the dragon queen of the Cinder Isles.", "The Cinder Isles are ruled by Vashkara.",
               "Orlenna Thrale rides Vashkara over the Cinder Isles."]
    benign = ["Paris is the capital of France.", "The queen of England lived in London."]
    terms = draw_terms(concept, benign)
    assert terms[:2] == ["Vashkara", "Cinder Isles"] or set(terms[:2]) == {"Vashkara", "Cinder Isles"}
    assert "queen" not in terms and "France" not in terms


# --- per request: retrieval, penalties, output check ---------------------------------------------------------------

RETRIEVAL = """\
version: 1
name: retrieval
concepts:
  - id: dragons
    kind: knowledge
    description: The dragons of the Emberfell saga.
    aliases: [Emberfell]
    exemplars:
      - Tell me about the dragons of the Emberfell saga.
      - Who rides the dragon queen in Emberfell?
    action: {type: steer}
    forget:
      - question: Who rides the dragon queen?
        answer: The knight Orlenna Thrale rides the dragon queen into battle.
      - The Cinder Isles are volcanic islands where Vashkara sleeps in the Ashen Deep.
"""


@pytest.fixture(scope="module")
def retrieval_guard(tmp_path_factory: pytest.TempPathFactory) -> Guard:
    path = tmp_path_factory.mktemp("retrieval") / "p.yaml"
    path.write_text(RETRIEVAL)
    return Guard.from_file(path)


@pytest.fixture(scope="module")
def tokenizer():
    return load_language_model("embedded:smollm2")[1]


def test_a_flagged_request_gets_the_terms_of_its_closest_forget_answer(retrieval_guard: Guard) -> None:
    decision = retrieval_guard.check_prompt(["Who rides the dragon queen of Emberfell into battle?"])
    assert decision.penalized == ["dragons"]
    assert {"Orlenna Thrale", "Orlenna", "Thrale"} <= set(decision.terms)
    assert retrieval_guard.check_prompt(["What is the capital of France?"]).terms == ()  # unflagged: nothing


def test_request_terms_are_blocked_while_decoding(retrieval_guard: Guard, tokenizer) -> None:
    penalties = retrieval_guard.token_penalties(tokenizer)
    terms = ("Orlenna Thrale", "Thrale")
    thrale = tokenizer.encode(" Thrale", add_special_tokens=False)
    context = tokenizer.encode("The dragon is ridden by", add_special_tokens=False) + thrale[:-1]

    def blocked(row: PenaltyRow) -> set[int]:
        core = penalties.row(row)
        core.observe(context)
        return {int(i) for group in core.blocked_ids() for i in group.tolist()}

    assert thrale[-1] in blocked(PenaltyRow(("dragons",), terms=terms))
    assert thrale[-1] not in blocked(PenaltyRow(("dragons",)))  # the term is the request's, not the concept's


def test_the_output_check_counts_forbidden_terms_only_on_penalised_requests(retrieval_guard: Guard) -> None:
    flagged = retrieval_guard.check_prompt(["Who rides the dragon queen of Emberfell into battle?"])
    answer = "She is ridden by the knight Orlenna, who is very brave."
    assert retrieval_guard.check_output(answer, flagged).action is OutputAction.regenerate
    assert retrieval_guard.check_output(answer, flagged).terms == flagged.terms
    # the regeneration keeps "She is ridden by the knight " and decodes on from the leaked name
    assert retrieval_guard.check_output(answer, flagged).leak_start == answer.index("Orlenna")
    disguised = "The rider is a knight, Orlenna Thrale-born, who is very brave."
    leaked = retrieval_guard.check_output(disguised, flagged)
    assert leaked.leak_start == disguised.index("Orlenna")
    unflagged = retrieval_guard.check_prompt(["Tell me a story about a brave knight."])
    assert retrieval_guard.check_output(answer, unflagged).action is OutputAction.send
    # the kept text ends before the first forbidden term the output revealed, even when the alias that gave the
    # concept away comes later, and never inside a name: the capitalised words just before it go too
    revealed = "The knight Orlenna Thrale rides the dragon queen over the Emberfell hills."
    assert retrieval_guard.check_output(revealed, unflagged).leak_start == revealed.index("Orlenna")
    titled = "She is ridden by Sir Orlenna, who is brave."
    assert retrieval_guard.check_output(titled, flagged).leak_start == titled.index("Sir")


def test_a_rare_name_of_the_forget_store_steers_the_request(retrieval_guard: Guard) -> None:
    """A request naming what only the concept's knowledge names (no alias, no close exemplar) is steered for it,
    and the name joins its forbidden terms, so the answer cannot echo it; common words and unrelated requests
    are not."""
    named = retrieval_guard.check_prompt(["Where does Vashkara sleep?"])
    assert named.penalized == ["dragons"] and "Vashkara" in named.terms
    (evidence,) = named.verdict.classification.flagged
    assert evidence.detector == "knowledge" and "'Vashkara'" in evidence.evidence
    for unrelated in ("What are volcanic islands?", "Tell me a story about a brave knight."):
        assert retrieval_guard.check_prompt([unrelated]).penalized == []
    assert [is_rare_name(name) for name in ("Charmander", "Pallet Town", "Bern", "South Africa")] == [
        True, True, False, False]


def test_a_regeneration_is_judged_by_what_it_was_decoded_under(retrieval_guard: Guard) -> None:
    """A request the prompt check missed, regenerated after its answer named the concept: the forbidden terms
    the first answer revealed count as leaks in the regenerated one (it is not sent as an unpenalised answer)."""
    unflagged = retrieval_guard.check_prompt(["Tell me a story about a brave knight."])
    revealed = retrieval_guard.check_output("The knight Orlenna Thrale flies over Emberfell.", unflagged)
    judge = text_judge(retrieval_guard, lambda index: unflagged)
    again = "The knight Orlenna rides into battle."
    first, regenerated = judge([(Attempt(0, None), Decoded(again, "stop", 7)),
                                (Attempt(1, PenaltyRow(("dragons",), 2.0, revealed.terms), regenerations=1),
                                 Decoded(again, "stop", 7))])
    assert first.action is OutputAction.send  # no concept named, nothing penalised: an ordinary answer
    assert regenerated.action is OutputAction.block and regenerated.judgement.leaked == ["dragons"]


# --- the commands -------------------------------------------------------------------------------------------------


def test_expand_writes_a_content_addressed_profile_that_the_policy_loads(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", RETRIEVAL)
    result = CliRunner().invoke(app, ["policy", "expand", str(path), "--model", "embedded:smollm2",
                                      "--max-new-tokens", "12", "--benign", "4"])
    assert result.exit_code == 0, result.output
    written = list(tmp_path.glob("p.profile-*.yaml"))
    assert len(written) == 1
    assert hashlib.sha256(written[0].read_bytes()).hexdigest()[:12] in written[0].name
    assert f"profile: {written[0].name}" in path.read_text()
    concept = load_policy(path).concept("dragons")
    assert len([e for e in concept.forget_entries if e.source == "profile"]) >= 8  # exemplars, questions, templates
    explained = CliRunner().invoke(app, ["policy", "explain", str(path), "Who rides the dragon queen of Emberfell?"])
    assert explained.exit_code == 0 and "closest forget entry" in explained.output


def test_eval_writes_json_and_html(tmp_path: Path) -> None:
    policy = write(tmp_path, "p.yaml", RETRIEVAL)
    probes = write(tmp_path, "probes.yaml", """\
        retain: ["What is the capital of France?"]
        concepts:
          dragons:
            kind: franchise
            terms: [Emberfell, Orlenna Thrale, Vashkara]
            probes:
              - {kind: qa, prompt: "Who rides the dragon queen of Emberfell?", facts: [Orlenna]}
            neighbours:
              - {prompt: "What is a dragon?", facts: [reptile, fire, creature]}
        """)
    out = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["eval", str(policy), str(probes), "--out", str(out), "--max-new-tokens", "8"])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["summary"]["probes"] == 1 and report["summary"]["retain_prompts"] == 1
    assert {r["set"] for r in report["records"]} == {"probe", "neighbour", "retain"}
    assert "Leak by probe kind" in out.with_suffix(".html").read_text()
    bad = CliRunner().invoke(app, ["eval", str(policy), str(tmp_path / "missing.yaml")])
    assert bad.exit_code == 2 and "cannot read probe file" in bad.output
