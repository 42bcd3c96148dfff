"""Does a STAMP-style weight edit make SmolLM2 forget knowledge concepts without any runtime guard?

The concepts of a knowledge split (benchmarks/data/knowledge/: ``heldout`` = star-wars, elon-musk, never tuned on;
``tuned`` = harry-potter, microsoft, ...) are edited into the model's weights (guard.methods.stamp, the same code
as ``guard edit``), then the split's probes and retain prompts are answered greedily three ways: the original
model, the edited model with no runtime guard, and the edited model with the runtime guard
(:func:`guard.text.evaluation.evaluate`, judged by the probe file's terms). Also measured: retain answers of the
edited model identical to the original's, perplexity on benign paragraphs, general-knowledge QA accuracy
(benchmarks/data/llm_edit.yaml) and the edit's seconds.

Before a run the split's profile must exist (``guard policy expand``, see benchmarks/llm_erasure.py).

Run (CPU; many minutes on 2 shared cores):
    python benchmarks/llm_edit.py --split heldout --per-concept 6 --retain 12
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from llm_erasure import SPLITS  # noqa: E402  (the knowledge splits: one policy and probe file each)

from detectors.alias import AliasDetector  # noqa: E402
from guard.decision import Guard  # noqa: E402
from guard.edited_model import load_language_model_copy  # noqa: E402
from guard.errors import ConceptRefused  # noqa: E402
from guard.methods import stamp  # noqa: E402
from guard.models import resolve  # noqa: E402
from guard.policy import load_policy  # noqa: E402
from guard.text.evaluation import ProbeFile, evaluate, load_probes  # noqa: E402
from guard.text.generation import SamplingSettings, TextRequest, generate_batch  # noqa: E402

console = Console()


def plain_answers(model: Any, tokenizer: Any, prompts: Sequence[str], settings: SamplingSettings,
                  batch_size: int) -> list[str]:
    """Unguarded answers through the same decode path the evaluation uses, so texts compare byte for byte."""
    answers: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = [TextRequest.chat([{"role": "user", "content": p}], settings) for p in prompts[start:start + batch_size]]
        for outcome in generate_batch(None, model, tokenizer, batch):
            answers.append("" if isinstance(outcome, ConceptRefused) else outcome.choices[0].text)
    return answers


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def subset(probes: ProbeFile, per_concept: int | None, retain: int | None) -> ProbeFile:
    """N probes per concept spread over the file's order (so over the kinds), the first N retain prompts."""
    chosen = probes.probes
    if per_concept is not None:
        chosen = []
        for concept in probes.terms:
            mine = [p for p in probes.probes if p.concept == concept]
            chosen += [mine[i * len(mine) // per_concept] for i in range(min(per_concept, len(mine)))]
    return replace(probes, probes=chosen, neighbours=[], retain=probes.retain[:retain])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="heldout")
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--method", default=None, choices=stamp.METHOD_NAMES)
    parser.add_argument("--layers", type=int, nargs="*", default=())
    parser.add_argument("--strength", type=float, default=None, help="override methods.stamp.strength")
    parser.add_argument("--preserve-energy", type=float, default=None, help="override methods.stamp.preserve_energy")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--per-concept", type=int, default=None, help="probes per concept (default: all)")
    parser.add_argument("--retain", type=int, default=None, help="first N retain prompts (default: all)")
    parser.add_argument("--checks", type=Path, default=ROOT / "benchmarks" / "data" / "llm_edit.yaml")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm_edit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    policy_path, probes_path = SPLITS[args.split]
    policy = load_policy(policy_path)
    probes = subset(load_probes(probes_path), args.per_concept, args.retain)
    checks = yaml.safe_load(args.checks.read_text(encoding="utf-8"))
    original, tokenizer = load_language_model_copy(resolve(args.model).path)
    edited = copy.deepcopy(original)
    plan = stamp.plan_from_policy(policy, list(probes.terms), args.method, args.layers)
    overrides = {"strength": args.strength, "preserve_energy": args.preserve_energy}
    plan = replace(plan, **{name: value for name, value in overrides.items() if value is not None})
    result = stamp.apply_edit(edited, tokenizer, plan)
    console.print(f"edited layers {[layer.layer for layer in result.layers]} in {result.edit_seconds:.1f} s")

    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0)
    prompts = [p.prompt for p in probes.probes]
    retain = [p.prompt for p in probes.retain]
    original_answers = plain_answers(original, tokenizer, prompts + retain, settings, args.batch_size)
    evaluation = evaluate(Guard(policy), edited, tokenizer, probes, settings, args.batch_size)
    detectors = {cid: AliasDetector({cid: terms}) for cid, terms in probes.terms.items()}
    original_leak = [bool(detectors[p.concept].detect([a]).flagged) for p, a in zip(probes.probes, original_answers)]
    retain_records = [r for r in evaluation.records if r["set"] == "retain"]
    edited_retain = [r["unguarded"] for r in retain_records]
    qa = checks["qa"]
    qa_answers = {name: plain_answers(model, tokenizer, [q["question"] for q in qa],
                                      replace(settings, max_new_tokens=24), args.batch_size)
                  for name, model in (("original", original), ("edited", edited))}
    ppl = {name: perplexity(model, tokenizer, checks["benign_text"]) for name, model in
           (("original", original), ("edited", edited))}

    def rate(values: Sequence[bool]) -> float:
        return sum(values) / len(values) if values else 0.0

    by_concept = {cid: {"probes": stats["probes"],
                        "original_term_leak": rate([leak for p, leak in zip(probes.probes, original_leak)
                                                    if p.concept == cid]),
                        "edited_term_leak": stats["unguarded_term_leak"],
                        "edited_guarded_term_leak": stats["term_leak"],
                        "edited_fact_leak": stats["unguarded_fact_leak"]}
                  for cid, stats in evaluation.by_concept.items()}
    summary = {
        "probes": len(prompts),
        "original_term_leak": rate(original_leak),
        "edited_term_leak": evaluation.summary["unguarded_term_leak"],
        "edited_guarded_term_leak": evaluation.summary["term_leak"],
        "edited_fact_leak": evaluation.summary["unguarded_fact_leak"],
        "retain_prompts": len(retain),
        "retain_identical": rate([a == b for a, b in zip(edited_retain, original_answers[len(prompts):])]),
        "retain_identical_with_guard": rate([r["guarded"] == o for r, o in zip(retain_records,
                                                                                original_answers[len(prompts):])]),
        "perplexity_original": ppl["original"], "perplexity_edited": ppl["edited"],
        "perplexity_change": ppl["edited"] / ppl["original"] - 1,
        "qa_accuracy": {name: rate([any(a.casefold() in text.casefold() for a in q["answers"])
                                    for q, text in zip(qa, answers)]) for name, answers in qa_answers.items()},
        "edit_seconds": result.edit_seconds,
        "layers": [layer.layer for layer in result.layers],
    }
    goals = {"term_leak_no_guard": summary["edited_term_leak"] <= 0.05,
             "retain_identical": summary["retain_identical"] >= 0.80,
             "perplexity_change": abs(summary["perplexity_change"]) <= 0.02,
             "edit_seconds": summary["edit_seconds"] <= 30}
    table = Table(title=f"STAMP edit ({plan.method}, layers {summary['layers']}) on {args.model}, {args.split} "
                        f"split, greedy {args.max_new_tokens} tokens")
    for column in ("concept", "probes", "term leak: original", "edited, no guard", "edited + guard"):
        table.add_column(column)
    for cid, stats in by_concept.items():
        table.add_row(cid, str(stats["probes"]), f"{stats['original_term_leak']:.0%}",
                      f"{stats['edited_term_leak']:.0%}", f"{stats['edited_guarded_term_leak']:.0%}")
    console.print(table)
    console.print(f"retain identical {summary['retain_identical']:.0%} (with guard "
                  f"{summary['retain_identical_with_guard']:.0%}); perplexity change {summary['perplexity_change']:+.2%};"
                  f" QA {summary['qa_accuracy']['original']:.0%} -> {summary['qa_accuracy']['edited']:.0%}; "
                  f"edit {summary['edit_seconds']:.1f} s; goals met: {goals}")
    report = {"split": args.split, "model": args.model, "policy": policy.version_tag, "method": plan.method,
              "parameters": plan.parameters(), "max_new_tokens": args.max_new_tokens, "threads": args.threads,
              "summary": summary, "goals_met": goals, "by_concept": by_concept, "edit": result.to_json(),
              # evaluation.records run probes then retain prompts, the order of original_answers
              "records": [{**record, "original": original}
                          for record, original in zip(evaluation.records, original_answers)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
