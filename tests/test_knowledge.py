"""Knowledge erasure: forget stores and concept profiles in the policy, distinctive terms, per-request retrieval."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from guard.errors import PolicyError
from guard.policy import Profile, ProfileConcept, load_policy, profile_digest, save_profile

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
