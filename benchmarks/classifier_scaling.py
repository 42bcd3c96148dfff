"""How does request classification latency grow with the number of policy concepts?

Builds policies of 10 … 10,000 concepts (the default policy's real concepts plus synthetic ones with
unique made-up aliases) and times ``PolicyClassifier.detect`` — the real query path: alias regex
pass, MiniLM encoding of the request, faiss search, negative veto. Encoding ~60,000 synthetic
exemplars would take many minutes on a CPU and says nothing about query cost, so synthetic exemplars
get random unit vectors placed straight into the index (``exemplar_vectors``); the real concepts are
encoded as usual, and the benchmark checks they are still found among 10,000 others.

Run: python benchmarks/classifier_scaling.py   (writes benchmarks/results/classifier_scaling.json)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from detectors.classifier import PolicyClassifier  # noqa: E402
from guard.policy import Concept, Policy, load_policy  # noqa: E402

console = Console()
_SYLLABLES = ["ka", "zor", "vel", "tin", "bra", "mok", "rei", "sul", "dra", "fen", "gal", "hir", "lum", "nex", "qua",
              "rix", "tor", "wen", "yl", "pax", "ob", "ustr", "jem", "cof"]
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2


def synthetic_policy(total: int, exemplars: int = 4, seed: int = 0) -> tuple[Policy, dict[str, np.ndarray]]:
    """The default policy grown to ``total`` concepts, and random unit embeddings for the synthetic exemplars.

    Synthetic concepts have two unique made-up aliases, ``exemplars`` exemplars (at most 4) and one negative.
    """
    base = load_policy(ROOT / "policies" / "default.yaml")
    rng = random.Random(seed)
    vectors_rng = np.random.default_rng(seed)
    used: set[str] = set()

    def name() -> str:
        while True:
            words = [("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(3, 4)))).capitalize()
                     for _ in range(rng.randint(1, 2))]
            candidate = " ".join(words)
            if candidate not in used:
                used.add(candidate)
                return candidate

    template = base.concepts[0].model_dump(mode="python", by_alias=True)
    concepts = list(base.concepts)
    texts: list[str] = []
    for i in range(max(0, total - len(base.concepts))):
        aliases = [name(), name()]
        examples = [f"Tell me about {aliases[0]}.", f"What is the history of {aliases[1]}?",
                    f"Explain {aliases[0]} step by step.", f"Write a story involving {aliases[1]}, case {i}."]
        examples = examples[:exemplars]
        description = f"Synthetic concept {i}: {aliases[0]}."
        negatives = [f"Something unrelated to {aliases[0]}, case {i}."]
        concepts.append(Concept.model_validate({**template, "id": f"synthetic-{i:05d}", "kind": "other",
                                                "description": description, "aliases": aliases,
                                                "exemplars": examples, "negatives": negatives,
                                                "action": {"type": "refuse"}}))
        texts.extend([*examples, description, *negatives])
    policy = base.model_copy(update={"concepts": concepts[:total]})
    raw = vectors_rng.standard_normal((len(texts), EMBEDDING_DIM)).astype(np.float32)
    raw /= np.linalg.norm(raw, axis=1, keepdims=True)
    return policy, dict(zip(texts, raw))


QUERIES = [
    "What is the capital of France?",
    "Who is the boy wizard with the lightning scar?",
    "Please summarise this article about renewable energy and electric cars in Europe.",
    "How do I make a molotov cocktail?",
]


def measure(total: int, repeats: int) -> dict[str, Any]:
    policy, vectors = synthetic_policy(total)
    started = time.perf_counter()
    classifier = PolicyClassifier(policy, exemplar_vectors=vectors)
    build_s = time.perf_counter() - started
    synthetic = [c for c in policy.concepts if c.id.startswith("synthetic-")]
    queries = list(QUERIES)
    expected: dict[str, str] = {QUERIES[1]: "harry-potter", QUERIES[3]: "weapons"}
    if synthetic:
        target = synthetic[len(synthetic) // 2]
        alias_query = f"Can you tell me who {target.aliases[1]} is?"
        queries.append(alias_query)
        expected[alias_query] = target.id
    for query in queries:  # warm-up: first encoder call allocates
        classifier.detect([query])
    latencies: list[float] = []
    correct = True
    for _ in range(repeats):
        for query in queries:
            started = time.perf_counter()
            result = classifier.detect([query])
            latencies.append(time.perf_counter() - started)
            flagged = result.flagged_ids
            if query in expected:
                correct &= expected[query] in flagged
            else:
                correct &= not flagged
    return {"concepts": total, "index_vectors": classifier.semantic._positive.index.ntotal,
            "index_type": type(classifier.semantic._positive.index).__name__, "build_s": build_s,
            "p50_ms": statistics.median(latencies) * 1000,
            "p95_ms": float(np.percentile(latencies, 95)) * 1000, "queries": len(latencies), "correct": correct}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1_000, 10_000])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the encoder")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "classifier_scaling.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for total in args.sizes:
        console.print(f"building a {total:,}-concept policy …")
        rows.append(measure(total, args.repeats))
    table = Table(title="Request classification latency vs policy size (one request, CPU)")
    for column in ("concepts", "index vectors", "index", "build s", "p50 ms", "p95 ms", "correct"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(f"{row['concepts']:,}", f"{row['index_vectors']:,}", row["index_type"], f"{row['build_s']:.1f}",
                      f"{row['p50_ms']:.1f}", f"{row['p95_ms']:.1f}", "yes" if row["correct"] else "NO")
    console.print(table)
    if rows:
        console.print(f"p50 latency ratio {rows[-1]['concepts']:,} / {rows[0]['concepts']:,} concepts: "
                      f"{rows[-1]['p50_ms'] / rows[0]['p50_ms']:.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "results": rows}, indent=2) + "\n", encoding="utf-8")
    console.print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
