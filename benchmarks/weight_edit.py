"""Weight-edit benchmark: UCE and UCE + RECE on a tiny and an SD1.5-shaped pipeline, on CPU.

    python benchmarks/weight_edit.py            # ~2-3 minutes on 2 CPU cores
    python benchmarks/weight_edit.py --quick    # tiny pipeline only, < 1 minute

No diffusion weights exist offline, so both pipelines have random UNets and the bag-of-words text encoder of
tests/tiny_pipeline.py; the numbers describe the edit's algebra and cost, not image quality. The policy is
policies/default.yaml (van-gogh-style -> "a painting", nudity -> "a person wearing clothes"). Reported per run:

* edit seconds (planning, prompt encoding, solves, writing the layers; no disk I/O);
* for the kept round: worst erase residual, worst revivability, preserve drift (anchors), largest relative
  weight change; the revivability of every round;
* collateral: relative change of the last-token keys/values (max over layers) of unrelated prompts;
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

from guard.methods.uce import apply_edit, plan_from_policy  # noqa: E402
from guard.policy import load_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "weight_edit.json"
UNRELATED = ("a red car", "a dog on the beach", "mountain landscape", "castle in the forest", "a blue bird",
             "city at night", "a cat in the house", "green river")
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


def run(label: str, pipe, rounds: int, size: int) -> dict[str, Any]:
    plan = dataclasses.replace(plan_from_policy(load_policy(ROOT / "policies" / "default.yaml")), rece_rounds=rounds)
    before = last_token_outputs(pipe, UNRELATED)
    edited = copy.deepcopy(pipe)
    start = time.perf_counter()
    result = apply_edit(edited, plan, progress=False)
    edit_seconds = time.perf_counter() - start
    after = last_token_outputs(edited, UNRELATED)
    collateral = torch.stack([(after[name] - before[name]).norm(dim=1) / before[name].norm(dim=1)
                              for name in before]).max(dim=0).values
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
        "collateral_mean": float(collateral.mean()), "collateral_max": float(collateral.max()),
        "generation_ratio": edited_seconds / original_seconds,
        "generation_seconds_original": original_seconds, "generation_size": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny pipeline only")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    rows = []
    pipelines = [("tiny (128-dim text)", tiny_sd_pipeline, 64)]
    if not args.quick:
        pipelines.append(("SD1.5-shaped (768-dim text, 860M UNet)", sd15_sized_pipeline, 64))
    for label, build, size in pipelines:
        console.print(f"building {label}")
        pipe = build()
        for rounds in (0, 2):
            console.print(f"  editing with {rounds} RECE rounds")
            rows.append(run(label, pipe, rounds, size))
        del pipe

    table = Table(title="guard edit: UCE / UCE + RECE on random-weight pipelines (policies/default.yaml)")
    for column in ("pipeline", "method", "edit s", "kept round", "erase residual", "revivability (by round)",
                   "preserve drift", "max weight change", "collateral mean / max", "generation ratio"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["pipeline"], row["method"], f"{row['edit_seconds']:.1f}", str(row["kept_round"]),
                      f"{row['worst_erase_residual']:.4f}",
                      " / ".join(f"{value:.3f}" for value in row["revivability_by_round"]),
                      f"{row['preserve_drift']:.4f}", f"{row['max_relative_weight_change']:.3f}",
                      f"{row['collateral_mean']:.3f} / {row['collateral_max']:.3f}", f"{row['generation_ratio']:.2f}")
    console.print(table)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                               "torch": torch.__version__}, "runs": rows}, indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
