"""MUSE's scalability and sustainability for the runtime guard: does erasing more concepts weaken the first ones?

    python benchmarks/llm_erasure_scaling.py        # a few minutes per policy on 2 CPU cores

The held-out concepts (star-wars, elon-musk) are guarded by policies holding 3, 10 and 100 knowledge concepts: the
held-out ones with the default policy's harry-potter, then with 8 real ones of the other splits (tuned, blind, blind2), then with 90 invented ones
as well (a name, a place, exemplars and a forget passage each, seeded). Profiles are left out of every policy so
the three differ only in their concepts. Each policy is judged with benchmarks/llm_erasure.py on the held-out probes
(10 per concept), neighbours and the first 50 retain prompts. Sustainability: the policies are loaded one after the
other in one process, and the smallest policy is loaded again last; its guarded answers must be what they were.
Writes benchmarks/results/llm_erasure_scaling.json.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import llm_erasure  # noqa: E402

from guard.policy import load_policy  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "knowledge"
TARGETS = ("heldout_policy.yaml",)
OTHERS = ("tuned_policy.yaml", "blind_policy.yaml", "blind2_policy.yaml")
SIZES = (2, 10, 100)
SYLLABLES = "ka ra vel mor tha lin dor ven sar quo zel bri nak tor uli fen gra osh pel yar".split()
METRICS = ("term_leak", "near_miss_leak", "fact_leak", "fallback_rate", "neighbours_answered", "retain_identical",
           "tokens_per_s_ratio", "startup_s")


def _concepts(names: tuple[str, ...]) -> list[dict[str, Any]]:
    """The concepts of policy files, without their profiles (a profile belongs to its own file)."""
    return [concept for name in names for concept in yaml.safe_load((DATA / name).read_text())["concepts"]]


def _invented(count: int, seed: int = 0) -> list[dict[str, Any]]:
    """Knowledge concepts about people and places that do not exist, shaped like a safety team's."""
    rng = random.Random(seed)

    def word() -> str:
        return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize()

    concepts = []
    for index in range(count):
        person, surname, place = word(), word(), word()
        concepts.append({
            "id": f"invented-{index}", "kind": "knowledge", "description": f"The saga of {person} {surname} of {place}.",
            "action": {"type": "steer", "fallback": "I don't have information about that."},
            "aliases": [f"{person} {surname}", place],
            "exemplars": [f"Who is {person} {surname}?", f"Tell me about the saga of {place}."],
            "negatives": [f"What is the weather like in {rng.choice(['Spain', 'Peru', 'Kenya'])}?"],
            "forget": [f"{person} {surname} is the {rng.choice(['queen', 'smith', 'captain'])} of {place}, who "
                       f"guards the {word()} Stone in the valley of {word()}."]})
    return concepts


def _policy(folder: Path, size: int) -> tuple[Path, int]:
    """The policy with ``size`` concepts of its own, and how many knowledge concepts it holds (the default
    policy's harry-potter included, which the tuned split's replaces)."""
    targets = _concepts(TARGETS)
    concepts = targets + _concepts(OTHERS)[: max(0, min(size, 10) - len(targets))]
    concepts += _invented(size - len(concepts))
    path = folder / f"scaling-{size}.yaml"
    path.write_text(yaml.safe_dump({"version": 1, "name": f"scaling-{size}",
                                    "extends": [str(ROOT / "policies" / "default.yaml")], "concepts": concepts},
                                   allow_unicode=True, sort_keys=False))
    return path, sum(concept.kind == "knowledge" for concept in load_policy(path).concepts)


def main() -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as folder:
        runs = []
        for size in (*SIZES, SIZES[0]):
            out = Path(folder) / f"run-{len(runs)}.json"
            path, knowledge = _policy(Path(folder), size)
            report = llm_erasure.main(["--split", "heldout", "--policy", str(path), "--per-concept", "10",
                                       "--retain", "50", "--out", str(out)])
            runs.append((knowledge, report))
    first, last = runs[0][1], runs[-1][1]
    answers = [(a["prompt"], a["guarded"]) for a in first["records"]]
    result = {
        "concepts": [size for size, _ in runs[:-1]],
        "runs": [{"concepts": size, **{k: report["summary"][k] for k in METRICS},
                  "retain_changed": [r["prompt"] for r in report["records"]
                                     if r["set"] == "retain" and r["guarded"] != r["unguarded"]]}
                 for size, report in runs[:-1]],
        "reloaded_identical": answers == [(a["prompt"], a["guarded"]) for a in last["records"]],
        "reloaded": {k: last["summary"][k] for k in METRICS},
    }
    for run in result["runs"]:
        print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in run.items()))
    print(f"the smallest policy loaded again after the others: guarded answers identical = "
          f"{result['reloaded_identical']}")
    out = ROOT / "benchmarks" / "results" / "llm_erasure_scaling.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
