"""``guard edit`` on a language model: a real STAMP edit of SmolLM2, its manifest, its folder rules, sequential
edits, and the edited folder served by the real server and queried with the openai client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import API_KEY, POLICIES, start_server
from safetensors.torch import load_file
from typer.testing import CliRunner

from guard.cli import app
from guard.edited_model import load_language_model_copy, weights_sha256
from guard.methods import stamp
from guard.models import resolve
from guard.policy import load_policy
from serving.config import ServerSettings

POLICY = POLICIES / "edit_llm.yaml"
LAYER = 3


def guard(*args: str):  # noqa: ANN201 - click Result
    return CliRunner().invoke(app, ["edit", *args])


@pytest.fixture(scope="module")
def first_edit(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edited") / "hp"
    result = guard("--policy", str(POLICY), "--model", "embedded:smollm2", "--out", str(out),
                   "--concept", "harry-potter", "--measure", "2")
    assert result.exit_code == 0, result.stderr
    return out


def test_edit_writes_a_transformers_folder_with_its_manifest(first_edit: Path) -> None:
    source = resolve("embedded:smollm2").path
    manifest = json.loads((first_edit / "erasure_manifest.json").read_text())
    policy = load_policy(POLICY)
    assert manifest["policy"]["fingerprint"] == policy.fingerprint
    assert manifest["method"] == "stamp" and manifest["layers"] == [LAYER]
    assert [c["id"] for c in manifest["concepts"]] == ["harry-potter"]
    assert "Who is Hogwarts?" in manifest["concepts"][0]["prompts"]
    assert manifest["source_model"]["weights_sha256"] == weights_sha256(source)[0]
    assert manifest["edited_model"]["weights_sha256"] == weights_sha256(first_edit)[0]
    assert manifest["previous_edits"] == []
    measured = manifest["measured"]
    assert measured["prompts"] == 2 and 0 <= measured["retain_identical"] <= 1

    original = load_file(next(source.glob("*.safetensors")))
    edited = load_file(first_edit / "model.safetensors")
    changed = [key for key in original if not torch.equal(original[key], edited[key])]
    name = f"model.layers.{LAYER}.mlp.down_proj"
    assert changed == [f"{name}.weight"] and edited[changed[0]].dtype == torch.float32
    layer = manifest["result"]["layers"][0]
    assert layer["name"] == name
    assert layer["change_norm"] == pytest.approx(float((edited[changed[0]] - original[changed[0]]).norm()), rel=1e-3)
    assert "harry-potter" in (first_edit / "erasure_report.md").read_text()


def test_sequential_edit_keeps_the_first_concept_erased(first_edit: Path, tmp_path: Path) -> None:
    out = tmp_path / "hp-then-sw"
    result = guard("--policy", str(POLICY), "--model", str(first_edit), "--out", str(out), "--concept", "star-wars",
                   "--measure", "0")
    assert result.exit_code == 0, result.stderr
    manifest = json.loads((out / "erasure_manifest.json").read_text())
    assert [c["id"] for c in manifest["previous_edits"][0]["concepts"]] == ["harry-potter"]
    assert manifest["result"]["preserved_keys"] > 0 and manifest["measured"] is None

    source = resolve("embedded:smollm2").path
    weights = {name: load_file(folder / "model.safetensors")[f"model.layers.{LAYER}.mlp.down_proj.weight"].double()
               for name, folder in (("source", source), ("first", first_edit), ("second", out))}

    model, tokenizer = load_language_model_copy(first_edit)
    policy = load_policy(POLICY)
    hp = stamp.plan_from_policy(policy, ["harry-potter"]).concepts[0]
    found = stamp.collect(model, tokenizer, hp.prompts, [LAYER])
    keys = found.keys[LAYER][found.from_end < stamp.TAIL].T
    first_shift = (weights["first"] - weights["source"]) @ keys
    second_shift = (weights["second"] - weights["first"]) @ keys
    # the second edit moves the first concept's redirected outputs by a small fraction of the first edit's move
    assert float(second_shift.norm()) < 0.25 * float(first_shift.norm())


def test_out_folder_rules_and_one_line_errors(first_edit: Path, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    cases = [
        (("--model", "embedded:smollm2", "--out", str(occupied)), "exists and is not empty; pass --force"),
        (("--model", str(first_edit), "--out", str(first_edit), "--force"), "refusing to write the edited model"),
        (("--model", "embedded:smollm2", "--out", str(tmp_path / "o"), "--concept", "nope"), "unknown concept id"),
        (("--model", "embedded:smollm2", "--out", str(tmp_path / "o"), "--layers", "99"), "layer 99 does not exist"),
    ]
    for args, message in cases:
        result = guard("--policy", str(POLICY), *args, "--measure", "0")
        assert result.exit_code == 2, (args, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert (occupied / "keep.txt").exists() and not (tmp_path / "o").exists()


def test_edited_folder_is_served_by_the_guard(first_edit: Path) -> None:
    running = start_server(ServerSettings(policy_path=POLICIES / "server_test.yaml", model=str(first_edit),
                                          api_keys=(API_KEY,), max_request_bytes=100_000, default_max_tokens=16,
                                          reload_policy=False))
    try:
        client = running.client()
        assert [m.id for m in client.models.list().data] == [str(first_edit)]
        reply = client.chat.completions.create(model=str(first_edit), max_tokens=12, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    finally:
        running.stop()
