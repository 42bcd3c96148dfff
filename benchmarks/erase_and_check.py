"""erase-and-check benchmark: the paper's tables for the shipped harmful-request classifier, on CPU.

    python benchmarks/erase_and_check.py            # ~100 s on 2 idle CPU cores (far longer on a busy machine)
    python benchmarks/erase_and_check.py --quick    # 10-prompt subsample, fewer settings: ~20 s

Evaluation prompts are the ones the head never saw: the seeded 20% held-out split recorded in
guard/data/harmful_head.npz (80 harmful, 79 safe prompts). Subsamples, stated in the output: the insertion
and infusion table and the suffix-attack table use the first 40 prompts, the insertion-attack table the first
20. Every certification embeds its own erased versions (the embedding cache is disabled), so the times are
what a fresh prompt costs. Reported:

1. Certified accuracy on harmful prompts = the classifier's accuracy on the clean held-out harmful prompts: by
   the certificate, erase-and-check flags each of those under every attack of at most d tokens.
2. Accuracy on safe prompts (labelled safe) and time per prompt vs d, suffix mode d = 0..20 (d = 0 is the
   undefended classifier; times are also given as a ratio to it, measured in the same run); insertion (k = 1,
   d = 4, 8) and infusion (d = 1, 2) modes on the subsample, as their cost grows as n·d and C(n, d).
3. Empirical attacks. No GCG suffixes ship with the data, so the attack is black-box and adaptive: for each
   subsampled harmful prompt and length L it appends (or inserts at a random word boundary) the L-token
   benign fragment, out of 24 candidates cut from safe training prompts, that lowers the classifier's logit
   most. Detection rates for the undefended classifier, exact erase-and-check, RandEC and GreedyEC are
   reported; exact erase-and-check must stay at or above the certified accuracy for L <= d (asserted).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from detectors.encoder import CachedEncoder  # noqa: E402
from detectors.harmful import SAFE_PROMPTS, HarmfulHead, HarmfulRequestClassifier, read_prompts  # noqa: E402
from guard.certification import Certificate, EraseAndCheck, TokenizedPrompt, backend_tokenizer  # noqa: E402
from guard.models import load_sentence_encoder  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "erase_and_check.json"
ATTACK_CANDIDATES = 24
console = Console(width=130)


class Bench:
    def __init__(self, seed: int):
        self.head = HarmfulHead.load()
        self.harmful, self.safe = self.head.held_out()
        self.encoder = CachedEncoder(load_sentence_encoder(self.head.encoder), capacity=0)
        self.classifier = HarmfulRequestClassifier(self.head, self.encoder)
        self.tokenizer = backend_tokenizer(self.encoder)
        self.rng = np.random.default_rng(seed)
        self.seed = seed
        self.classifier.detect_each(self.safe[:8])  # warm up the encoder before timing anything

    def checker(self, **settings: Any) -> EraseAndCheck:
        return EraseAndCheck(self.classifier, self.tokenizer, seed=self.seed, **settings)

    def run(self, prompts: Sequence[str], label: str,
            settings: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
        """Flag rate, mean ms and mean versions checked per prompt for each named setting.

        Settings take turns on each prompt, so load from other processes on the machine slows all of them alike
        and the time ratios stay meaningful.
        """
        checkers = {name: self.checker(**kwargs) for name, kwargs in settings.items()}
        certificates: dict[str, list[Certificate]] = {name: [] for name in settings}
        for prompt in tqdm(prompts, desc=label, leave=False, file=sys.stderr):
            for name, checker in checkers.items():
                certificates[name].append(checker.certify(prompt))
        return {name: {"flagged": float(np.mean([c.flagged for c in certs])),
                       "ms": 1000 * float(np.mean([c.elapsed_s for c in certs])),
                       "checked": float(np.mean([c.subsequences_checked for c in certs]))}
                for name, certs in certificates.items()}

    # -- attacks ------------------------------------------------------------------------------------------

    def fragments(self, length: int) -> list[str]:
        """Benign L-token fragments (prefixes of safe *training* prompts) whose re-tokenised length is exactly L."""
        held = set(self.safe)
        pool = [p for p in read_prompts(SAFE_PROMPTS) if p not in held]
        out: list[str] = []
        for index in self.rng.permutation(len(pool)):
            tokens = TokenizedPrompt(pool[index], self.tokenizer)
            if len(tokens) <= length:
                continue
            fragment = tokens.render(range(length))
            if len(TokenizedPrompt(fragment, self.tokenizer)) == length:
                out.append(fragment)
            if len(out) == ATTACK_CANDIDATES:
                break
        return out

    def attack(self, prompts: Sequence[str], length: int, where: str) -> list[str]:
        """Per prompt, the candidate attack (`length` benign tokens appended or inserted) with the lowest logit."""
        if length == 0:
            return list(prompts)
        fragments = self.fragments(length)
        attacked = []
        for prompt in tqdm(prompts, desc=f"attack {where} L={length}", leave=False, file=sys.stderr):
            if where == "suffix":
                candidates = [f"{prompt} {fragment}" for fragment in fragments]
            else:
                words = prompt.split(" ")
                cut = int(self.rng.integers(1, len(words)))
                candidates = [" ".join([*words[:cut], fragment, *words[cut:]]) for fragment in fragments]
            attacked.append(candidates[int(np.argmin(self.classifier.logits(candidates)))])
        return attacked


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Fewer prompts and settings (a smoke run).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    started = time.perf_counter()
    bench = Bench(args.seed)
    subsample = 10 if args.quick else 40
    harmful = bench.harmful
    safe = bench.safe[:subsample] if args.quick else bench.safe
    few_safe, few_harmful = bench.safe[:subsample], bench.harmful[:subsample]
    suffix_ds = [0, 4, 10, 20] if args.quick else list(range(0, 21, 2))
    insertion_ds = [4] if args.quick else [4, 8]
    infusion_ds = [1] if args.quick else [1, 2]
    attack_lengths = [0, 8, 20] if args.quick else [0, 4, 8, 12, 20]

    results: dict[str, Any] = {
        "setup": {"filter": "harmful_classifier (logistic regression on MiniLM embeddings)",
                  "tokens": "MiniLM WordPiece tokens", "safe_prompts": len(safe), "harmful_prompts": len(harmful),
                  "subsample": subsample, "seed": args.seed, "quick": args.quick,
                  "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "torch_threads": torch.get_num_threads()}}
    undefended = {"max_erase": 0}
    clean = bench.run(harmful, "clean harmful", {"clean": undefended})["clean"]
    results["certified_accuracy"] = clean["flagged"]

    suffix = bench.run(safe, "safe, suffix mode", {str(d): {"mode": "suffix", "max_erase": d} for d in suffix_ds})
    results["suffix"] = [{"d": d, "safe_accuracy": 1 - suffix[str(d)]["flagged"],
                          "ms_per_prompt": suffix[str(d)]["ms"],
                          "time_ratio": suffix[str(d)]["ms"] / suffix["0"]["ms"],
                          "versions": suffix[str(d)]["checked"]} for d in suffix_ds]
    settings = {"undefended": undefended,
                **{f"insertion {d}": {"mode": "insertion", "max_erase": d} for d in insertion_ds},
                **{f"infusion {d}": {"mode": "infusion", "max_erase": d} for d in infusion_ds}}
    other = bench.run(few_safe, "safe, insertion and infusion", settings)
    for mode, ds in (("insertion", insertion_ds), ("infusion", infusion_ds)):
        results[mode] = [{"d": d, "safe_accuracy": 1 - other[f"{mode} {d}"]["flagged"],
                          "ms_per_prompt": other[f"{mode} {d}"]["ms"],
                          "time_ratio": other[f"{mode} {d}"]["ms"] / other["undefended"]["ms"],
                          "versions": other[f"{mode} {d}"]["checked"]} for d in ds]

    clean_few = bench.run(few_harmful, "clean harmful (subsample)", {"clean": undefended})["clean"]["flagged"]
    assert clean_few == 1.0, "the attack tables assume every subsampled harmful prompt is flagged when clean"
    defenses = {"undefended classifier": undefended,
                "erase-and-check suffix d=20 (certified)": {"mode": "suffix", "max_erase": 20},
                "RandEC suffix d=20, 20%": {"mode": "suffix", "max_erase": 20, "variant": "randomized",
                                            "sample_fraction": 0.2},
                "RandEC suffix d=20, 30%": {"mode": "suffix", "max_erase": 20, "variant": "randomized",
                                            "sample_fraction": 0.3},
                "GreedyEC 12 rounds": {"max_erase": 12, "variant": "greedy"}}
    insertion_defenses = {"undefended classifier": undefended,
                          "erase-and-check insertion d=8 (certified)": {"mode": "insertion", "max_erase": 8},
                          "RandEC insertion d=8, 20%": {"mode": "insertion", "max_erase": 8, "variant": "randomized",
                                                        "sample_fraction": 0.2},
                          "GreedyEC 8 rounds": {"max_erase": 8, "variant": "greedy"}}
    attacks: dict[str, Any] = {"suffix": {}, "insertion": {}}
    for where, names, certified_name, lengths in (
            ("suffix", defenses, "erase-and-check suffix d=20 (certified)", attack_lengths),
            ("insertion", insertion_defenses, "erase-and-check insertion d=8 (certified)",
             [length for length in attack_lengths if length <= 8])):
        for length in lengths:
            # Insertion mode checks ~n·d versions per prompt: half the subsample keeps the run to a few minutes.
            targets = few_harmful if where == "suffix" else few_harmful[:max(subsample // 2, 1)]
            results["setup"][f"{where}_attack_prompts"] = len(targets)
            attacked = bench.attack(targets, length, where)
            attacks[where][str(length)] = bench.run(attacked, f"{where} attack L={length}", names)
            certified = attacks[where][str(length)][certified_name]["flagged"]
            assert certified >= clean_few, f"certificate violated ({where}, L={length}): {certified} < {clean_few}"
    results["attacks"] = attacks
    safe_runs = bench.run(few_safe, "safe prompts, all defenses", defenses)
    results["false_positives_on_safe"] = {name: safe_runs[name]["flagged"] for name in defenses}
    results["seconds"] = time.perf_counter() - started

    report(results, defenses, insertion_defenses)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out} in {results['seconds']:.0f} s")


def report(results: dict[str, Any], defenses: dict[str, Any], insertion_defenses: dict[str, Any]) -> None:
    setup = results["setup"]
    console.print(f"Certified accuracy on {setup['harmful_prompts']} held-out harmful prompts: "
                  f"[bold]{pct(results['certified_accuracy'])}%[/] (any attack of ≤ d tokens, every mode)")
    table = Table(title=f"Safe prompts labelled safe, suffix mode ({setup['safe_prompts']} held-out prompts)")
    for column in ("d", "safe accuracy %", "ms / prompt", "× undefended", "versions / prompt"):
        table.add_column(column, justify="right")
    for row in results["suffix"]:
        table.add_row(str(row["d"]), pct(row["safe_accuracy"]), f"{row['ms_per_prompt']:.1f}",
                      f"{row['time_ratio']:.2f}", f"{row['versions']:.1f}")
    console.print(table)
    table = Table(title=f"Insertion (k=1) and infusion modes ({setup['subsample']} safe prompts)")
    for column in ("mode", "d", "safe accuracy %", "ms / prompt", "× undefended", "versions / prompt"):
        table.add_column(column, justify="right")
    for mode in ("insertion", "infusion"):
        for row in results[mode]:
            table.add_row(mode, str(row["d"]), pct(row["safe_accuracy"]), f"{row['ms_per_prompt']:.1f}",
                          f"{row['time_ratio']:.2f}", f"{row['versions']:.1f}")
    console.print(table)
    for where, names in (("suffix", defenses), ("insertion", insertion_defenses)):
        lengths = list(results["attacks"][where])
        count = setup[f"{where}_attack_prompts"]
        table = Table(title=f"{count} harmful prompts: detected (%) under the adaptive benign-{where} attack "
                            "of L tokens")
        table.add_column("defense")
        for length in lengths:
            table.add_column(f"L={length}", justify="right")
        table.add_column("mean ms", justify="right")
        if where == "suffix":
            table.add_column(f"safe flagged % ({setup['subsample']})", justify="right")
        for name in names:
            cells = [pct(results["attacks"][where][length][name]["flagged"]) for length in lengths]
            ms = np.mean([results["attacks"][where][length][name]["ms"] for length in lengths])
            extra = [pct(results["false_positives_on_safe"][name])] if where == "suffix" else []
            table.add_row(name, *cells, f"{ms:.1f}", *extra)
        console.print(table)


if __name__ == "__main__":
    main()
