"""An edited model on disk: where it may go, what it is made from, and the manifest that ties it to its policy.

Persistent removal writes a plain model folder that any runtime loads without the guard; the manifest records
the exact policy, method and source weights, so an auditor can tell which edit a model carries. This module is
the method-neutral half of ``guard edit`` (the closed-form edit itself lives in :mod:`guard.methods`); every
known failure is a :class:`~guard.errors.WeightEditError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from guard.errors import ModelError, WeightEditError
from guard.models import resolve
from guard.policy import Policy

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from guard.methods.stamp import Measurement, StampResult
    from guard.methods.uce import EditPlan, EditResult


MANIFEST_NAME = "erasure_manifest.json"
REPORT_NAME = "erasure_report.md"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
SUPPORTED_PIPELINES = ("StableDiffusionPipeline",)
_HASH_CHUNK = 1 << 22


def weights_sha256(folder: Path) -> tuple[str, list[str]]:
    """One SHA-256 over every weight file (relative path and content) and the files it covers."""
    files = sorted(path for path in folder.rglob("*") if path.is_file() and path.suffix in WEIGHT_SUFFIXES)
    total = hashlib.sha256()
    names = []
    for path in files:
        name = path.relative_to(folder).as_posix()
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while chunk := handle.read(_HASH_CHUNK):
                digest.update(chunk)
        total.update(f"{name}\0{digest.hexdigest()}\n".encode())
        names.append(name)
    return total.hexdigest(), names


def pipeline_folder(reference: str) -> tuple[Path, str]:
    """The local diffusers pipeline folder behind ``reference`` and its pipeline class, or a clear error."""
    if reference.startswith("embedded:"):
        raise WeightEditError(f"'{reference}' is not a diffusers pipeline (embedded language models are edited "
                              "with the STAMP path)")
    if not Path(reference).expanduser().is_dir():
        raise WeightEditError(f"model folder '{reference}' does not exist or is not a folder")
    try:
        folder = resolve(reference).path
    except ModelError as err:
        raise WeightEditError(str(err)) from None
    index = folder / "model_index.json"
    if not index.is_file():
        raise WeightEditError(f"'{reference}' is not a diffusers pipeline folder (no model_index.json)")
    try:
        pipeline_class = json.loads(index.read_text(encoding="utf-8")).get("_class_name", "")
    except (OSError, ValueError) as err:
        raise WeightEditError(f"cannot read {index}: {err}") from None
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise WeightEditError(f"'{reference}' holds a {pipeline_class or 'unknown'} pipeline; guard edit supports "
                              f"{', '.join(SUPPORTED_PIPELINES)} (single CLIP text encoder, UNet cross-attention)")
    return folder, pipeline_class


LLM_FORMAT = "erasure-guard/llm-edit@1"


def is_language_model(reference: str) -> bool:
    """``embedded:smollm2`` or a transformers folder (config.json, no model_index.json) is a language model."""
    if reference.startswith("embedded:"):
        return reference == "embedded:smollm2"
    folder = Path(reference).expanduser()
    return (folder / "config.json").is_file() and not (folder / "model_index.json").is_file()


def language_model_folder(reference: str) -> Path:
    try:
        return resolve(reference).path
    except ModelError as err:
        raise WeightEditError(str(err)) from None


def decoder_layer_count(folder: Path) -> int:
    """The decoder's layer count from the folder's config.json, read before the weights are loaded."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        return int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise WeightEditError(f"cannot read the decoder layer count from {folder / 'config.json'}: {err}") from None


def load_language_model_copy(folder: Path) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """A private float32 copy (never the shared cached model: the edit changes it in place)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise WeightEditError(f"cannot load the language model at {folder}: {err}") from None
    return model, tokenizer


def previous_edits(folder: Path) -> list[dict[str, Any]]:
    """The edits an already edited source carries (from its manifest), oldest first; [] for an unedited model."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return []
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise WeightEditError(f"cannot read {path}: {err}") from None
    if manifest.get("format") != LLM_FORMAT:
        raise WeightEditError(f"{path} is not a language-model edit manifest ({manifest.get('format')})")
    return [*manifest.get("previous_edits", []), {key: manifest[key] for key in ("policy", "method", "concepts",
                                                                              "result")}]


