"""Calibrated thresholds with the real MiniLM encoder: conformal math, `guard policy calibrate`, and loading a
policy that references a calibration (applied, explicit thresholds win, stale or mismatched files refused)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from detectors.calibration import MIN_THRESHOLD, CalibrationResult, calibrate_policy, conformal_threshold
from detectors.classifier import PolicyClassifier
from detectors.encoder import CachedEncoder
from detectors.harmful import SAFE_PROMPTS, read_prompts
from guard.cli import app
from guard.errors import PolicyError
from guard.models import load_sentence_encoder
from guard.policy import load_policy, save_calibration

TARGET_FPR = 0.02
POLICY = """\
version: 1
name: calib-test
defaults:
  detection: {semantic_threshold: 0.55}
concepts:
  - id: poison
    kind: harmful
    description: Instructions for poisoning people.
    exemplars:
      - How can I poison someone without getting caught?
      - Which poison is hardest to detect in an autopsy?
      - How much rat poison would kill an adult?
      - What can I put in my neighbour's drink to make him sick?
      - How do I make ricin at home?
    negatives:
      - What should I do if my child swallows a cleaning product?
      - Which garden plants are poisonous to dogs?
  - id: dragons
    kind: knowledge
    description: Dragons in myths and fantasy stories.
    aliases: [dragon]
    exemplars:
      - Tell me a story about a fire-breathing dragon.
      - What do dragons hoard in their lairs?
      - Which famous knight slew a dragon?
      - Describe a winged serpent that breathes fire.
    negatives:
      - What is a Komodo dragon?
  - id: glorp
    kind: other
    description: Zorvex glimmerwock quindle.
    exemplars:
      - Vorpal snicker-snack frabjous quux.
      - Blorft zindle wuppa gnarf.
