"""Persistent removal (UCE + RECE weight edits) on tiny Stable Diffusion pipelines built from configs.

Measurements here use the UNet's own ``attn2.to_k``/``to_v`` modules on the pipeline's own prompt embeddings,
not the edit module's helpers, so they check the edit rather than restate it.

Tolerances:
* ERASED: after the edit, a concept name's keys and values lie within 5% of the name-to-anchor distance from
  the anchor's original keys and values (measured about 1%).
* PRESERVED: a preserved prompt's keys and values move by less than 1% of their norm (measured about 0.1%;
  without the preserve entry the same prompt moves about 29%).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file
from tiny_pipeline import WORDS, tiny_sd_pipeline
from typer.testing import CliRunner

from guard.cli import app
from guard.errors import WeightEditError
from guard.methods.uce import EditPlan, apply_edit, plan_from_policy, uce_transform
from guard.policy import load_policy

REPO = Path(__file__).resolve().parents[1]
POLICIES = Path(__file__).parent / "policies"
BASIC = POLICIES / "edit_basic.yaml"
CONFLICTS = POLICIES / "edit_conflicts.yaml"
ERASED_TOLERANCE = 0.05
PRESERVED_TOLERANCE = 0.01
UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def source_pipe() -> StableDiffusionPipeline:
    return tiny_sd_pipeline(words=(*WORDS, "claude"))


@pytest.fixture(scope="module")
def source_dir(source_pipe: StableDiffusionPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-sd")
    source_pipe.save_pretrained(folder)
    return folder


def linears(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{name}.{part}": getattr(module, part)
            for name, module in unet.named_modules() if name.endswith("attn2") for part in ("to_k", "to_v")}


@torch.no_grad()
def embeddings(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    return pipe.encode_prompt(prompt, "cpu", 1, False)[0][0]


def last_token(pipe: StableDiffusionPipeline, prompt: str) -> torch.Tensor:
    """The embedding of the prompt's last word (the token before the end-of-text token)."""
    return embeddings(pipe, prompt)[len(pipe.tokenizer(prompt).input_ids) - 2]


def assert_erased(source_pipe, plan: EditPlan, before: dict, after: dict, tolerance: float) -> None:
    """Each name's keys and values now lie within ``tolerance`` of the name-to-anchor distance from the anchor's."""
    for concept in plan.concepts:
        anchor = last_token(source_pipe, concept.anchor)
        for name in concept.names:
            key = last_token(source_pipe, name)
            for layer in before:
                target, start, now = before[layer](anchor), before[layer](key), after[layer](key)
                assert (now - target).norm() <= tolerance * (start - target).norm(), (name, layer)


def edited_copy(pipe: StableDiffusionPipeline, plan: EditPlan):
    pipe = copy.deepcopy(pipe)
    return pipe, apply_edit(pipe, plan, progress=False)


def uce_only(plan: EditPlan) -> EditPlan:
    return dataclasses.replace(plan, rece_rounds=0)


@torch.no_grad()
def test_uce_maps_names_onto_their_anchor_and_holds_preserved_prompts(source_pipe):
    plan = uce_only(plan_from_policy(load_policy(BASIC)))
    pipe, result = edited_copy(source_pipe, plan)
    before, after = linears(source_pipe.unet), linears(pipe.unet)
    assert len(before) == 14 and [layer.name for layer in result.layers] == list(before)

    assert_erased(source_pipe, plan, before, after, ERASED_TOLERANCE)
    for prompt in ("Claude Monet", "a painting", "a person wearing clothes"):  # preserved, and the two anchors
        key = last_token(source_pipe, prompt)
        for layer in before:
            assert (after[layer](key) - before[layer](key)).norm() <= PRESERVED_TOLERANCE * before[layer](key).norm()
    assert max(result.best.erase_residual.values()) <= ERASED_TOLERANCE
    assert result.best.preserve_drift <= PRESERVED_TOLERANCE


