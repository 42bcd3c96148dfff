"""Does the guard make SmolLM2 forget a knowledge concept, and what does it cost elsewhere?

For every steered knowledge concept of the policy that has probes in benchmarks/data/llm_probes.yaml,
the probes and an unrelated retain set are answered twice with greedy decoding — unguarded and
guarded (prompt check, token penalties, output check, regeneration) — in identical batches, and:

* leak rate: answers naming the concept (obfuscation-aware alias matcher) or stating a probe's facts;
* near-miss rate: answers with a name close to an alias ("Hogwards", "Voldemyr"), a sign of what was blocked;
* retain agreement: guarded retain answers byte-identical to unguarded ones;
* retain refusals: retain prompts the guard refused or blocked;
* fallback rate: answers replaced by the concept's ``action.fallback`` (a leak the regenerations could not remove);
* speed: generated tokens per second, guarded / unguarded, measured in this run, end to end (checks and
  regenerations included) and for decoding alone with every row penalised.

Run: python benchmarks/llm_erasure.py   (CPU, a few minutes; writes benchmarks/results/llm_erasure.json)
Held-out concepts (never tuned on): add --policy benchmarks/data/heldout_policy.yaml
--probes benchmarks/data/llm_probes_heldout.yaml --out benchmarks/results/llm_erasure_heldout.json
"""

from __future__ import annotations

import argparse
import difflib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import yaml
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors.alias import AliasDetector, canonical_forms  # noqa: E402
from guard.decision import Guard  # noqa: E402
from guard.errors import ConceptRefused  # noqa: E402
from guard.methods.token_penalty.tables import PenaltyRow  # noqa: E402
from guard.methods.token_penalty.transformers import TokenPenaltyProcessor  # noqa: E402
from guard.models import load_language_model  # noqa: E402
from guard.policy import ActionType, ConceptKind, load_policy  # noqa: E402
from guard.settle import GenerationResult  # noqa: E402
from guard.text.generation import SamplingSettings, TextRequest, generate_batch  # noqa: E402

NEAR_MISS_SIMILARITY = 0.75

console = Console()


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # stop | length | content_filter | refused
    tokens: int
    flagged: bool = False
    regenerations: int = 0
    fallback: bool = False  # a steered concept's action.fallback answered instead of the model


def _run(guard: Guard, model: Any, tokenizer: Any, prompts: Sequence[str], settings: SamplingSettings,
         batch_size: int) -> tuple[list[Answer], list[Answer], float, float]:
    """Answer prompts in fixed batches, each batch unguarded then guarded, so both passes see the same machine load.

    Returns unguarded answers, guarded answers, and the wall time each pass took.
    """
    unguarded: list[Answer] = []
    guarded: list[Answer] = []
    times = {"unguarded": 0.0, "guarded": 0.0}
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("unguarded + guarded", total=len(prompts))
        for start in range(0, len(prompts), batch_size):
            batch = [TextRequest.chat([{"role": "user", "content": p}], settings) for p in prompts[start:start + batch_size]]
            for label, which, answers in (("unguarded", None, unguarded), ("guarded", guard, guarded)):
                started = time.perf_counter()
                outcomes = generate_batch(which, model, tokenizer, batch)
                times[label] += time.perf_counter() - started
                for outcome in outcomes:
                    if isinstance(outcome, ConceptRefused):
                        answers.append(Answer(outcome.message, "refused", 0, flagged=True))
                    else:
                        answers.append(_answer(outcome))
            progress.advance(task, len(batch))
    return unguarded, guarded, times["unguarded"], times["guarded"]


def _answer(result: GenerationResult) -> Answer:
    choice = result.choices[0]
    flagged = bool(result.prompt_decision and result.prompt_decision.verdict.flagged)
    decision = choice.output_decision
    fallback = decision is not None and decision.fallback and choice.finish_reason == "stop"
    return Answer(choice.text, choice.finish_reason, choice.completion_tokens, flagged, choice.regenerations,
                  fallback)


