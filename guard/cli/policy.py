"""``guard policy check | explain | calibrate | expand | schema``: validate, inspect, calibrate and profile policies."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from detectors.calibration import DEFAULT_TARGET_FPR, calibrate_policy
from detectors.classifier import PolicyClassifier
from guard.cli.output import console, errors, fail
from guard.decision import Guard, leak_test_failures, run_policy_tests
from guard.errors import DetectorError, GuardUnavailable, ModelError, PolicyError
from guard.methods.registry import enabled_methods
from guard.policy import (
    Calibration,
    ImageCalibration,
    Policy,
    load_calibration,
    load_policy,
    load_profile,
    policy_json_schema,
    save_calibration,
    save_profile,
)

PolicyFile = Annotated[Path, typer.Argument(help="Policy YAML file.", show_default=False)]


def check(file: PolicyFile,
          model: Annotated[str, typer.Option(help="Model whose guarded answers tests.must_not_leak judges (loaded "
                                                  "only for those cases; use the model you serve).")
                           ] = "embedded:smollm2") -> None:
    """Validate a policy file and print a summary of its concepts, warning about uncalibrated ones.

    "calibrated" is yes (threshold from the calibration file), overridden (calibrated, but the concept sets its own
    threshold) or no (the threshold's false-positive rate was never measured).
    """
    try:
        policy = load_policy(file)
    except PolicyError as err:
        raise fail(str(err)) from None
    table = Table()
    table.add_column("concept", no_wrap=True)
    for column in ("kind", "action", "aliases", "exemplars", "negatives", "threshold", "calibrated",
                   "methods"):
        table.add_column(column)
    for c in policy.concepts:
        table.add_row(c.id, c.kind.value, c.action.type.value, str(len(c.aliases)), str(len(c.exemplars)),
                      str(len(c.negatives)), f"{c.detection.semantic_threshold:.2f}",
                      _calibration_status(policy, c.id), ", ".join(m.name for m in enabled_methods(c)))
    console.print(table)
    console.print(f"{file}: policy '{policy.name}' ({policy.version_tag}) is valid: {len(policy.concepts)} concepts",
                  highlight=False, soft_wrap=True)
    uncalibrated = [c.id for c in policy.concepts if policy.calibrated(c.id) is None]
    if uncalibrated:
        errors.print(f"[yellow]warning:[/] {len(uncalibrated)} uncalibrated concept(s), whose semantic threshold has "
                     f"no measured false-positive rate: {escape(', '.join(uncalibrated))} (run `guard policy "
                     f"calibrate {escape(str(file))}`)", highlight=False, soft_wrap=True)
    _run_tests(policy, model)


def _run_tests(policy: Policy, model: str) -> None:
    """The policy's own ``tests:`` cases through the real detectors; every failure on stderr, then exit 2."""
    tests = policy.tests
    cases = len(tests.must_refuse) + len(tests.must_allow) + len(tests.must_not_leak)
    if not cases:
        return
    try:
        with console.status(f"running the policy's {cases} test case(s)"):
            guard = Guard(policy)
            failures = run_policy_tests(guard)
            if tests.must_not_leak:
                from guard.models import load_language_model
                from guard.text.policy_tests import leak_test_answers

                failures += leak_test_failures(guard, leak_test_answers(guard, *load_language_model(model)))
    except (GuardUnavailable, DetectorError, ModelError) as err:
        raise fail(str(err)) from None
    for failure in failures:
        errors.print(escape(str(failure.error())), highlight=False, soft_wrap=True)
    if failures:
        raise typer.Exit(2)
    console.print(f"{cases} policy test case(s) pass", highlight=False)


def _calibration_status(policy: Policy, concept_id: str) -> str:
    if policy.calibrated(concept_id) is None:
        return "[yellow]no[/]"
    return "overridden" if policy.threshold_source(concept_id) == "policy" else "yes"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def explain(file: PolicyFile,
            prompt: Annotated[str, typer.Argument(help="Text to classify.", show_default=False)]) -> None:
    """Show which concepts a prompt touches, with scores and evidence."""
    try:
        policy = load_policy(file)
        classifier = PolicyClassifier(policy)
        result = classifier.detect([prompt])
    except (PolicyError, ModelError, DetectorError) as err:
        raise fail(str(err)) from None
    table = Table(title=f"'{prompt}' against policy '{policy.name}'")
    table.add_column("concept", no_wrap=True)
    for column in ("flagged", "score", "threshold", "detector", "evidence"):
        table.add_column(column)
    for score in result.scores:
        table.add_row(score.concept_id, "[red]yes[/]" if score.flagged else "no", f"{score.score:.3f}",
                      f"{score.threshold:.2f}", score.detector, score.evidence)
    console.print(table)
    flagged = result.flagged_ids
    console.print(f"flagged: {', '.join(flagged)}" if flagged else "flagged: none")
    _explain_knowledge(policy, classifier, prompt, flagged)


def _explain_knowledge(policy: Policy, classifier: PolicyClassifier, prompt: str, flagged: list[str]) -> None:
    """For flagged concepts with a profile or forget store: the profile's terms and what retrieval would block."""
    from detectors.forget import ForgetRetriever
    from guard.methods.token_penalty.tables import forbidden_strings

    known = [policy.concept(cid) for cid in flagged if policy.concept(cid).forget_entries]
    if not known:
        return
    try:
        retriever = ForgetRetriever(policy, classifier.encoder)
        retrieved = retriever.retrieve([prompt], [c.id for c in known])
        terms = retriever.terms([prompt], [c.id for c in known])
    except DetectorError as err:
        raise fail(str(err)) from None
    for concept in known:
        source = f" (profile {policy.profile_path.name})" if concept.profile_terms and policy.profile_path else ""
        console.print(f"[bold]{escape(concept.id)}[/]: always blocked when penalised{escape(source)}: "
                      f"{escape(', '.join(forbidden_strings(concept)))}", highlight=False, soft_wrap=True)
        for entry in retrieved.get(concept.id, []):
            console.print(f"  closest forget entry ({entry.source}): {escape(entry.text)}", highlight=False,
                          soft_wrap=True)
    console.print(f"blocked for this request (forget-store n-grams): {escape(', '.join(terms)) or 'none'}",
                  highlight=False, soft_wrap=True)


def calibrate(
    file: PolicyFile,
    target_fpr: Annotated[float, typer.Option(help="False-positive rate to calibrate each concept to.")] = (
        DEFAULT_TARGET_FPR),
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", show_default=False,
        help="Calibration file to write (default: the one the policy references, else <policy>.calibration.yaml, "
             "or <policy>.image-calibration.yaml with --image-model).",
    )] = None,
    image_model: Annotated[str | None, typer.Option(
        "--image-model", show_default=False,
        help="Calibrate the image guard instead: Semantic Surgery presence thresholds and AdaVD b for this local "
             "Stable Diffusion folder's text encoder, stored under its fingerprint.")] = None,
) -> None:
    """Set each concept's semantic threshold to a target false-positive rate (split conformal) and report recall.

    With --image-model, set the image guard's thresholds for that model instead (same conformal rule, on the
    shipped benign image prompts); the file keeps one entry per model fingerprint.
    """
    if not 0.0 < target_fpr < 1.0:
        raise fail(f"--target-fpr must be between 0 and 1, got {target_fpr}")
    if image_model is not None:
        _calibrate_images(file, image_model, target_fpr, out)
        return
    try:
        policy = load_policy(file, apply_calibration=False)  # a stale calibration is what this replaces
        columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=errors, transient=True) as progress:
            task = progress.add_task("calibrate", total=len(policy.concepts))
            result = calibrate_policy(policy, target_fpr,
                                      on_step=lambda done, total: progress.update(task, completed=done, total=total))
    except (PolicyError, ModelError, DetectorError, ValueError) as err:
        raise fail(str(err)) from None
    target = out or policy.calibration_path or file.with_name(f"{file.stem}.calibration.yaml")
    _save(result.calibration, target)

    table = Table(title=f"policy '{policy.name}' calibrated to FPR ≤ {100 * target_fpr:g}% "
                        f"(recall: held-out exemplars, leave-one-out)")
    table.add_column("concept", no_wrap=True)
    for column in ("threshold", "recall", "FPR", "n", "current (threshold, recall, FPR)"):
        table.add_column(column, justify="right")
    for report in result.reports:
        entry = report.calibrated
        table.add_row(report.concept_id, f"{entry.semantic_threshold:.3f}", _percent(entry.recall),
                      _percent(entry.fpr), f"{entry.n_positives}/{entry.n_benign}", f"{report.current_threshold:.3f}, "
                      f"{_percent(report.current_recall)}, {_percent(report.current_fpr)}")
    console.print(table)
    _saved(file, target, policy.calibration_path, "calibration")


