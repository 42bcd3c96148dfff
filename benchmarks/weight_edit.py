"""Weight-edit benchmark: UCE, UCE + RECE and the null-space solve on a tiny and an SD1.5-shaped pipeline, on CPU.

    python benchmarks/weight_edit.py            # ~5 minutes on 2 CPU cores
    python benchmarks/weight_edit.py --quick    # tiny pipeline only, ~1 minute

No diffusion weights exist offline, so both pipelines have random UNets and the bag-of-words text encoder of
tests/tiny_pipeline.py; the numbers describe the edit's algebra and cost, not image quality. The policy is
policies/default.yaml (van-gogh-style -> "a painting", nudity -> "a person wearing clothes"). Reported per run:

* edit seconds (planning, prompt encoding, solves, writing the layers; no disk I/O);
* for the kept round: worst erase residual, worst revivability, preserve drift (anchors), largest relative
  weight change; the revivability of every round;
* collateral: relative change of the last-token keys/values (max over layers) of unrelated prompts, both the
  hand-written UNRELATED ones and the held-out half of the shipped benign image prompts (the null-space solve's
  prior is the other half, so neither set is one it preserved by construction);
* scaling: edit time, worst erase residual and collateral for 1, 10 and 100 synthetic style concepts
  ("artist<i>", spelled out by the tiny tokenizer, -> "a painting") with each solver;
* generation time of the edited pipeline as a ratio to the original, measured in the same run (the edit
  changes weights, not the architecture, so this should be 1.0 within noise).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tiny_pipeline import sd15_sized_pipeline, tiny_sd_pipeline  # noqa: E402

from detectors.calibration import benign_image_prompts  # noqa: E402
from guard.methods.uce import apply_edit, plan_from_policy  # noqa: E402
from guard.policy import Concept, Policy, load_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "weight_edit.json"
UNRELATED = ("a red car", "a dog on the beach", "mountain landscape", "castle in the forest", "a blue bird",
             "city at night", "a cat in the house", "green river")
BENIGN = benign_image_prompts()
PRIOR, HELD_OUT = tuple(BENIGN[0::2]), tuple(BENIGN[1::2])
SCALES = (1, 10, 100)
console = Console(width=200)


def cross_attention(unet: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    return {f"{name}.{part}": getattr(module, part)
            for name, module in unet.named_modules() if name.endswith("attn2") for part in ("to_k", "to_v")}


@torch.no_grad()
def last_token_outputs(pipe, prompts: tuple[str, ...]) -> dict[str, torch.Tensor]:
    embeds = pipe.encode_prompt(list(prompts), "cpu", 1, False)[0]
    last = pipe.tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt").attention_mask
    keys = embeds[torch.arange(len(prompts)), last.sum(1) - 2]
    return {name: linear(keys) for name, linear in cross_attention(pipe.unet).items()}


def generation_seconds(pipes: tuple[Any, Any], size: int, repeats: int = 5) -> tuple[float, float]:
    """Median one-step generation time of each pipeline, calls interleaved after a warm-up so load drift cancels."""
    times: tuple[list[float], list[float]] = ([], [])
    for repeat in range(repeats + 1):
        for pipe, record in zip(pipes, times):
            start = time.perf_counter()
            pipe("a red car", num_inference_steps=1, height=size, width=size, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
            if repeat:
                record.append(time.perf_counter() - start)
    return tuple(sorted(record)[len(record) // 2] for record in times)  # type: ignore[return-value]


def collateral(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per prompt: the largest relative change of its last-token key/value over the edited projections."""
    return torch.stack([(after[name] - before[name]).norm(dim=1) / before[name].norm(dim=1)
                        for name in before]).max(dim=0).values