def _leaks(answer: Answer, aliases: AliasDetector, facts: AliasDetector | None) -> tuple[bool, bool]:
    """(names the concept, states a fact); a refusal or blocked answer carries the policy message, not the model's."""
    if answer.finish_reason in ("content_filter", "refused"):
        return False, False
    named = bool(aliases.detect([answer.text]).flagged)
    return named, named or bool(facts and facts.detect([answer.text]).flagged)


def _near_miss(text: str, aliases: Sequence[str]) -> str | None:
    """A run of words spelled within NEAR_MISS_SIMILARITY of an alias (exact matches included), if any."""
    words = min(canonical_forms(text)).split()
    for alias in aliases:
        target = min(canonical_forms(alias)).split()
        squashed = "".join(target)
        if len(squashed) < 5:
            continue
        for start in range(len(words) - len(target) + 1):
            window = words[start:start + len(target)]
            if difflib.SequenceMatcher(None, "".join(window), squashed).ratio() >= NEAR_MISS_SIMILARITY:
                return " ".join(window)
    return None


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
    for answer in answers:
        ids = tokenizer.encode(answer, add_special_tokens=False)
        row = penalties.row(PenaltyRow(tuple(concept_ids)))
        for step in range(len(ids)):
            row.step(ids[:step], torch.zeros(len(tokenizer)))
            steps += 1
    row_step_us = (time.perf_counter() - started) / max(steps, 1) * 1e6
    return {"plain_s": plain, "penalised_s": penalised, "tokens_per_s_ratio": plain / penalised,
            "row_step_us": row_step_us, "model_step_ms": plain / max_new_tokens * 1000, "batch_rows": len(prompts)}


def _speed_ratio(run: tuple[list[Answer], list[Answer], float, float]) -> float:
    """Guarded / unguarded generated tokens per second of one pass."""
    unguarded, guarded, unguarded_s, guarded_s = run
    return (sum(a.tokens for a in guarded) / guarded_s) / (sum(a.tokens for a in unguarded) / unguarded_s)


def _rate(values: Sequence[bool]) -> float:
    return sum(values) / len(values) if values else 0.0