def _save(calibration: Calibration | ImageCalibration, target: Path) -> None:
    try:
        save_calibration(calibration, target)
    except OSError as err:
        raise fail(f"cannot write {target}: {err}") from None


def _saved(file: Path, target: Path, referenced: Path | None, key: str) -> None:
    console.print(f"wrote {target}", highlight=False, soft_wrap=True)
    if referenced != target.resolve():
        relative = os.path.relpath(target.resolve(), file.resolve().parent)
        console.print(f"to apply it, add `{key}: {relative}` to {file}", highlight=False, soft_wrap=True)


def _calibrate_images(file: Path, image_model: str, target_fpr: float, out: Path | None) -> None:
    """``calibrate --image-model``: measure, merge into the image calibration file (other models kept), report."""
    try:
        policy = load_policy(file, apply_calibration=False)
        target = out or policy.image_calibration_path or file.with_name(f"{file.stem}.image-calibration.yaml")
        existing = load_calibration(target, ImageCalibration) if target.is_file() else None
        with console.status(f"loading {image_model}"):
            from guard.images.calibration import calibrate_image_model, merged
            from guard.images.pipeline import load_image_pipeline

            pipe = load_image_pipeline(image_model, "cpu")
        columns = (TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=errors, transient=True) as progress:
            task = progress.add_task("calibrate", total=len(policy.concepts))
            fingerprint, entry = calibrate_image_model(
                policy, pipe, image_model, target_fpr,
                on_step=lambda done, total: progress.update(task, completed=done, total=total))
    except (PolicyError, ModelError, ValueError) as err:
        raise fail(str(err)) from None
    calibration, dropped = merged(existing, policy, fingerprint, entry)
    _save(calibration, target)
    table = Table(title=f"image model {image_model} ({fingerprint}): presence threshold t and AdaVD b at FPR ≤ "
                        f"{100 * target_fpr:g}% (recall: the concept's exemplars and aliases; exemplars alone)")
    table.add_column("concept", no_wrap=True)
    for column in ("t (was)", "recall", "exemplars", "FPR", "AdaVD b (was)", "recall", "FPR", "n"):
        table.add_column(column, justify="right")
    for concept in policy.concepts:
        c = entry.concepts[concept.id]
        table.add_row(concept.id, f"{c.presence_threshold:.3f} ({concept.methods.semantic_surgery.threshold:g})",
                      _percent(c.presence_recall), _percent(c.presence_exemplar_recall), _percent(c.presence_fpr),
                      f"{c.adavd_b:.3f} ({concept.methods.adavd.b:g})", _percent(c.adavd_recall),
                      _percent(c.adavd_fpr), f"{c.n_positives}/{c.n_benign}")
    console.print(table)
    if dropped:
        errors.print(f"[yellow]warning:[/] dropped the stale calibrations of {', '.join(dropped)} (concepts changed "
                     "since): calibrate those models again", highlight=False, soft_wrap=True)
    _saved(file, target, policy.image_calibration_path, "image_calibration")


