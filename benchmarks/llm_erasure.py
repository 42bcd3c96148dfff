"""Does the guard make SmolLM2 forget knowledge concepts, and what does it cost elsewhere? (RWKU/MUSE-shaped)

Four splits, each a policy and a probe file under benchmarks/data/knowledge/:

* ``tuned``: harry-potter (franchise), microsoft (organisation), mount-everest (place), iphone (product),
  lock-picking (technique) — the project may be tuned on these;
* ``heldout``: star-wars (franchise), elon-musk (person) — probes and policy written first, never tuned on (but
  its failures have been read, so it is no longer blind);
* ``blind``: pokemon (franchise), albert-einstein (person) — written on 2026-12-04 after the held-out split had been
  read, run once before a change made for its failures, never tuned on;
* ``blind2``: sherlock-holmes (character), titanic (event) — written after that change, before anything ran on it.

Each concept has 30 probes of RWKU's kinds (fill-in-blank, qa, paraphrase, other-language, misspelling, role-play,
step-by-step, prefix-injection, in-context) and 5 neighbours (related but allowed); all splits share 201 retain
prompts. Every prompt is answered unguarded and guarded (greedy) in identical batches, scored by
:mod:`guard.text.evaluation` (term leak, near-miss leak, fact leak, fallback rate, neighbours answered, retain
identical, tokens/s ratio), plus the decode-only cost of the penalties. Before a run, draw the policies' profiles:
``guard policy expand benchmarks/data/knowledge/tuned_policy.yaml --model embedded:smollm2`` (and the others, with
their ``--concept`` ids).

Run: python benchmarks/llm_erasure.py --split heldout   (CPU; writes benchmarks/results/llm_erasure_heldout.json)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from guard.decision import Guard  # noqa: E402
from guard.methods.token_penalty.tables import PenaltyRow  # noqa: E402
from guard.methods.token_penalty.transformers import TokenPenaltyProcessor  # noqa: E402
from guard.models import load_language_model  # noqa: E402
from guard.policy import load_policy  # noqa: E402
from guard.text.evaluation import evaluate, load_probes, write_html  # noqa: E402
from guard.text.generation import SamplingSettings  # noqa: E402

DATA = ROOT / "benchmarks" / "data" / "knowledge"
SPLITS = {"tuned": (DATA / "tuned_policy.yaml", DATA / "probes_tuned.yaml"),
          "heldout": (DATA / "heldout_policy.yaml", DATA / "probes_heldout.yaml"),
          "blind": (DATA / "blind_policy.yaml", DATA / "probes_blind.yaml"),
          "blind2": (DATA / "blind2_policy.yaml", DATA / "probes_blind2.yaml")}

console = Console()


def decode_overhead(guard: Guard, model: Any, tokenizer: Any, prompts: Sequence[str], concept_ids: list[str],
                    max_new_tokens: int, answers: Sequence[str]) -> dict[str, float]:
    """The per-step cost of the penalties alone, two ways.

    * the same batch decoded plain and with every row penalised (no checks), alternating twice and keeping
      each one's fastest run, which is robust to other load on a shared machine;
    * the per-row core by itself, stepped over real answers' tokens with vocabulary-sized logits.
    """
    penalties = guard.token_penalties(tokenizer)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    encoded = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    width = max(map(len, encoded))
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded])
    attention_mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
    runs: dict[str, list[float]] = {"plain": [], "penalised": []}
    for label in ("plain", "penalised", "plain", "penalised"):
        processors = [TokenPenaltyProcessor(penalties, [PenaltyRow(tuple(concept_ids))] * len(prompts))] if label == "penalised" \
            else []
        started = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                           min_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                           logits_processor=processors)
        runs[label].append(time.perf_counter() - started)
    plain, penalised = min(runs["plain"]), min(runs["penalised"])

    steps = 0
    started = time.perf_counter()
    terms = guard.check_prompt([prompts[0]]).terms  # a request's forget-store terms as well, if it has any
    for answer in answers:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        row = penalties.row(PenaltyRow(tuple(concept_ids), terms=terms))
        for step in range(len(ids)):
            row.step(ids[:step], torch.zeros(len(tokenizer)))
            steps += 1
    row_step_us = (time.perf_counter() - started) / max(steps, 1) * 1e6
    return {"plain_s": plain, "penalised_s": penalised, "tokens_per_s_ratio": plain / penalised,
            "row_step_us": row_step_us, "model_step_ms": plain / max_new_tokens * 1000, "batch_rows": len(prompts)}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--split", choices=sorted(SPLITS), default="heldout")
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--retain", type=int, default=None, help="use only the first N retain prompts")
    parser.add_argument("--per-concept", type=int, default=None,
                        help="use only N probes per concept, spread over the file's order (so over the kinds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine; raise it on a dedicated one)")
    parser.add_argument("--policy", type=Path, default=None,
                        help="guard with this policy instead of the split's (the split's probes still judge it)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    policy_path, probes_path = SPLITS[args.split]
    policy_path = args.policy or policy_path
    out = args.out or ROOT / "benchmarks" / "results" / f"llm_erasure_{args.split}.json"

    probes = load_probes(probes_path)
    if args.retain is not None or args.per_concept is not None:
        chosen = probes.probes
        if args.per_concept is not None:
            chosen = []
            for concept in probes.terms:
                mine = [p for p in probes.probes if p.concept == concept]
                chosen += [mine[i * len(mine) // args.per_concept] for i in range(min(args.per_concept, len(mine)))]
        probes = replace(probes, probes=chosen, retain=probes.retain[: args.retain])
    t0 = time.perf_counter()
    guard = Guard(load_policy(policy_path))
    model, tokenizer = load_language_model(args.model)
    guard.token_penalties(tokenizer)  # compile once, outside the timed passes
    startup = time.perf_counter() - t0
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0)
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("unguarded + guarded", total=1)
        result = evaluate(guard, model, tokenizer, probes, settings, args.batch_size,
                          on_step=lambda done, total: progress.update(task, completed=done, total=total))
    summary = result.summary
    retain = [r["prompt"] for r in result.records if r["set"] == "retain"]
    summary["decode_only"] = decode_overhead(guard, model, tokenizer, retain[: args.batch_size], list(probes.terms),
                                             args.max_new_tokens,
                                             [r["unguarded"] for r in result.records if r["set"] == "probe"][:40])
    summary["startup_s"] = startup

    table = Table(title=f"{args.split} concepts on {args.model} (greedy, {args.max_new_tokens} new tokens)")
    columns = ("probes", "term leak: unguarded", "guarded", "near miss: unguarded", "guarded", "fact leak: unguarded",
               "guarded", "fallback")
    table.add_column("concept / probe kind")
    for column in columns:
        table.add_column(column, justify="right")

    def row(name: str, stats: dict[str, Any], **style: str) -> None:
        table.add_row(name, str(stats["probes"]), *(f"{stats[k]:.0%}" for k in (
            "unguarded_term_leak", "term_leak", "unguarded_near_miss_leak", "near_miss_leak", "unguarded_fact_leak",
            "fact_leak", "fallback_rate")), **style)

    for concept, stats in result.by_concept.items():
        row(f"{concept} ({stats['kind']})", stats)
    for kind, stats in result.by_kind.items():
        row(f"  {kind}", stats)
    row("all probes", summary, style="bold")
    console.print(table)
    totals = Table(title="Guard cost")
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    totals.add_row("probe prompts flagged", f"{summary['flagged_rate']:.0%}")
    totals.add_row("neighbours answered (flagged)", f"{summary['neighbours_answered']:.0%} "
                                                    f"({summary['neighbours_flagged']:.0%})")
    totals.add_row("retain identical (withheld, flagged)", f"{summary['retain_identical']:.1%} "
                   f"({summary['retain_withheld']:.1%}, {summary['retain_flagged']:.1%})")
    totals.add_row("regenerations", str(summary["regenerations"]))
    totals.add_row("tokens/s guarded / unguarded: all (probes, retain)",
                   f"{summary['tokens_per_s_ratio']:.2f} ({summary['probe_tokens_per_s_ratio']:.2f}, "
                   f"{summary['retain_tokens_per_s_ratio']:.2f})")
    decode_only = summary["decode_only"]
    totals.add_row("decode-only tokens/s, all rows penalised / plain", f"{decode_only['tokens_per_s_ratio']:.2f}")
    totals.add_row("penalty core per row and step (model step, whole batch)",
                   f"{decode_only['row_step_us']:.0f} µs ({decode_only['model_step_ms']:.0f} ms)")
    console.print(totals)

    report = {"split": args.split, "model": args.model, "policy": guard.policy.version_tag,
              "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size, "threads": args.threads,
              "summary": summary, "by_concept": result.by_concept, "by_kind": result.by_kind,
              "records": result.records}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    write_html(result, out.with_suffix(".html"), f"LLM erasure, {args.split} concepts")
    console.print(f"wrote {out} and {out.with_suffix('.html')}")
    return report


if __name__ == "__main__":
    main()