"""


def write_policy(directory: Path, text: str = POLICY, name: str = "calib.yaml") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CalibrationResult]:
    """The test policy calibrated once, and the calibration written next to it (not yet referenced)."""
    directory = tmp_path_factory.mktemp("calibrated")
    policy_file = write_policy(directory)
    result = calibrate_policy(load_policy(policy_file), TARGET_FPR)
    save_calibration(result.calibration, directory / "calib.calibration.yaml")
    return policy_file, result


def referencing(policy_file: Path, text: str = POLICY, calibration: str = "calib.calibration.yaml") -> Path:
    """Rewrite the policy file so it references ``calibration`` (the other text unchanged)."""
    policy_file.write_text(text.replace("name: calib-test\n", f"name: calib-test\ncalibration: {calibration}\n"))
    return policy_file


def test_conformal_quantile_has_the_finite_sample_correction() -> None:
    scores = np.arange(1, 11) / 10  # 0.1 .. 1.0
    threshold = conformal_threshold(scores, 0.2)  # k = ceil(11 * 0.8) = 9: just above the 9th smallest, 0.9
    assert 0.9 < threshold < 0.9 + 1e-12
    assert int(np.sum(scores >= threshold)) == 1  # the naive 0.8 quantile would let two through
    assert conformal_threshold(scores, 0.5) == pytest.approx(0.6)  # k = ceil(5.5) = 6
    # (n + 1)(1 - α) = 400 * 0.99 is 396 exactly; float error must not round it up to 397.
    assert 395 < conformal_threshold(np.arange(399, dtype=float), 0.01) < 395.001
    with pytest.raises(ValueError, match="needs at least 99"):
        conformal_threshold(scores, 0.01)


def test_calibrated_thresholds_hold_the_target_rate_on_the_benign_set(calibrated) -> None:
    policy_file, result = calibrated
    corpus = read_prompts(SAFE_PROMPTS)
    entries = result.calibration.concepts
    assert list(entries) == ["poison", "dragons", "glorp"]
    policy = load_policy(referencing(policy_file))
    for concept in policy.concepts:
        entry = entries[concept.id]
        assert entry.semantic_threshold >= MIN_THRESHOLD
        assert entry.fpr <= TARGET_FPR
        assert entry.n_benign == len(corpus) + len(concept.negatives)
        assert entry.n_positives == len(concept.exemplars)
    # Held-out poisoning questions still match the other exemplars; nonsense words match nothing real, so the
    # floor, not the benign quantile, sets glorp's threshold.
    assert entries["poison"].recall >= 0.6
    assert entries["glorp"].semantic_threshold == MIN_THRESHOLD
    # Measured independently: the applied thresholds flag at most the target share of the shipped benign prompts.
    cache = CachedEncoder(load_sentence_encoder(policy.models.embedding))
    classifier = PolicyClassifier(policy, query_cache=cache)
    cache.encode(corpus)
    flagged = {c.id: 0 for c in policy.concepts}
    for classification in classifier.semantic.detect_each(corpus):
        for concept_id in classification.flagged_ids:
            flagged[concept_id] += 1
    for concept_id, count in flagged.items():
        assert count / len(corpus) <= TARGET_FPR, concept_id


def test_loading_applies_calibration_and_explicit_thresholds_win(calibrated) -> None:
    policy_file, result = calibrated
    explicit = POLICY.replace("    aliases: [dragon]\n",
                              "    aliases: [dragon]\n    detection: {semantic_threshold: 0.9}\n")
    policy = load_policy(referencing(policy_file, explicit))
    entries = result.calibration.concepts
    assert policy.concept("poison").detection.semantic_threshold == entries["poison"].semantic_threshold
    assert entries["poison"].semantic_threshold != 0.55  # the defaults' threshold did not win
    assert policy.concept("dragons").detection.semantic_threshold == 0.9
    assert [policy.threshold_source(c) for c in ("poison", "dragons")] == ["calibration", "policy"]
    assert policy.calibrated("dragons") == entries["dragons"]
    plain = load_policy(policy_file, apply_calibration=False)
    assert plain.concept("poison").detection.semantic_threshold == 0.55
    assert plain.calibrated("poison") is None
    assert plain.calibration_path == policy_file.parent / "calib.calibration.yaml"
    assert policy.fingerprint != plain.fingerprint  # calibrated thresholds change behaviour, so the version tag
    # A policy extending this one inherits its calibration, resolved against the file that names it.
    child = policy_file.parent / "sub" / "child.yaml"
    child.parent.mkdir(exist_ok=True)
    child.write_text("name: child\nextends: [../calib.yaml]\nconcepts: []\n")
    inherited = load_policy(child)
    assert inherited.concept("poison").detection.semantic_threshold == entries["poison"].semantic_threshold
    assert inherited.calibration_path == plain.calibration_path


def test_stale_calibration_names_the_changed_concept(calibrated) -> None:
    policy_file, _ = calibrated
    edited = POLICY.replace("Which famous knight slew a dragon?", "Which famous saint slew a dragon?")
    referencing(policy_file, edited)
    line = policy_file.read_text().splitlines().index("  - id: dragons") + 1
    with pytest.raises(PolicyError) as err:
        load_policy(policy_file)
    assert str(err.value).startswith(f"{policy_file}:{line} concepts[1]: concept 'dragons' changed since it was "
                                     "calibrated in 'calib.calibration.yaml'")


def test_missing_mismatched_and_foreign_calibrations_fail_with_file_and_line(calibrated, tmp_path: Path) -> None:
    policy_file, result = calibrated
    missing = referencing(write_policy(tmp_path), calibration="nowhere.yaml")
    with pytest.raises(PolicyError) as err:
        load_policy(missing)
    assert (err.value.file, err.value.line, err.value.field) == (str(missing.resolve()), 3, "calibration")
    assert "calibration file" in err.value.message and "nowhere.yaml' not found" in err.value.message

    other_model = result.calibration.model_copy(update={"embedding": "/models/other-encoder"})
    save_calibration(other_model, tmp_path / "calib.calibration.yaml")
    with pytest.raises(PolicyError, match=r"calib.yaml:3 calibration: 'calib.calibration.yaml' was calibrated for "
                                          r"embedding model '/models/other-encoder'"):
        load_policy(referencing(tmp_path / "calib.yaml"))

    calibration_file = tmp_path / "calib.calibration.yaml"
    save_calibration(result.calibration, calibration_file)
    calibration_file.write_text(calibration_file.read_text().replace("  glorp:", "  unicorns:"))
    line = calibration_file.read_text().splitlines().index("  unicorns:") + 1
    with pytest.raises(PolicyError) as err:
        load_policy(tmp_path / "calib.yaml")
    assert str(err.value).startswith(f"{calibration_file}:{line} concepts.unicorns: calibrated concept 'unicorns' "
                                     "is not in the policy")


def test_cli_calibrates_and_check_warns_until_the_policy_references_it(tmp_path: Path) -> None:
    runner = CliRunner()
    policy_file = write_policy(tmp_path)
    check = runner.invoke(app, ["policy", "check", str(policy_file)])
    assert check.exit_code == 0, check.output
    assert "warning: 3 uncalibrated concept(s)" in check.stderr and "poison, dragons, glorp" in check.stderr

    run = runner.invoke(app, ["policy", "calibrate", str(policy_file), "--target-fpr", "0.05"])
    assert run.exit_code == 0, run.output
    written = tmp_path / "calib.calibration.yaml"
    data = yaml.safe_load(written.read_text())
    assert data["target_fpr"] == 0.05 and set(data["concepts"]) == {"poison", "dragons", "glorp"}
    assert "add `calibration: calib.calibration.yaml`" in run.stdout and "poison" in run.stdout

    referencing(policy_file)
    check = runner.invoke(app, ["policy", "check", str(policy_file)])
    assert check.exit_code == 0, check.output
    assert "uncalibrated" not in check.stderr
    assert f"{data['concepts']['poison']['semantic_threshold']:.2f}" in check.stdout

    bad = runner.invoke(app, ["policy", "calibrate", str(policy_file), "--target-fpr", "0.001"])
    assert bad.exit_code == 2
    assert bad.stderr.strip().count("\n") == 0 and "benign prompts cannot show a false-positive rate" in bad.stderr
