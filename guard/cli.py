"""The ``guard`` command line.

Every command turns known failures (bad policy, missing model) into one clear line on stderr and
exit code 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from guard.models import ModelError
from guard.policy import PolicyError, load_policy

app = typer.Typer(help="erasure-guard: make deployed generative models forget what a policy forbids.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
policy_app = typer.Typer(help="Validate and inspect policy files.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")

console = Console()
errors = Console(stderr=True)

PolicyFile = Annotated[Path, typer.Argument(help="Policy YAML file.", show_default=False)]


def fail(message: str) -> "typer.Exit":
    # Escaped: policy paths such as concepts[0].id must not be read as rich markup.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)


@policy_app.command("check")
def policy_check(file: PolicyFile) -> None:
    """Validate a policy file and print a summary of its concepts."""
    try:
        policy = load_policy(file)
    except PolicyError as err:
        raise fail(str(err)) from None
    table = Table()
    table.add_column("concept", no_wrap=True)
    for column in ("kind", "action", "aliases", "exemplars", "negatives", "threshold"):
        table.add_column(column)
    for c in policy.concepts:
        table.add_row(c.id, c.kind.value, c.action.type.value, str(len(c.aliases)), str(len(c.exemplars)),
                      str(len(c.negatives)), f"{c.detection.semantic_threshold:.2f}")
    console.print(table)
    console.print(f"{file}: policy '{policy.name}' ({policy.version_tag}) is valid: {len(policy.concepts)} concepts",
                  highlight=False, soft_wrap=True)


@policy_app.command("explain")
def policy_explain(file: PolicyFile,
                   prompt: Annotated[str, typer.Argument(help="Text to classify.", show_default=False)]) -> None:
    """Show which concepts a prompt touches, with scores and evidence."""
    from detectors import DetectorError, PolicyClassifier

    try:
        policy = load_policy(file)
        classifier = PolicyClassifier(policy)
        result = classifier.classify([prompt])
    except (PolicyError, ModelError, DetectorError) as err:
        raise fail(str(err)) from None
    table = Table(title=f"'{prompt}' against policy '{policy.name}'")
    table.add_column("concept", no_wrap=True)
    for column in ("flagged", "score", "threshold", "detector", "evidence"):
        table.add_column(column)
    for score in result.scores:
        concept = policy.concept(score.concept_id)
        table.add_row(score.concept_id, "[red]yes[/]" if score.flagged else "no", f"{score.score:.3f}",
                      f"{concept.detection.semantic_threshold:.2f}", score.detector, score.evidence)
    console.print(table)
    flagged = result.flagged_ids
    console.print(f"flagged: {', '.join(flagged)}" if flagged else "flagged: none")


@policy_app.command("schema")
def policy_schema(out: Annotated[Path, typer.Option(help="Where to write the JSON schema.")] = Path(
        "policies/schema.json")) -> None:
    """Write the policy JSON schema (for editor validation)."""
    import json

    from guard.policy import policy_json_schema

    out.write_text(json.dumps(policy_json_schema(), indent=2) + "\n")
    console.print(f"wrote {out}")


# Commands from other modules register here (one line each).
import guard.serve_cli  # noqa: E402,F401  - registers `guard serve`
import guard.edit_cli  # noqa: E402,F401  - registers `guard edit`
import guard.certify_cli  # noqa: E402,F401  - registers `guard certify`


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    # Under `python -m guard.cli` this file runs as __main__; the commands registered themselves on guard.cli.app.
    from guard.cli import main as registered_main

    registered_main()