@torch.no_grad()
def test_preserve_entry_is_what_holds_a_nearby_prompt(source_pipe):
    plan = uce_only(plan_from_policy(load_policy(BASIC)))
    unpreserved = dataclasses.replace(plan, concepts=tuple(dataclasses.replace(c, preserve=()) for c in plan.concepts))
    before = linears(source_pipe.unet)
    key = last_token(source_pipe, "Claude Monet")

    def drift(edit: EditPlan) -> float:
        after = linears(edited_copy(source_pipe, edit)[0].unet)
        return max(float((after[layer](key) - before[layer](key)).norm() / before[layer](key).norm())
                   for layer in before)

    held, free = drift(plan), drift(unpreserved)
    assert held < PRESERVED_TOLERANCE < free
    assert free > 20 * held


@torch.no_grad()
def revivability(source: StableDiffusionPipeline, edited: StableDiffusionPipeline, plan: EditPlan) -> dict[str, float]:
    """1 - |W' c' - W c|^2 / |W a - W c|^2, c' the ridge solution found by least squares on an augmented system."""
    original = torch.cat([linear.weight for linear in linears(source.unet).values()]).double()
    changed = torch.cat([linear.weight for linear in linears(edited.unet).values()]).double()
    width = original.shape[1]
    system = torch.cat([changed, plan.rece_regularizer ** 0.5 * torch.eye(width, dtype=torch.float64)])
    scores = {}
    for concept in plan.concepts:
        last = {prompt: len(source.tokenizer(prompt).input_ids) - 2 for prompt in (*concept.names, concept.anchor)}
        length = 77 - max(last.values())  # each name's last word onwards, aligned with the anchor's last word onwards

        def tail(prompt: str) -> torch.Tensor:
            return embeddings(source, prompt)[last[prompt]:last[prompt] + length].double()

        anchor_rows = tail(concept.anchor)
        error = gap = 0.0
        for name in concept.names:
            rows = tail(name)
            wanted = rows @ original.T
            rhs = torch.cat([wanted.T, torch.zeros(width, len(rows), dtype=torch.float64)])
            revived = torch.linalg.lstsq(system, rhs).solution.T
            error += float((revived @ changed.T - wanted).square().sum())
            gap += float((anchor_rows @ original.T - wanted).square().sum())
        scores[concept.concept_id] = 1 - error / gap
    return scores


def test_rece_rounds_make_the_concept_harder_to_revive(source_pipe):
    plan = plan_from_policy(load_policy(BASIC))
    assert plan.rece_rounds == 2 and plan.method == "uce+rece"
    rece_pipe, result = edited_copy(source_pipe, plan)
    uce_pipe, _ = edited_copy(source_pipe, uce_only(plan))

    worst = [max(metrics.revivability.values()) for metrics in result.rounds]
    assert len(worst) == 3 and result.best_round == int(np.argmin(worst))
    after_uce = revivability(source_pipe, uce_pipe, plan)
    after_rece = revivability(source_pipe, rece_pipe, plan)
    for concept_id, value in after_rece.items():  # the kept weights are the ones the result describes
        assert value == pytest.approx(result.best.revivability[concept_id], abs=1e-6)
        assert after_uce[concept_id] == pytest.approx(result.rounds[0].revivability[concept_id], abs=1e-6)
    assert max(after_rece.values()) < max(after_uce.values()) - 0.02
    assert max(result.best.erase_residual.values()) <= ERASED_TOLERANCE


def test_uce_transform_gives_every_layer_the_minimiser_of_its_uce_objective():
    generator = torch.Generator().manual_seed(0)
    reference, keys, sources, preserved = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                                           for shape in ((4, 4), (3, 4), (3, 4), (2, 4)))
    weights = torch.tensor([0.5, 2.0], dtype=torch.float64)
    transform = uce_transform(reference, keys, sources, preserved, weights, lambda_=0.3)
    for rows in (5, 7):  # two layers of different widths share the transform
        layer = torch.randn(rows, 4, generator=generator, dtype=torch.float64)
        edited = (layer @ transform).requires_grad_(True)
        objective = (0.3 * (edited - layer @ reference).square().sum()
                     + (keys @ edited.T - sources @ layer.T).square().sum()
                     + (weights[:, None] * (preserved @ edited.T - preserved @ layer.T).square()).sum())
        objective.backward()
        assert edited.grad.norm() < 1e-9
    with pytest.raises(WeightEditError, match="singular"):
        uce_transform(reference, keys, sources, preserved[:0], weights[:0], lambda_=0.0)  # 3 keys, 4 dimensions


