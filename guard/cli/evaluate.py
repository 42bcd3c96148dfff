"""``guard eval POLICY PROBES``: a safety team measures its own policy on its own probe file (JSON and HTML)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from guard.cli.output import console, errors, fail
from guard.errors import DetectorError, GuardUnavailable, ModelError, PolicyError


def evaluate(
    policy: Annotated[Path, typer.Argument(help="Policy YAML file.", show_default=False)],
    probes: Annotated[Path, typer.Argument(help="Probe file (see guard.text.evaluation).", show_default=False)],
    model: Annotated[str, typer.Option(help="The served model: embedded:smollm2 or a local folder.")] = (
        "embedded:smollm2"),
    out: Annotated[Path, typer.Option(help="JSON report; the HTML report is written next to it.")] = Path(
        "guard-eval.json"),
    max_new_tokens: Annotated[int, typer.Option(help="Tokens per answer (greedy).")] = 32,
    batch_size: Annotated[int, typer.Option(help="Prompts decoded together.")] = 8,
) -> None:
    """Answer every probe, neighbour and retain prompt unguarded and guarded; report leaks, retain agreement, speed."""
    from guard.decision import Guard
    from guard.models import load_language_model
    from guard.policy import load_policy
    from guard.text.evaluation import evaluate as run
    from guard.text.evaluation import load_probes, write_html
    from guard.text.generation import SamplingSettings

    try:
        probe_file = load_probes(probes)
        guard = Guard(load_policy(policy))
        language_model, tokenizer = load_language_model(model)
        columns = (TextColumn("evaluating"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=errors, transient=True) as progress:
            task = progress.add_task("eval", total=1)
            result = run(guard, language_model, tokenizer, probe_file,
                         SamplingSettings(max_new_tokens=max_new_tokens, temperature=0), batch_size,
                         on_step=lambda done, total: progress.update(task, completed=done, total=total))
    except (PolicyError, ModelError, DetectorError, GuardUnavailable, ValueError) as err:
        raise fail(str(err)) from None
    report = {"policy": guard.policy.version_tag, "probes": str(probes), "model": model,
              "max_new_tokens": max_new_tokens, "summary": result.summary, "by_concept": result.by_concept,
              "by_kind": result.by_kind, "records": result.records}
    try:
        out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        write_html(result, out.with_suffix(".html"), f"guard eval: {guard.policy.version_tag} on {probes.name}")
    except OSError as err:
        raise fail(f"cannot write {out}: {err}") from None
    table = Table(title=f"{guard.policy.version_tag} on {probes}")
    table.add_column("metric")
    table.add_column("unguarded", justify="right")
    table.add_column("guarded", justify="right")
    s = result.summary
    for label, key in (("term leak", "term_leak"), ("near-miss leak", "near_miss_leak"), ("fact leak", "fact_leak")):
        table.add_row(label, f"{s['unguarded_' + key]:.1%}", f"{s[key]:.1%}")
    table.add_row("fallback / blocked", "", f"{s['fallback_rate']:.1%} / {s['blocked_rate']:.1%}")
    table.add_row("neighbours answered", "", f"{s['neighbours_answered']:.1%}")
    table.add_row("retain identical", "", f"{s['retain_identical']:.1%}")
    table.add_row("tokens/s ratio", "", f"{s['tokens_per_s_ratio']:.2f}")
    console.print(table)
    console.print(f"wrote {out} and {out.with_suffix('.html')}", highlight=False, soft_wrap=True)