def expand(
    file: PolicyFile,
    model: Annotated[str, typer.Option(help="The served model, unguarded: embedded:smollm2 or a local folder.")],
    concept: Annotated[list[str] | None, typer.Option(
        help="Concept to profile (repeatable; default: every steered concept).", show_default=False)] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer.")] = 48,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
    benign: Annotated[int, typer.Option(help="Benign prompts whose answers the terms are contrasted with.")] = 48,
) -> None:
    """Draw concept profiles from the model itself: ask it the concepts' exemplars and templated probes, keep its
    answers and their distinctive terms, and write a content-addressed profile file that the policy references."""
    from guard.models import load_language_model
    from guard.text.profile import draw_profile, probe_prompts, profiled_concepts

    try:
        policy = load_policy(file, apply_profile=False)  # a stale profile is what this replaces
        concepts = profiled_concepts(policy, concept or ())
    except PolicyError as err:
        raise fail(str(err)) from None
    except KeyError as err:
        raise fail(f"concept {err} is not in {file}") from None
    if not concepts:
        raise fail(f"{file} has no steered concept to profile (name one with --concept)")
    try:
        language_model, tokenizer = load_language_model(model)
        columns = (TextColumn("asking the model"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=errors, transient=True) as progress:
            task = progress.add_task("expand", total=sum(len(probe_prompts(c)) for c in concepts) + benign)
            profile = draw_profile(policy, language_model, tokenizer, model, concepts, max_new_tokens, batch_size,
                                   benign, on_step=lambda done, total: progress.update(task, completed=done, total=total))
    except (ModelError, DetectorError, ValueError) as err:
        raise fail(str(err)) from None
    previous = policy.profile_path
    if previous is not None and previous.is_file():  # concepts not redrawn keep their reviewed entries
        try:
            kept = load_profile(previous).concepts
        except PolicyError:
            kept = {}
        profile.concepts = {**{k: v for k, v in kept.items() if k in {c.id for c in policy.concepts}},
                            **profile.concepts}
    staging = file.with_name(f".{file.stem}.profile.yaml")
    save_profile(profile, staging)
    digest = hashlib.sha256(staging.read_bytes()).hexdigest()[:12]
    target = file.with_name(f"{file.stem}.profile-{digest}.yaml")
    staging.replace(target)
    _reference_profile(file, target.name)
    try:
        load_policy(file)
    except PolicyError as err:
        raise fail(str(err)) from None
    table = Table(title=f"profiles drawn from {model}")
    table.add_column("concept", no_wrap=True)
    table.add_column("answers", justify="right")
    table.add_column("terms")
    for concept_id, entry in profile.concepts.items():
        table.add_row(concept_id, str(len(entry.answers)), escape(", ".join(entry.terms[:12]) +
                                                                  (" ..." if len(entry.terms) > 12 else "")))
    console.print(table)
    console.print(f"wrote {target} (review and edit its terms); {file} references it with `profile: {target.name}`"
                  + (f"; the previous profile {previous.name} can be deleted once reviewed"
                     if previous is not None and previous != target.resolve() else ""),
                  highlight=False, soft_wrap=True)


def _reference_profile(file: Path, name: str) -> None:
    """Point the policy's top-level ``profile:`` at ``name``, editing that one line (comments stay as written)."""
    text = file.read_text(encoding="utf-8")
    line = f"profile: {name}"
    if re.search(r"^profile:.*$", text, flags=re.MULTILINE):
        text = re.sub(r"^profile:.*$", line, text, count=1, flags=re.MULTILINE)
    else:
        text = text.rstrip("\n") + f"\n\n# Concept profiles drawn by `guard policy expand` (review the terms).\n{line}\n"
    file.write_text(text, encoding="utf-8")


def schema(out: Annotated[Path, typer.Option(help="Where to write the JSON schema.")] = Path(
        "policies/schema.json")) -> None:
    """Write the policy JSON schema (for editor validation)."""
    out.write_text(json.dumps(policy_json_schema(), indent=2) + "\n")
    console.print(f"wrote {out}")