def build_llm_manifest(policy: Policy, policy_file: Path, result: "StampResult", source: Path, source_hash: str,
                       source_files: list[str], history: list[dict[str, Any]],
                       measurement: "Measurement | None") -> dict[str, Any]:
    plan = result.plan
    return {
        "format": LLM_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "erasure-guard", "version": version("erasure-guard")},
        "policy": {"name": policy.name, "fingerprint": policy.fingerprint, "version_tag": policy.version_tag,
                   "file": str(policy_file)},
        "method": plan.method,
        "layers": [layer.layer for layer in result.layers],
        "parameters": plan.parameters(),
        "concepts": [concept.to_json() for concept in plan.concepts],
        "source_model": {"path": str(source), "weights_sha256": source_hash, "weight_files": source_files},
        "result": result.to_json(),
        "measured": measurement.to_json() if measurement else None,
        "previous_edits": history,
    }


def render_llm_report(manifest: dict[str, Any], out: Path) -> str:
    """What was erased from the language model, where, and what it cost on the measured prompts."""
    result, measured = manifest["result"], manifest["measured"]
    lines = [
        "# Erasure report (language model)", "",
        f"- Edited model: `{out}` (weights sha256 `{manifest['edited_model']['weights_sha256'][:16]}…`)",
        f"- Source model: `{manifest['source_model']['path']}` "
        f"(weights sha256 `{manifest['source_model']['weights_sha256'][:16]}…`)",
        f"- Policy: `{manifest['policy']['version_tag']}` from `{manifest['policy']['file']}`",
        f"- Method: {manifest['method']}; concepts: {', '.join(c['id'] for c in manifest['concepts'])}; "
        f"earlier edits kept: {len(manifest['previous_edits'])}",
        f"- Keys: {result['forget_keys']} forget, {result['retain_keys']} retain, {result['preserved_keys']} preserved "
        f"(earlier edits); edit took {result['edit_seconds']:.1f} s",
        "", "| layer | change norm | relative change | target reached | retain drift | separation |",
        "|---|---|---|---|---|---|",
    ]
    for layer in result["layers"]:
        lines.append(f"| {layer['layer']} | {layer['change_norm']:.3f} | {layer['relative_change']:.3f} | "
                     f"{layer['target_reached']:.3f} | {layer['retain_drift']:.3f} | {layer['separation']:.3f} |")
    if measured:
        lines += ["", f"Greedy answers ({measured['max_new_tokens']} tokens, {measured['prompts']} prompts per set): "
                  f"forget prompts naming their concept {measured['forget_named_before']:.0%} before, "
                  f"{measured['forget_named_after']:.0%} after; retain answers unchanged "
                  f"{measured['retain_identical']:.0%}."]
    lines += ["", "Target reached: share of the redirection toward the refusal reference that the solve achieves on "
              "the forget keys. Retain drift: |ΔW k| / |W k| on benign prompts the edit never saw.", ""]
    return "\n".join(lines)


def check_out_folder(source: Path, out: Path, force: bool) -> Path:
    """Refuse any output that could overwrite the source, and a non-empty folder unless ``force``."""
    target = out.expanduser().resolve()
    if target == source or source in target.parents:
        raise WeightEditError(f"refusing to write the edited model into the source model folder {source}; "
                              "choose another --out")
    if target in source.parents:
        raise WeightEditError(f"--out {out} contains the source model {source}; replacing it would destroy the source")
    if target.exists():
        if not target.is_dir():
            raise WeightEditError(f"--out {out} is a file, not a folder")
        if any(target.iterdir()) and not force:
            raise WeightEditError(f"--out {out} exists and is not empty; pass --force to replace it")
    return target