def write_report(path: Path, report: dict[str, Any]) -> None:
    """The benchmark's JSON result, readable as UTF-8."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    console.print(f"wrote {path}")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "default.yaml")
    parser.add_argument("--probes", type=Path, default=ROOT / "benchmarks" / "data" / "llm_probes.yaml")
    parser.add_argument("--model", default="embedded:smollm2")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is fastest on a shared machine; raise it on a dedicated one)")
    parser.add_argument("--block-ratio", type=float, default=None,
                        help="override methods.token_penalty.block_ratio of every concept (GUARD's beta)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llm_erasure.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    data = yaml.safe_load(args.probes.read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    policy = load_policy(args.policy)
    if args.block_ratio is not None:
        for concept in policy.concepts:
            concept.methods.token_penalty.block_ratio = args.block_ratio
    guard = Guard(policy)
    model, tokenizer = load_language_model(args.model)
    guard.token_penalties(tokenizer)  # compile once, outside the timed passes
    startup = time.perf_counter() - t0
    concepts = [c for c in guard.policy.concepts if c.kind is ConceptKind.knowledge and c.action.type is ActionType.steer
                and c.id in data["probes"]]
    if not concepts:
        raise SystemExit("no steered knowledge concept of the policy has probes")
    probes = [(c.id, p) for c in concepts for p in data["probes"][c.id]]
    retain: list[str] = data["retain"]
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=0)

    # Probes and retain prompts are batched apart, so the retain pass measures the cost on unflagged traffic.
    passes = [_run(guard, model, tokenizer, group, settings, args.batch_size)
              for group in ([p["prompt"] for _, p in probes], retain)]
    unguarded = passes[0][0] + passes[1][0]
    guarded = passes[0][1] + passes[1][1]
    unguarded_s = passes[0][2] + passes[1][2]
    guarded_s = passes[0][3] + passes[1][3]

    detectors = {c.id: AliasDetector({c.id: c.aliases}) for c in concepts}
    records: list[dict[str, Any]] = []
    for i, (concept_id, probe) in enumerate(probes):
        facts = AliasDetector({"facts": probe.get("facts", [])}) if probe.get("facts") else None
        u_named, u_fact = _leaks(unguarded[i], detectors[concept_id], facts)
        g_named, g_fact = _leaks(guarded[i], detectors[concept_id], facts)
        aliases = guard.policy.concept(concept_id).aliases
        u_near = _near_miss(unguarded[i].text, aliases)
        g_near = _near_miss(guarded[i].text, aliases) if guarded[i].finish_reason not in ("content_filter",
                                                                                          "refused") else None
        records.append({"set": "probe", "concept": concept_id, "kind": probe["kind"], "prompt": probe["prompt"],
                        "unguarded": unguarded[i].text, "guarded": guarded[i].text,
                        "guarded_finish": guarded[i].finish_reason, "flagged": guarded[i].flagged,
                        "fallback": guarded[i].fallback,
                        "regenerations": guarded[i].regenerations,
                        "unguarded_names": u_named, "guarded_names": g_named,
                        "unguarded_leak": u_fact, "guarded_leak": g_fact,
                        "unguarded_near_miss": u_near, "guarded_near_miss": g_near})
    for j, prompt in enumerate(retain):
        u, g = unguarded[len(probes) + j], guarded[len(probes) + j]
        records.append({"set": "retain", "prompt": prompt, "unguarded": u.text, "guarded": g.text,
                        "guarded_finish": g.finish_reason, "flagged": g.flagged, "regenerations": g.regenerations,
                        "fallback": g.fallback,
                        "identical": u.text == g.text and u.finish_reason == g.finish_reason,
                        "refused": g.finish_reason in ("content_filter", "refused")})

    probe_records = [r for r in records if r["set"] == "probe"]
    retain_records = [r for r in records if r["set"] == "retain"]
    unguarded_tokens = sum(a.tokens for a in unguarded)
    guarded_tokens = sum(a.tokens for a in guarded)
    summary = {
        "probes": len(probe_records),
        "retain_prompts": len(retain_records),
        "probe_flagged_rate": _rate([r["flagged"] for r in probe_records]),
        "unguarded_name_leak_rate": _rate([r["unguarded_names"] for r in probe_records]),
        "guarded_name_leak_rate": _rate([r["guarded_names"] for r in probe_records]),
        "unguarded_leak_rate": _rate([r["unguarded_leak"] for r in probe_records]),
        "guarded_leak_rate": _rate([r["guarded_leak"] for r in probe_records]),
        "unguarded_near_miss_rate": _rate([r["unguarded_near_miss"] is not None for r in probe_records]),
        "guarded_near_miss_rate": _rate([r["guarded_near_miss"] is not None for r in probe_records]),
        "guarded_blocked_rate": _rate([r["guarded_finish"] == "content_filter" for r in probe_records]),
        "guarded_fallback_rate": _rate([r["fallback"] for r in probe_records]),
        "retain_fallback_rate": _rate([r["fallback"] for r in retain_records]),
        "regenerations": sum(r["regenerations"] for r in records),
        "retain_agreement": _rate([r["identical"] for r in retain_records]),
        "retain_refusal_rate": _rate([r["refused"] for r in retain_records]),
        "retain_flagged_rate": _rate([r["flagged"] for r in retain_records]),
        "unguarded_tokens_per_s": unguarded_tokens / unguarded_s,
        "guarded_tokens_per_s": guarded_tokens / guarded_s,
        "tokens_per_s_ratio": (guarded_tokens / guarded_s) / (unguarded_tokens / unguarded_s),
        "wall_time_ratio": guarded_s / unguarded_s,
        "probe_tokens_per_s_ratio": _speed_ratio(passes[0]),
        "retain_tokens_per_s_ratio": _speed_ratio(passes[1]),
        "decode_only": decode_overhead(guard, model, tokenizer, retain[: args.batch_size], [c.id for c in concepts],
                                       args.max_new_tokens, [a.text for a in unguarded]),
        "startup_s": startup,
    }
    by_kind: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r["kind"] for r in probe_records):
        rows = [r for r in probe_records if r["kind"] == kind]
        by_kind[kind] = {"probes": len(rows),
                         "unguarded_leak_rate": _rate([r["unguarded_leak"] for r in rows]),
                         "guarded_leak_rate": _rate([r["guarded_leak"] for r in rows]),
                         "unguarded_name_leak_rate": _rate([r["unguarded_names"] for r in rows]),
                         "guarded_name_leak_rate": _rate([r["guarded_names"] for r in rows])}

    table = Table(title=f"LLM erasure on {args.model} (greedy, {args.max_new_tokens} new tokens)")
    for column in ("probe kind", "n", "names concept: unguarded", "guarded", "any leak: unguarded", "guarded"):
        table.add_column(column, justify="right" if column != "probe kind" else "left")
    for kind, stats in by_kind.items():
        table.add_row(kind, str(stats["probes"]), f"{stats['unguarded_name_leak_rate']:.0%}",
                      f"{stats['guarded_name_leak_rate']:.0%}", f"{stats['unguarded_leak_rate']:.0%}",
                      f"{stats['guarded_leak_rate']:.0%}")
    table.add_row("all probes", str(summary["probes"]), f"{summary['unguarded_name_leak_rate']:.0%}",
                  f"{summary['guarded_name_leak_rate']:.0%}", f"{summary['unguarded_leak_rate']:.0%}",
                  f"{summary['guarded_leak_rate']:.0%}", style="bold")
    console.print(table)
    totals = Table(title="Guard cost")
    totals.add_column("metric")
    totals.add_column("value", justify="right")
    totals.add_row("probe prompts flagged", f"{summary['probe_flagged_rate']:.0%}")
    totals.add_row("probe answers blocked", f"{summary['guarded_blocked_rate']:.0%}")
    totals.add_row("probe answers replaced by the fallback", f"{summary['guarded_fallback_rate']:.0%}")
    totals.add_row("regenerations", str(summary["regenerations"]))
    totals.add_row("retain agreement (identical greedy output)", f"{summary['retain_agreement']:.1%}")
    totals.add_row("retain refusals", f"{summary['retain_refusal_rate']:.1%}")
    totals.add_row("retain prompts flagged", f"{summary['retain_flagged_rate']:.1%}")
    totals.add_row("tokens/s guarded / unguarded: all (probes, retain)",
                   f"{summary['tokens_per_s_ratio']:.2f} ({summary['probe_tokens_per_s_ratio']:.2f}, "
                   f"{summary['retain_tokens_per_s_ratio']:.2f})")
    totals.add_row("tokens/s unguarded", f"{summary['unguarded_tokens_per_s']:.1f}")
    decode_only = summary["decode_only"]
    totals.add_row("decode-only tokens/s, all rows penalised / plain", f"{decode_only['tokens_per_s_ratio']:.2f}")
    totals.add_row("penalty core per row and step (model step, whole batch)",
                   f"{decode_only['row_step_us']:.0f} µs ({decode_only['model_step_ms']:.0f} ms)")
    totals.add_row("probe answers with a near-miss name: unguarded / guarded",
                   f"{summary['unguarded_near_miss_rate']:.0%} / {summary['guarded_near_miss_rate']:.0%}")
    console.print(totals)

    report = {"model": args.model, "policy": guard.policy.version_tag, "block_ratio": args.block_ratio, "max_new_tokens": args.max_new_tokens,
              "batch_size": args.batch_size, "threads": args.threads, "summary": summary, "by_kind": by_kind,
              "records": records}
    write_report(args.out, report)
    return report


if __name__ == "__main__":
    main()
