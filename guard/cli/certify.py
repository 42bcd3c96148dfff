"""``guard certify``: erase-and-check certificates for prompts, as a JSON report.

The command exits 0 whenever certification ran, whatever the verdicts (they are in the report), and 2 with
one line on stderr when it could not run (bad policy, missing model or head, impossible settings).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from guard.cli.output import console, errors, fail
from guard.errors import ModelError, PolicyError
from guard.policy import load_policy


def _read_prompts(file: Path) -> list[str]:
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise fail(f"cannot read prompts from {file}: {err}") from None
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise fail(f"{file} contains no prompts (one prompt per line)")
    return prompts


def certify(
    prompt: Annotated[str | None, typer.Argument(help="Prompt to certify (or use --file).",
                                                 show_default=False)] = None,
    policy_file: Annotated[Path, typer.Option("--policy", "-p", help="Policy YAML file.", show_default=False)] = ...,
    file: Annotated[Path | None, typer.Option("--file", "-f", help="Text file with one prompt per line.")] = None,
    mode: Annotated[Literal["suffix", "insertion", "infusion"] | None,
                    typer.Option(help="Where adversarial tokens may be (overrides the policy).")] = None,
    max_erase: Annotated[int | None, typer.Option("--max-erase", "-d",
                                                  help="Largest certified attack, in tokens.")] = None,
    max_insertions: Annotated[int | None, typer.Option("--max-insertions", "-k",
                                                       help="Inserted blocks (insertion mode).")] = None,
    variant: Annotated[Literal["exact", "randomized", "greedy"] | None,
                       typer.Option(help="exact (certified), randomized (RandEC) or greedy (GreedyEC).")] = None,
    sample_fraction: Annotated[float | None, typer.Option(help="Fraction of erased versions RandEC checks.")] = None,
    filter_name: Annotated[Literal["policy", "harmful_classifier", "both"] | None,
                           typer.Option("--filter", help="Which filter decides 'harmful'.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of RandEC's sampling.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o",
                                             help="Write the JSON report here instead of stdout.")] = None,
) -> None:
    """Certify prompts with erase-and-check and write a JSON report (exit 0 whatever the verdicts)."""
    from guard.certification import EraseAndCheck
    from guard.errors import CertifyError, DetectorError

    if (prompt is None) == (file is None):
        raise fail("give one prompt or --file FILE (one prompt per line), not both")
    prompts = [prompt] if prompt is not None else _read_prompts(file)  # type: ignore[arg-type]
    started = time.perf_counter()
    try:
        policy = load_policy(policy_file)
        checker = EraseAndCheck.from_policy(policy, mode=mode, max_erase=max_erase, max_insertions=max_insertions,
                                            variant=variant, sample_fraction=sample_fraction, filter=filter_name,
                                            seed=seed)
        columns = (TextColumn("certifying"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=errors, transient=True, disable=len(prompts) == 1) as progress:
            task = progress.add_task("certify", total=len(prompts))
            certificates = checker.certify_many(prompts, on_done=lambda _: progress.advance(task))
    except (PolicyError, ModelError, CertifyError, DetectorError) as err:
        raise fail(str(err)) from None
    elapsed = time.perf_counter() - started
    report = {
        "policy": policy.version_tag,
        "policy_file": str(policy_file),
        "settings": {"mode": checker.mode, "max_erase": checker.max_erase, "max_insertions": checker.max_insertions,
                     "variant": checker.variant, "sample_fraction": checker.sample_fraction,
                     "filter": checker.filter.name, "seed": checker.seed},
        "summary": {"prompts": len(certificates), "flagged": sum(c.flagged for c in certificates),
                    "mean_ms_per_prompt": 1000 * sum(c.elapsed_s for c in certificates) / len(certificates),
                    "seconds": elapsed},
        "results": [{"prompt": p, **c.to_dict()} for p, c in zip(prompts, certificates)],
    }
    text = json.dumps(report, indent=2, ensure_ascii=False)
    if out is None:
        typer.echo(text)
        return
    try:
        out.write_text(text + "\n", encoding="utf-8")
    except OSError as err:
        raise fail(f"cannot write {out}: {err}") from None
    summary = report["summary"]
    console.print(f"{summary['flagged']} of {summary['prompts']} prompts flagged "
                  f"({checker.mode}, d={checker.max_erase}, {checker.variant}, filter {checker.filter.name}); "
                  f"wrote {out}")
