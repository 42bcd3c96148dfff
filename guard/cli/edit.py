"""``guard edit``: bake a policy's diffusion concepts into a model's weights (UCE + RECE) and record the edit.

The output is a plain diffusers folder with a manifest (:mod:`guard.edited_model`). Every known failure (bad
policy, unknown concept, missing model, unsafe output path) is one line and exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from guard.cli.output import console, fail
from guard.edited_model import (
    WEIGHT_SUFFIXES,
    build_manifest,
    check_out_folder,
    load_pipeline,
    pipeline_folder,
    weights_sha256,
    write_edited_model,
)
from guard.errors import PolicyError, WeightEditError
from guard.methods.uce import SOLVERS, apply_edit, plan_from_policy
from guard.policy import load_policy


def edit(
    policy_file: Annotated[Path, typer.Option("--policy", "-p", help="Policy YAML file.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", help="Diffusers Stable Diffusion pipeline folder.",
                                       show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the edited pipeline.", show_default=False)],
    concept: Annotated[list[str] | None, typer.Option(
        "--concept", "-c", show_default=False,
        help="Concept id to erase (repeatable; default: every style/object/nsfw/celebrity concept).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    method: Annotated[str, typer.Option(
        "--method", help="uce: UCE's closed form (preserved prompts weighed against the erasure); null-space: the "
                         "update restricted to the null space of the preserved keys (AlphaEdit / SPEED), which keeps "
                         "them exactly.")] = "uce",
) -> None:
    """Erase policy concepts from a Stable Diffusion pipeline's weights (UCE + RECE) and save the edited pipeline."""
    if method not in SOLVERS:
        raise fail(f"--method must be one of {', '.join(SOLVERS)}, got '{method}'")
    try:
        policy = load_policy(policy_file)
        plan = plan_from_policy(policy, concept or (), solver=method)
    except (PolicyError, WeightEditError) as err:
        raise fail(str(err)) from None
    try:
        source, pipeline_class = pipeline_folder(model)
        target = check_out_folder(source, out, force)
        console.print(f"hashing the source weights in {source}")
        source_hash, source_files = weights_sha256(source)
        if not source_files:
            raise WeightEditError(f"{source} contains no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        console.print(f"loading {pipeline_class} from {source}")
        pipe = load_pipeline(source)
        console.print(f"erasing {', '.join(c.concept_id for c in plan.concepts)} with {plan.method}")
        result = apply_edit(pipe, plan, progress=True)
    except WeightEditError as err:
        raise fail(str(err)) from None
    manifest = build_manifest(policy, policy_file, plan, result, source, pipeline_class, source_hash, source_files)
    try:
        report = write_edited_model(pipe, target, manifest)
    except OSError as err:
        raise fail(f"cannot write the edited model to {out}: {err}") from None
    console.print(Markdown(report))