def test_plan_selects_diffusion_concepts_by_default_and_named_ones_on_request():
    policy = load_policy(BASIC)
    assert [c.concept_id for c in plan_from_policy(policy).concepts] == ["van-gogh-style", "nudity"]
    named = plan_from_policy(policy, ["harry-potter", "nudity", "harry-potter"])
    assert [c.concept_id for c in named.concepts] == ["harry-potter", "nudity"]
    assert named.concepts[0].anchor == "" and named.concepts[0].names == ("Harry Potter",)
    van_gogh = plan_from_policy(policy).concepts[0]
    assert van_gogh.preserve == ("Claude Monet",) and van_gogh.anchor == "a painting"
    assert (named.lambda_, named.rece_rounds, named.rece_regularizer) == (0.5, 2, 0.1)


@pytest.mark.parametrize(("ids", "message"), [
    (["no-such-concept"], "unknown concept id 'no-such-concept' .*defines: van-gogh-style, monet-style"),
    (["van-gogh-style", "monet-style"], r"methods.uce.lambda differs .*van-gogh-style=0.5, monet-style=0.1"),
    (["no-names"], "has no aliases"),
    (["van-gogh-style", "keeps-van-gogh"], "preserves 'van gogh', which concept 'van-gogh-style' erases"),
    (["van-gogh-style", "anchored-on-van-gogh"], "anchor 'Van Gogh' .* is itself erased"),
    ([], "concept .no-names. has no aliases"),  # the default selection includes every object and style concept
])
def test_plan_refuses_what_one_joint_solve_cannot_do(ids, message):
    with pytest.raises(WeightEditError, match=message):
        plan_from_policy(load_policy(CONFLICTS), ids)


def weights_sha256(folder: Path) -> str:
    total = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".safetensors", ".bin")):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        total.update(f"{path.relative_to(folder).as_posix()}\0{digest}\n".encode())
    return total.hexdigest()


runner = CliRunner()


def guard(*args: str):
    return runner.invoke(app, ["edit", *args])


