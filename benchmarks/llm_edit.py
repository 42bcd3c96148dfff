"""Does a STAMP-style weight edit make SmolLM2 forget a knowledge concept without any runtime guard?

For every knowledge concept of the policy that has probes, the model is edited (guard.methods.stamp, the same
code as ``guard edit``) and the knowledge probes and the retain prompts are answered greedily three ways:
the original model (no guard), the edited model with no runtime guard, and the edited model with the runtime
guard. Reported per concept set: term leak (the answer names an alias or states a probe fact), retain answers
identical to the original's, perplexity on benign paragraphs, general-knowledge QA accuracy, and edit seconds.

Run (CPU; several minutes):
    python benchmarks/llm_edit.py                      # tuned concept (harry-potter, default policy)
    python benchmarks/llm_edit.py --policy benchmarks/data/heldout_policy.yaml \
        --probes benchmarks/data/llm_probes_heldout.yaml --out benchmarks/results/llm_edit_heldout.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors.alias import AliasDetector  # noqa: E402
from guard.decision import Guard  # noqa: E402
from guard.edited_model import load_language_model_copy  # noqa: E402
from guard.errors import ConceptRefused  # noqa: E402
from guard.methods import stamp  # noqa: E402
from guard.models import resolve  # noqa: E402
from guard.policy import ConceptKind, load_policy  # noqa: E402
from guard.text.generation import SamplingSettings, TextRequest, generate_batch  # noqa: E402

console = Console()


def guarded_answers(guard: Guard, model: Any, tokenizer: Any, prompts: Sequence[str], tokens: int) -> list[str]:
    """Answers through the runtime guard; a refused or blocked answer is the policy's text, which leaks nothing."""
    settings = SamplingSettings(max_new_tokens=tokens, temperature=0)
    answers = []
    for start in range(0, len(prompts), 8):
        batch = [TextRequest.chat([{"role": "user", "content": p}], settings) for p in prompts[start:start + 8]]
        for outcome in generate_batch(guard, model, tokenizer, batch):
            answers.append("" if isinstance(outcome, ConceptRefused) or outcome.choices[0].finish_reason ==
                           "content_filter" else outcome.choices[0].text)
    return answers


@torch.no_grad()
def perplexity(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    total, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt").input_ids
        loss = model(input_ids=ids, labels=ids).loss
        total += float(loss) * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def leaked(text: str, aliases: AliasDetector, facts: list[str]) -> bool:
    return bool(aliases.detect([text]).flagged) or bool(facts and AliasDetector({"f": facts}).detect([text]).flagged)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "default.yaml")
    parser.add_argument("--probes", type=Path, default=ROOT / "benchmarks" / "data" / "llm_probes.yaml")
    parser.add_argument("--checks", type=Path, default=ROOT / "benchmarks" / "data" / "llm_edit.yaml")
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--method", default=None, choices=stamp.METHOD_NAMES)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--retain-step", type=int, default=1, help="use every n-th retain prompt (CPU time)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm_edit.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = yaml.safe_load(args.probes.read_text(encoding="utf-8"))
    checks = yaml.safe_load(args.checks.read_text(encoding="utf-8"))
    policy = load_policy(args.policy)
    concepts = [c for c in policy.concepts if c.kind is ConceptKind.knowledge and c.id in data["probes"]]
    original, tokenizer = load_language_model_copy(resolve(args.model).path)
    edited = copy.deepcopy(original)
    plan = stamp.plan_from_policy(policy, [c.id for c in concepts], args.method)
    started = time.perf_counter()
    result = stamp.apply_edit(edited, tokenizer, plan)
    edit_seconds = time.perf_counter() - started
    guard = Guard(policy)

    probes = [(c.id, p) for c in concepts for p in data["probes"][c.id]]
    retain = data["retain"][::args.retain_step]
    prompts = [p["prompt"] for _, p in probes]
    tokens = args.max_new_tokens
    runs = {"original": stamp.greedy_answers(original, tokenizer, prompts + retain, tokens)}
    runs["edited"] = stamp.greedy_answers(edited, tokenizer, prompts + retain, tokens)
    runs["edited_guarded"] = guarded_answers(guard, edited, tokenizer, prompts + retain, tokens)

    detectors = {c.id: AliasDetector({c.id: c.aliases}) for c in concepts}
    per_concept: dict[str, dict[str, float]] = {}
    for concept in concepts:
        rows = [i for i, (cid, _) in enumerate(probes) if cid == concept.id]
        per_concept[concept.id] = {
            f"{run}_term_leak": sum(leaked(answers[i], detectors[concept.id], probes[i][1].get("facts", []))
                                    for i in rows) / len(rows) for run, answers in runs.items()}
        per_concept[concept.id]["probes"] = len(rows)
    offset = len(probes)
    qa = checks["qa"]
    qa_answers = {name: stamp.greedy_answers(model, tokenizer, [q["question"] for q in qa], 24)
                  for name, model in (("original", original), ("edited", edited))}
    ppl = {name: perplexity(model, tokenizer, checks["benign_text"]) for name, model in
           (("original", original), ("edited", edited))}
    summary = {
        "concepts": per_concept,
        "retain_prompts": len(retain),
        "retain_identical": sum(runs["edited"][offset + j] == runs["original"][offset + j]
                                for j in range(len(retain))) / len(retain),
        "retain_identical_with_guard": sum(runs["edited_guarded"][offset + j] == runs["original"][offset + j]
                                           for j in range(len(retain))) / len(retain),
        "perplexity_original": ppl["original"], "perplexity_edited": ppl["edited"],
        "perplexity_change": ppl["edited"] / ppl["original"] - 1,
        "qa_accuracy": {name: sum(any(a.casefold() in text.casefold() for a in q["answers"])
                                  for q, text in zip(qa, answers)) / len(qa) for name, answers in qa_answers.items()},
        "edit_seconds": edit_seconds,
        "layers": [layer.layer for layer in result.layers],
    }
    table = Table(title=f"STAMP edit ({plan.method}, layers {summary['layers']}) on {args.model}, greedy {tokens} tokens")
    for column in ("concept", "probes", "term leak: original", "edited, no guard", "edited + guard"):
        table.add_column(column)
    for concept_id, stats in per_concept.items():
        table.add_row(concept_id, str(stats["probes"]), f"{stats['original_term_leak']:.0%}",
                      f"{stats['edited_term_leak']:.0%}", f"{stats['edited_guarded_term_leak']:.0%}")
    console.print(table)
    console.print(f"retain identical {summary['retain_identical']:.0%} (with guard "
                  f"{summary['retain_identical_with_guard']:.0%}); perplexity change {summary['perplexity_change']:+.2%};"
                  f" QA {summary['qa_accuracy']['original']:.0%} -> {summary['qa_accuracy']['edited']:.0%}; "
                  f"edit {edit_seconds:.1f} s")
    report = {"model": args.model, "policy": policy.version_tag, "method": plan.method, "max_new_tokens": tokens,
              "summary": summary, "edit": result.to_json(),
              "records": [{"prompt": prompt, **{run: answers[i] for run, answers in runs.items()}}
                          for i, prompt in enumerate(prompts + retain)]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
