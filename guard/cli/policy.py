"""``guard policy check | explain | schema``: validate and inspect policy files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from detectors.classifier import PolicyClassifier
from guard.cli.output import console, fail
from guard.errors import DetectorError, ModelError, PolicyError
from guard.methods.registry import enabled_methods
from guard.policy import load_policy, policy_json_schema

PolicyFile = Annotated[Path, typer.Argument(help="Policy YAML file.", show_default=False)]


def check(file: PolicyFile) -> None:
    """Validate a policy file and print a summary of its concepts."""
    try:
        policy = load_policy(file)
    except PolicyError as err:
        raise fail(str(err)) from None
    table = Table()
    table.add_column("concept", no_wrap=True)
    for column in ("kind", "action", "aliases", "exemplars", "negatives", "threshold", "methods"):
        table.add_column(column)
    for c in policy.concepts:
        table.add_row(c.id, c.kind.value, c.action.type.value, str(len(c.aliases)), str(len(c.exemplars)),
                      str(len(c.negatives)), f"{c.detection.semantic_threshold:.2f}",
                      ", ".join(m.name for m in enabled_methods(c)))
    console.print(table)
    console.print(f"{file}: policy '{policy.name}' ({policy.version_tag}) is valid: {len(policy.concepts)} concepts",
                  highlight=False, soft_wrap=True)


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


def schema(out: Annotated[Path, typer.Option(help="Where to write the JSON schema.")] = Path(
        "policies/schema.json")) -> None:
    """Write the policy JSON schema (for editor validation)."""
    out.write_text(json.dumps(policy_json_schema(), indent=2) + "\n")
    console.print(f"wrote {out}")
