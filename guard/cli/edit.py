"""``guard edit``: bake a policy's concepts into a model's weights and record the edit.

Diffusion pipelines get UCE + RECE (:mod:`guard.methods.uce`), language models a STAMP-style MLP edit
(:mod:`guard.methods.stamp`). The output is a plain diffusers or transformers folder with a manifest
(:mod:`guard.edited_model`). Every known failure (bad policy, unknown concept, missing model, unsafe output path)
is one line and exit 2.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown

from guard.cli.output import console, fail
from guard.edited_model import (
    WEIGHT_SUFFIXES,
    build_llm_manifest,
    build_manifest,
    check_out_folder,
    decoder_layer_count,
    is_language_model,
    language_model_folder,
    load_language_model_copy,
    load_pipeline,
    pipeline_folder,
    previous_edits,
    render_llm_report,
    weights_sha256,
    write_edited_model,
)
from guard.errors import PolicyError, WeightEditError
from guard.methods import stamp, uce
from guard.policy import Policy, load_policy

MEASURE_TOKENS = 24  # greedy tokens per measured answer: enough to name a concept, cheap on CPU


def edit(
    policy_file: Annotated[Path, typer.Option("--policy", "-p", help="Policy YAML file.", show_default=False)],
    model: Annotated[str, typer.Option("--model", "-m", show_default=False,
                                       help="Diffusers Stable Diffusion pipeline folder, or a language model: "
                                            "embedded:smollm2 or a transformers folder.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the edited pipeline.", show_default=False)],
    concept: Annotated[list[str] | None, typer.Option(
        "--concept", "-c", show_default=False,
        help="Concept id to erase (repeatable; default: every style/object/nsfw/celebrity concept).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a non-empty --out folder.")] = False,
    method: Annotated[str | None, typer.Option(
        "--method", show_default=False,
        help="Diffusion: uce (default; UCE's closed form, preserved prompts weighed against the erasure) or "
             "null-space (the update restricted to the null space of the preserved keys, AlphaEdit / SPEED, which "
             "keeps them exactly). Language models: stamp, stamp-lr or alphaedit (default: the policy's "
             "methods.stamp.method).")] = None,
    layers: Annotated[list[int] | None, typer.Option(
        "--layers", show_default=False,
        help="Language models: decoder layer to edit (repeatable; default: chosen by separation).")] = None,
    measure: Annotated[int, typer.Option(
        "--measure", help="Language models: forget and retain prompts answered before and after (0 skips).")] = 8,
) -> None:
    """Erase policy concepts from a model's weights (UCE + RECE for Stable Diffusion, STAMP for language models)."""
    try:
        policy = load_policy(policy_file)
    except PolicyError as err:
        raise fail(str(err)) from None
    if is_language_model(model):
        return _edit_language_model(policy, policy_file, model, out, concept or (), force, method, layers or (),
                                    measure)
    if layers:
        raise fail("--layers applies to language models; diffusion edits use the policy's methods.uce")
    solver = method or "uce"
    if solver not in uce.SOLVERS:
        raise fail(f"--method must be one of {', '.join(uce.SOLVERS)} for a diffusion pipeline, got '{solver}'")
    try:
        plan = uce.plan_from_policy(policy, concept or (), solver=solver)
    except WeightEditError as err:
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
        result = uce.apply_edit(pipe, plan, progress=True)
    except WeightEditError as err:
        raise fail(str(err)) from None
    manifest = build_manifest(policy, policy_file, plan, result, source, pipeline_class, source_hash, source_files)
    try:
        report = write_edited_model([pipe], target, manifest)
    except OSError as err:
        raise fail(f"cannot write the edited model to {out}: {err}") from None
    console.print(Markdown(report))


def _edit_language_model(policy: Policy, policy_file: Path, model: str, out: Path, concepts: Sequence[str],
                         force: bool, method: str | None, layers: Sequence[int], measure: int) -> None:
    """STAMP-style edit of a causal LM; an already edited source keeps its earlier concepts erased."""
    try:
        plan = stamp.plan_from_policy(policy, concepts, method, layers)
        source = language_model_folder(model)
        stamp.check_layers(plan.layers, decoder_layer_count(source))
        target = check_out_folder(source, out, force)
        history = previous_edits(source)
        console.print(f"hashing the source weights in {source}")
        source_hash, source_files = weights_sha256(source)
        if not source_files:
            raise WeightEditError(f"{source} contains no weight files ({', '.join(WEIGHT_SUFFIXES)})")
        language_model, tokenizer = load_language_model_copy(source)
        forget, retain = stamp.measure_prompts(plan, measure)
        before = (stamp.greedy_answers(language_model, tokenizer, [p for _, p in forget] + retain, MEASURE_TOKENS)
                  if measure else [])
        preserved = [prompt for edit in history for concept in edit["concepts"] for prompt in concept["prompts"]]
        console.print(f"erasing {', '.join(c.concept_id for c in plan.concepts)} with {plan.method}"
                      + (f", keeping {len(history)} earlier edit(s)" if history else ""))
        result = stamp.apply_edit(language_model, tokenizer, plan, preserved, progress=True)
    except WeightEditError as err:
        raise fail(str(err)) from None
    measurement = None
    if measure:
        after = stamp.greedy_answers(language_model, tokenizer, [p for _, p in forget] + retain, MEASURE_TOKENS)
        ids = [concept_id for concept_id, _ in forget]
        measurement = stamp.Measurement(
            prompts=measure, max_new_tokens=MEASURE_TOKENS,
            forget_named_before=stamp.named_rate(list(zip(ids, before)), plan),
            forget_named_after=stamp.named_rate(list(zip(ids, after)), plan),
            retain_identical=sum(a == b for a, b in zip(before[len(forget):], after[len(forget):])) / len(retain))
    manifest = build_llm_manifest(policy, policy_file, result, source, source_hash, source_files, history,
                                  measurement)
    try:
        report = write_edited_model([language_model, tokenizer], target, manifest, render_llm_report)
    except OSError as err:
        raise fail(f"cannot write the edited model to {out}: {err}") from None
    console.print(Markdown(report))