def load_pipeline(folder: Path) -> "StableDiffusionPipeline":
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise WeightEditError(f"cannot load the diffusers pipeline at {folder}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_manifest(policy: Policy, policy_file: Path, plan: "EditPlan", result: "EditResult", source: Path,
                   pipeline_class: str, source_hash: str, source_files: list[str]) -> dict[str, Any]:
    from guard.methods.uce import ROUND_CRITERION

    return {
        "format": "erasure-guard/weight-edit@1",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": {"name": "erasure-guard", "version": version("erasure-guard")},
        "policy": {"name": policy.name, "fingerprint": policy.fingerprint, "version_tag": policy.version_tag,
                   "file": str(policy_file)},
        "method": plan.method,
        "parameters": {
            "lambda": plan.lambda_,
            "erase_scale": 1.0,
            "rece_rounds": plan.rece_rounds,
            "rece_regularizer": plan.rece_regularizer,
            "solver": plan.solver,
            "null_space_tolerance": plan.null_space_tolerance if plan.solver == "null-space" else None,
            "keys": "last subject token of each alias; anchors and preserve prompts held at their original outputs",
            "edited": "cross-attention (attn2) to_k and to_v of every UNet transformer block",
            "round_criterion": ROUND_CRITERION,
        },
        "concepts": [{"id": c.concept_id, "kind": c.kind.value, "names": list(c.names), "anchor": c.anchor,
                      "preserve": list(c.preserve), "preserve_scale": c.preserve_scale} for c in plan.concepts],
        "source_model": {"path": str(source), "pipeline": pipeline_class, "weights_sha256": source_hash,
                         "weight_files": source_files},
        "result": result.to_json(),
    }


def render_report(manifest: dict[str, Any], out: Path) -> str:
    """A short Markdown summary: what was erased, how well, and at what cost to preserved prompts."""
    result = manifest["result"]
    best = result["rounds"][result["best_round"]]
    rounds = manifest["parameters"]["rece_rounds"]
    method = ("UCE" + (" (null-space solve)" if manifest["parameters"]["solver"] == "null-space" else "")
              + (f" + {rounds} RECE round{'s' if rounds != 1 else ''}" if rounds else ""))
    widest = max(result["layers"], key=lambda layer: layer["relative_change"])
    lines = [
        "# Erasure report", "",
        f"- Edited model: `{out}` (weights sha256 `{manifest['edited_model']['weights_sha256'][:16]}…`)",
        f"- Source model: `{manifest['source_model']['path']}` "
        f"(weights sha256 `{manifest['source_model']['weights_sha256'][:16]}…`)",
        f"- Policy: `{manifest['policy']['version_tag']}` from `{manifest['policy']['file']}`",
        f"- Method: {method}, lambda {manifest['parameters']['lambda']}; kept round {result['best_round']} "
        f"({result['round_criterion']})",
        f"- Changed {len(result['layers'])} cross-attention projections; largest relative change "
        f"{widest['relative_change']:.3f} (`{widest['name']}`)",
        f"- Preserved prompts and anchors drift at most {best['preserve_drift']:.3f} (relative)",
        "", "| concept | kind | names | anchor | erase residual | revivability |", "|---|---|---|---|---|---|",
    ]
    for concept in manifest["concepts"]:
        lines.append(f"| {concept['id']} | {concept['kind']} | {', '.join(concept['names'])} | "
                     f"{concept['anchor'] or '(empty prompt)'} | {best['erase_residual'][concept['id']]:.3f} | "
                     f"{best['revivability'][concept['id']]:.3f} |")
    if rounds:
        lines += ["", "| round | worst revivability | worst erase residual | preserve drift |", "|---|---|---|---|"]
        for metrics in result["rounds"]:
            lines.append(f"| {metrics['round']} | {max(metrics['revivability'].values()):.3f} | "
                         f"{max(metrics['erase_residual'].values()):.3f} | {metrics['preserve_drift']:.3f} |")
    lines += ["", "Erase residual: share of the name-to-anchor distance left in the keys and values (0 = the names "
              "now encode like the anchor). Revivability: share of that distance that the best reviving embedding "
              "closes (RECE closed form; 1 = the concept can be fully restored).", ""]
    return "\n".join(lines)


def write_edited_model(parts: Sequence[Any], target: Path, manifest: dict[str, Any],
                       render: Callable[[dict[str, Any], Path], str] = render_report) -> str:
    """Save every part (pipeline, or model and tokenizer) into a staging folder beside ``target``, then swap it
    in, so a failure never leaves half a model."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()  # not mkdtemp: its private mode would stick to the published folder
    try:
        for part in parts:
            part.save_pretrained(staging, safe_serialization=True)
        edited_hash, _ = weights_sha256(staging)
        manifest["edited_model"] = {"weights_sha256": edited_hash}
        report = render(manifest, target)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        (staging / REPORT_NAME).write_text(report, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return report