def run(label: str, pipe, rounds: int, size: int, solver: str = "uce") -> dict[str, Any]:
    plan = dataclasses.replace(plan_from_policy(load_policy(ROOT / "policies" / "default.yaml"), solver=solver),
                               rece_rounds=rounds)
    before = {name: last_token_outputs(pipe, prompts) for name, prompts in (("unrelated", UNRELATED),
                                                                            ("held_out", HELD_OUT))}
    edited = copy.deepcopy(pipe)
    start = time.perf_counter()
    result = apply_edit(edited, plan, progress=False, prior_prompts=PRIOR)
    edit_seconds = time.perf_counter() - start
    moved = {name: collateral(outputs, last_token_outputs(edited, UNRELATED if name == "unrelated" else HELD_OUT))
             for name, outputs in before.items()}
    original_seconds, edited_seconds = generation_seconds((pipe, edited), size)
    best = result.best
    return {
        "pipeline": label, "method": plan.method, "rece_rounds": rounds, "edit_seconds": round(edit_seconds, 2),
        "kept_round": result.best_round,
        "worst_erase_residual": max(best.erase_residual.values()),
        "worst_revivability": max(best.revivability.values()),
        "revivability_by_round": [max(metrics.revivability.values()) for metrics in result.rounds],
        "preserve_drift": best.preserve_drift,
        "max_relative_weight_change": max(layer.relative_change for layer in result.layers),
        "collateral_mean": float(moved["unrelated"].mean()), "collateral_max": float(moved["unrelated"].max()),
        "held_out_collateral_mean": float(moved["held_out"].mean()),
        "held_out_collateral_max": float(moved["held_out"].max()),
        "generation_ratio": edited_seconds / original_seconds,
        "generation_seconds_original": original_seconds, "generation_size": size,
    }


def synthetic_policy(count: int) -> Policy:
    return Policy(name=f"synthetic-{count}", concepts=[
        Concept(id=f"artist-{i}", kind="style", description=f"The style of artist {i}.", aliases=[f"artist{i}"],
                anchor="a painting") for i in range(count)])


def scaling(label: str, pipe) -> list[dict[str, Any]]:
    """Edit time, erasure and collateral for 1, 10 and 100 concepts with each solver."""
    rows = []
    before = last_token_outputs(pipe, HELD_OUT)
    for count in SCALES:
        for solver in ("uce", "null-space"):
            plan = plan_from_policy(synthetic_policy(count), solver=solver)
            edited = copy.deepcopy(pipe)
            start = time.perf_counter()
            result = apply_edit(edited, plan, progress=False, prior_prompts=PRIOR)
            seconds = time.perf_counter() - start
            moved = collateral(before, last_token_outputs(edited, HELD_OUT))
            rows.append({"pipeline": label, "concepts": count, "method": plan.method, "edit_seconds": round(seconds, 3),
                         "worst_erase_residual": max(result.best.erase_residual.values()),
                         "held_out_collateral_mean": float(moved.mean())})
            del edited
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipeline only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    rows, scaled = [], []
    pipelines = [("tiny (128-dim text)", tiny_sd_pipeline, 64)]
    if not args.quick:
        pipelines.append(("SD1.5-shaped (768-dim text, 860M UNet)", sd15_sized_pipeline, 64))
    for label, build, size in pipelines:
        console.print(f"building {label}")
        pipe = build()
        for rounds, solver in ((0, "uce"), (2, "uce"), (0, "null-space")):
            console.print(f"  editing with {solver}, {rounds} RECE rounds")
            rows.append(run(label, pipe, rounds, size, solver))
        console.print(f"  timing 1 / 10 / 100 concepts on {label}")
        scaled += scaling(label, pipe)
        del pipe

    table = Table(title="guard edit on random-weight pipelines (policies/default.yaml)")
    for column in ("pipeline", "method", "edit s", "kept round", "erase residual", "revivability (by round)",
                   "preserve drift", "max weight change", "collateral mean / max", "held-out benign mean / max",
                   "generation ratio"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["pipeline"], row["method"], f"{row['edit_seconds']:.1f}", str(row["kept_round"]),
                      f"{row['worst_erase_residual']:.4f}",
                      " / ".join(f"{value:.3f}" for value in row["revivability_by_round"]),
                      f"{row['preserve_drift']:.4f}", f"{row['max_relative_weight_change']:.3f}",
                      f"{row['collateral_mean']:.3f} / {row['collateral_max']:.3f}",
                      f"{row['held_out_collateral_mean']:.3f} / {row['held_out_collateral_max']:.3f}",
                      f"{row['generation_ratio']:.2f}")
    console.print(table)
    table = Table(title="edit time and quality against the number of concepts (synthetic styles)")
    for column in ("pipeline", "concepts", "method", "edit s", "erase residual", "held-out benign collateral"):
        table.add_column(column)
    for row in scaled:
        table.add_row(row["pipeline"], str(row["concepts"]), row["method"], f"{row['edit_seconds']:.2f}",
                      f"{row['worst_erase_residual']:.4f}", f"{row['held_out_collateral_mean']:.3f}")
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "torch": torch.__version__},
                                   "prior": f"even half of the benign image prompts ({len(PRIOR)})",
                                   "held_out": f"odd half ({len(HELD_OUT)})", "runs": rows, "scaling": scaled},
                                  indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