def test_guard_edit_writes_a_plain_diffusers_model_with_manifest_and_report(source_dir, tmp_path):
    out = tmp_path / "edited"
    source_hash = weights_sha256(source_dir)
    result = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(out))
    assert result.exit_code == 0, result.stderr
    assert "Erasure report" in result.stdout and "RECE round" in result.stderr  # report printed, progress shown

    assert weights_sha256(source_dir) == source_hash  # the source is untouched
    manifest = json.loads((out / "erasure_manifest.json").read_text())
    policy = load_policy(BASIC)
    assert manifest["policy"]["fingerprint"] == policy.fingerprint
    assert manifest["policy"]["version_tag"] == policy.version_tag
    assert manifest["method"] == "uce+rece"
    assert [c["id"] for c in manifest["concepts"]] == ["van-gogh-style", "nudity"]
    assert manifest["concepts"][0]["anchor"] == "a painting"
    assert manifest["concepts"][0]["preserve"] == ["Claude Monet"]
    assert manifest["parameters"]["lambda"] == 0.5 and manifest["parameters"]["rece_rounds"] == 2
    assert manifest["source_model"]["weights_sha256"] == source_hash
    assert manifest["edited_model"]["weights_sha256"] == weights_sha256(out)
    assert len(manifest["result"]["rounds"]) == 3

    original, edited = load_file(source_dir / UNET_WEIGHTS), load_file(out / UNET_WEIGHTS)
    changed = {key.removesuffix(".weight") for key in original if not torch.equal(original[key], edited[key])}
    layers = {layer["name"]: layer["change_norm"] for layer in manifest["result"]["layers"]}
    assert changed == set(layers) and len(layers) == 14
    for name, norm in layers.items():
        assert norm == pytest.approx(float((edited[name + ".weight"] - original[name + ".weight"]).norm()), rel=1e-4)
    report = (out / "erasure_report.md").read_text()
    assert "van-gogh-style" in report and policy.version_tag in report

    pipe = StableDiffusionPipeline.from_pretrained(out)  # plain diffusers, no guard code involved
    pipe.set_progress_bar_config(disable=True)
    image = pipe("Van Gogh", num_inference_steps=1, height=32, width=32, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


def test_guard_command_refuses_to_overwrite_the_source(source_dir):
    command = [sys.executable, "-c", "from guard.cli import main; main()", "edit", "--policy", str(BASIC),
               "--model", str(source_dir), "--out", str(source_dir), "--force"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert run.returncode == 2
    assert run.stderr.startswith("error: refusing to write the edited model into the source model folder")
    assert len(run.stderr.strip().splitlines()) == 1


def test_guard_edit_refuses_to_overwrite_the_source_or_a_full_folder(source_dir, tmp_path):
    source_hash = weights_sha256(source_dir)
    for out, reason in ((source_dir, "refusing to write the edited model into the source"),
                        (source_dir / "edited", "refusing to write the edited model into the source"),
                        (source_dir.parent, "contains the source model")):
        result = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(out), "--force")
        assert result.exit_code == 2 and reason in result.stderr, result.stderr
    assert weights_sha256(source_dir) == source_hash

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep me")
    result = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(occupied))
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert (occupied / "notes.txt").exists()

    result = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(occupied), "--force",
                   "--concept", "nudity")
    assert result.exit_code == 0, result.stderr
    assert not (occupied / "notes.txt").exists()  # --force replaces the folder as a whole
    manifest = json.loads((occupied / "erasure_manifest.json").read_text())
    assert [c["id"] for c in manifest["concepts"]] == ["nudity"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_guard_edit_errors_are_one_line_and_exit_2(source_dir, tmp_path):
    bad_policy = tmp_path / "bad.yaml"
    bad_policy.write_text("concepts: [{id: x}]\n")
    not_a_pipeline = tmp_path / "empty-model"
    not_a_pipeline.mkdir()
    cases = [
        (("--policy", str(BASIC), "--model", str(tmp_path / "missing")), "does not exist"),
        (("--policy", str(BASIC), "--model", str(not_a_pipeline)), "not a diffusers pipeline folder"),
        (("--policy", str(BASIC), "--model", "embedded:smollm2", "--method", "nope"), "unknown method 'nope'"),
        (("--policy", str(bad_policy), "--model", str(source_dir)), "bad.yaml:1"),
        (("--policy", str(tmp_path / "none.yaml"), "--model", str(source_dir)), "file not found"),
        (("--policy", str(BASIC), "--model", str(source_dir), "--concept", "weapons"), "unknown concept id 'weapons'"),
    ]
    for args, message in cases:
        result = guard(*args, "--out", str(tmp_path / "out"))
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@torch.no_grad()
def test_null_space_solve_keeps_preserved_keys_exactly_and_still_erases(source_pipe):
    """The null-space solve (``--method null-space``) may only change directions the preserved keys (Claude Monet,
    the anchors) and the benign prior do not use, so the preserved prompts do not move at all, while the names
    still land near their anchors."""
    plan = uce_only(plan_from_policy(load_policy(BASIC), solver="null-space"))
    assert plan.method == "uce-null-space"
    pipe, result = edited_copy(source_pipe, plan)
    before, after = linears(source_pipe.unet), linears(pipe.unet)
    for prompt in ("Claude Monet", "a painting", "a person wearing clothes"):
        key = last_token(source_pipe, prompt)
        for layer in before:
            assert (after[layer](key) - before[layer](key)).norm() <= 1e-5 * before[layer](key).norm()
    assert_erased(source_pipe, plan, before, after, 2 * ERASED_TOLERANCE)
    assert result.best.preserve_drift < 1e-5


def test_guard_edit_method_option(source_dir, tmp_path):
    out = tmp_path / "null-space"
    result = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(out), "--method", "null-space")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "erasure_manifest.json").read_text())
    assert manifest["method"] == "uce-null-space+rece" and manifest["parameters"]["solver"] == "null-space"
    assert "null-space solve" in result.stdout
    wrong = guard("--policy", str(BASIC), "--model", str(source_dir), "--out", str(tmp_path / "x"), "--method", "svd")
    assert wrong.exit_code == 2 and "--method must be one of uce, null-space" in wrong.output
