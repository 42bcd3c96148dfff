"""What the guard costs over the bare engine, all in one run (guarded vs bare work measured side by side).

    python benchmarks/overhead.py            # ~4-5 min on 2 CPU cores; writes benchmarks/results/overhead.{json,png}
    python benchmarks/overhead.py --quick    # smoke run, ~1-2 minutes
    python benchmarks/overhead.py --sections gpu --gpu-config tiny --out /tmp/overhead_tiny.json
                                             # the GPU section's code path on CPU, with a tiny Llama config
    python benchmarks/overhead.py --device cuda --sections gpu --out benchmarks/results/overhead_gpu.json
                                             # on a GPU machine: the logits processor on a random-weight Llama-3-8B

Sections (``--sections``; the default is every CPU section, plus ``gpu`` with ``--device cuda``):

* ``decode``: the same chat requests through ``guard.text.generation.generate`` with ``guard=None`` (bare engine)
  and with a Guard on the default policy, embedded SmolLM2, greedy, interleaved request by request (the order
  alternates) so machine noise hits both alike. Requests the policy steers (Harry Potter probes: token penalties,
  output check, regenerations) give the tokens/s ratio, end to end and for decoding alone with every row penalised
  (``llm_erasure.decode_overhead``); unflagged requests give the added latency (guarded minus bare, per request)
  and, because on a shared machine that difference is mostly noise, the time the guard's checks took themselves.
  This section runs on the CPU whatever ``--device`` says.
* ``stream``: the same unflagged chat requests streamed, bare (``start_stream(None, ...)``) and as the server
  streams them minus HTTP (certification, prompt check, decoding in the engine thread, ``guarded_events`` with its
  incremental output check), each with empty embedding and certificate caches: time to the first visible text,
  the p99 gap between text chunks and tokens/s from request to end.
* ``classify``: prompt-classification latency for policies of 10 … 10,000 concepts (``classifier_scaling.measure``).
* ``certify``: erase-and-check time per prompt against d in suffix mode, with the policy's certify filter on its
  refused concepts (as the server does), each prompt paying for its own embeddings; d = 0 is plain classification.
  Prompts are two held-out safe prompts joined (~21 filter tokens), so d up to 20 really erases d tokens.
* ``gpu``: greedy decoding of a LlamaForCausalLM built from a hand-written Llama-3-8B config with random weights
  (timing only, no download) at batch 1/8/32, with and without the guard's logits processor penalising every
  row. The guard's tokenizer is SmolLM2's (49,152 tokens); the model's logits are 128,256 wide, and the processor
  only touches ids its tokenizer knows.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import yaml  # noqa: E402
from anyio import to_thread  # noqa: E402
from classifier_scaling import measure  # noqa: E402
from llm_erasure import decode_overhead  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, LogitsProcessorList  # noqa: E402

from detectors.harmful import HarmfulHead  # noqa: E402
from guard.certification import EraseAndCheck, backend_tokenizer, build_filter  # noqa: E402
from guard.decision import Guard, OutputDecision, PromptDecision  # noqa: E402
from guard.errors import ConceptRefused  # noqa: E402
from guard.methods.token_penalty.tables import PenaltyRow  # noqa: E402
from guard.methods.token_penalty.transformers import TokenPenaltyProcessor  # noqa: E402
from guard.models import load_language_model  # noqa: E402
from guard.policy import ActionType, CertifySettings, Policy, load_policy  # noqa: E402
from guard.settle import GenerationResult  # noqa: E402
from guard.text.generation import SamplingSettings, TextRequest, generate, start_stream  # noqa: E402
from serving.chat_completion.serving import ChatChunkWriter  # noqa: E402
from serving.engines.transformers import TransformersStream  # noqa: E402
from serving.guard_state import refusal_policy  # noqa: E402
from serving.metrics import ServerMetrics  # noqa: E402
from serving.streaming import guarded_events  # noqa: E402

MODEL = "embedded:smollm2"
PROBES = ROOT / "benchmarks" / "data" / "llm_probes.yaml"
SECTIONS = ("decode", "stream", "classify", "certify", "gpu")
# Meta-Llama-3-8B's config.json, written out: the architecture is all the timing needs.
LLAMA3_8B: dict[str, Any] = {
    "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "intermediate_size": 14336, "rope_theta": 500000.0, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
    "tie_word_embeddings": False,
}
# The same vocabulary (so the logits are as wide), a toy body: exercises the GPU section's code on a CPU.
GPU_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": LLAMA3_8B,
    "tiny": {**LLAMA3_8B, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 128},
}
GPU_PROMPT_TOKENS = 64
# Run sizes: the default fits ~5 minutes on 2 shared CPU cores, --quick ~1-2 minutes.
PROFILES: dict[str, dict[str, Any]] = {
    "default": {"max_tokens": 32, "repeats": 2, "flagged": 6, "passing": 12, "concepts": [10, 100, 1_000, 10_000],
                "classify_repeats": 10, "erase": [0, 2, 4, 8, 10, 16, 20], "certify_prompts": 12,
                "gpu_batches": [1, 8, 32], "gpu_tokens": 32, "gpu_repeats": 3},
    "quick": {"max_tokens": 16, "repeats": 1, "flagged": 3, "passing": 6, "concepts": [10, 100, 1_000],
              "classify_repeats": 4, "erase": [0, 4, 10], "certify_prompts": 4,
              "gpu_batches": [1, 8, 32], "gpu_tokens": 16, "gpu_repeats": 2},
}

console = Console(width=140)


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(values, q))


# -------------------------------------------------------------------------------------------------
# 1. bare engine vs guard, same requests


class TimedGuard(Guard):
    """The Guard, adding up the time its prompt and output checks take: on a shared machine the wall-time
    difference of a pass-through request is mostly noise, the checks' own time is not."""

    def __init__(self, policy: Policy):
        super().__init__(policy)
        self.check_s = 0.0

    def check_prompt(self, texts: Sequence[str]) -> PromptDecision:
        started = time.perf_counter()
        try:
            return super().check_prompt(texts)
        finally:
            self.check_s += time.perf_counter() - started

    def check_output(self, text: str, decision: PromptDecision, attempt: int = 0) -> OutputDecision:
        started = time.perf_counter()
        try:
            return super().check_output(text, decision, attempt)
        finally:
            self.check_s += time.perf_counter() - started


def pick_prompts(guard: Guard, count_flagged: int, count_passing: int) -> tuple[list[str], list[str], list[str]]:
    """Probe prompts the policy steers (penalties on, not refused), retain prompts it leaves alone, and the
    concepts penalised on the steered ones."""
    data = yaml.safe_load(PROBES.read_text(encoding="utf-8"))
    flagged: list[str] = []
    penalized: dict[str, None] = {}
    for probes in data["probes"].values():
        for probe in probes:
            if len(flagged) == count_flagged:
                break
            try:
                decision = guard.check_prompt([probe["prompt"]])
            except ConceptRefused:
                continue
            if decision.penalized:
                flagged.append(probe["prompt"])
                penalized.update(dict.fromkeys(decision.penalized))
    passing = [p for p in data["retain"] if not guard.classify([p]).flagged][:count_passing]
    if not flagged or not passing:
        raise SystemExit("the policy steers none of the probes or flags every retain prompt: nothing to compare")
    return flagged, passing, list(penalized)


def decode_section(guard: TimedGuard, model: Any, tokenizer: Any, profile: dict[str, Any]) -> dict[str, Any]:
    flagged, passing, penalized = pick_prompts(guard, profile["flagged"], profile["passing"])
    settings = SamplingSettings(max_new_tokens=profile["max_tokens"], temperature=0)

    def timed(which: Guard | None, prompt: str) -> tuple[float, GenerationResult, float]:
        """Wall time, result, and the time spent in guard checks."""
        guard.check_s = 0.0
        guard.classifier.query_cache.clear()  # every request pays for its own embeddings (a fresh request)
        started = time.perf_counter()
        result = generate(which, model, tokenizer, TextRequest.chat([{"role": "user", "content": prompt}], settings))
        return time.perf_counter() - started, result, guard.check_s

    timed(None, passing[0])  # warm-up: first calls allocate
    timed(guard, passing[0])
    records: list[dict[str, Any]] = []
    schedule = [("flagged", p) for p in flagged] + [("passing", p) for p in passing]
    for repeat in range(profile["repeats"]):
        with console.status(f"bare vs guarded requests, round {repeat + 1}/{profile['repeats']}"):
            for index, (kind, prompt) in enumerate(schedule):
                first_bare = (index + repeat) % 2 == 0
                runs = {label: timed(None if label == "bare" else guard, prompt)
                        for label in (("bare", "guarded") if first_bare else ("guarded", "bare"))}
                (bare_s, bare, _), (guarded_s, guarded, check_s) = runs["bare"], runs["guarded"]
                choice = guarded.choices[0]
                records.append({"kind": kind, "prompt": prompt, "bare_s": bare_s, "guarded_s": guarded_s,
                                "guard_checks_s": check_s,
                                "bare_tokens": bare.completion_tokens, "guarded_tokens": guarded.completion_tokens,
                                "bare_text": bare.choices[0].text, "guarded_text": choice.text,
                                "identical": choice.text == bare.choices[0].text,
                                "guarded_finish": choice.finish_reason, "regenerations": choice.regenerations})

    steered = [r for r in records if r["kind"] == "flagged"]
    bare_tps = sum(r["bare_tokens"] for r in steered) / sum(r["bare_s"] for r in steered)
    guarded_tps = sum(r["guarded_tokens"] for r in steered) / sum(r["guarded_s"] for r in steered)
    bare_answers = [r["bare_text"] for r in steered[:len(flagged)]]
    with console.status("decode only: every row penalised vs plain"):
        decode_only = decode_overhead(guard, model, tokenizer, flagged, penalized, profile["max_tokens"], bare_answers)
    plain = [r for r in records if r["kind"] == "passing"]
    added_ms = [(r["guarded_s"] - r["bare_s"]) * 1000 for r in plain]
    checks_ms = [r["guard_checks_s"] * 1000 for r in plain]
    bare_median = statistics.median(r["bare_s"] for r in plain)
    guarded_median = statistics.median(r["guarded_s"] for r in plain)
    return {
        "model": MODEL, "max_new_tokens": profile["max_tokens"], "repeats": profile["repeats"],
        "penalized_concepts": penalized,
        "flagged": {"prompts": flagged, "requests": len(steered),
                    "bare_tokens_per_s": bare_tps, "guarded_tokens_per_s": guarded_tps,
                    "tokens_per_s_ratio": guarded_tps / bare_tps,
                    "regenerations": sum(r["regenerations"] for r in steered),
                    "blocked": sum(r["guarded_finish"] == "content_filter" for r in steered),
                    "decode_only": {**decode_only, "bare_tokens_per_s": len(flagged) * profile["max_tokens"]
                                    / decode_only["plain_s"],
                                    "penalised_tokens_per_s": len(flagged) * profile["max_tokens"]
                                    / decode_only["penalised_s"]}},
        "passing": {"prompts": passing, "requests": len(plain), "added_ms": added_ms,
                    "added_ms_p50": _percentile(added_ms, 50), "added_ms_p99": _percentile(added_ms, 99),
                    "guard_checks_ms_p50": _percentile(checks_ms, 50),
                    "guard_checks_ms_p99": _percentile(checks_ms, 99),
                    "guard_checks_p50_ratio_to_bare": _percentile(checks_ms, 50) / (bare_median * 1000),
                    "guard_checks_p99_ratio_to_bare": _percentile(checks_ms, 99) / (bare_median * 1000),
                    "bare_median_ms": bare_median * 1000, "guarded_median_ms": guarded_median * 1000,
                    "median_ratio": guarded_median / bare_median,
                    "identical_answers": sum(r["identical"] for r in plain) / len(plain)},
        "records": records,
    }


# -------------------------------------------------------------------------------------------------
# 2. classification latency vs number of concepts


def classify_section(profile: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for total in profile["concepts"]:
        with console.status(f"classification with {total:,} concepts"):
            rows.append(measure(total, profile["classify_repeats"]))
    for row in rows:
        row["p50_ratio_to_smallest"] = row["p50_ms"] / rows[0]["p50_ms"]
    return {"repeats": profile["classify_repeats"], "results": rows}


# -------------------------------------------------------------------------------------------------
# 3. erase-and-check time vs d


def certify_section(policy: Policy, profile: dict[str, Any]) -> dict[str, Any]:
    settings = policy.certify or CertifySettings()
    filter_, encoder = build_filter(refusal_policy(policy), settings.filter)
    tokenizer = backend_tokenizer(encoder)
    checkers = {d: EraseAndCheck(filter_, tokenizer, mode="suffix", max_erase=d, variant=settings.variant,
                                 cache_size=0) for d in profile["erase"]}
    _, safe = HarmfulHead.load().held_out()
    prompts = [f"{safe[2 * i]} {safe[2 * i + 1]}" for i in range(profile["certify_prompts"])]
    checkers[max(checkers)].certify(prompts[0])  # warm-up
    times: dict[int, list[float]] = {d: [] for d in checkers}
    checked: dict[int, list[int]] = {d: [] for d in checkers}
    flagged: dict[int, list[bool]] = {d: [] for d in checkers}
    order = list(checkers)
    with console.status("erase-and-check vs d"):
        for index, prompt in enumerate(prompts):
            for d in order[index % len(order):] + order[:index % len(order)]:  # rotate so noise spreads over all d
                encoder.clear()  # each prompt pays for its own embeddings
                certificate = checkers[d].certify(prompt)
                times[d].append(certificate.elapsed_s)
                checked[d].append(certificate.subsequences_checked)
                flagged[d].append(certificate.flagged)
    remembered = EraseAndCheck(filter_, tokenizer, mode="suffix", max_erase=10, variant=settings.variant)
    remembered.certify(prompts[0])
    repeated_ms = statistics.median(remembered.certify(prompts[0]).elapsed_s * 1000 for _ in range(20))
    lengths = [len(checkers[order[0]].tokenize(p)) for p in prompts]
    base = times[order[0]]
    rows = [{"d": d, "mean_ms": statistics.mean(times[d]) * 1000, "median_ms": statistics.median(times[d]) * 1000,
             "versions_checked": statistics.mean(checked[d]), "flagged_rate": sum(flagged[d]) / len(prompts),
             "ratio_to_d0": statistics.median(t / b for t, b in zip(times[d], base))} for d in order]
    return {"mode": "suffix", "filter": settings.filter, "variant": settings.variant,
            "concepts": [c.id for c in refusal_policy(policy).concepts], "prompts": len(prompts),
            "mean_prompt_tokens": statistics.mean(lengths), "results": rows,
            "repeated_prompt_d10_ms": repeated_ms}


# -------------------------------------------------------------------------------------------------
# 4. streams: first visible text, gaps between releases, tokens/s; bare decode vs the server's guarded stream


def _bare_stream(model: Any, tokenizer: Any, request: TextRequest) -> tuple[list[float], int]:
    """Times (s from the request) at which the bare engine yields text, and the tokens it decoded."""
    started = time.perf_counter()
    stream = start_stream(None, model, tokenizer, request)
    times = [time.perf_counter() - started for delta in stream if delta.text]
    return times, stream.completion_tokens


async def _guarded_stream(guard: Guard, certifier: EraseAndCheck, model: Any, tokenizer: Any,
                          request: TextRequest, prompt: str) -> tuple[list[float], int, str]:
    """The server's path for a fresh streamed chat, minus HTTP: certification, the prompt check, decoding in the
    engine's thread and ``serving.streaming.guarded_events``; times at which text frames leave it."""
    started = time.perf_counter()
    await to_thread.run_sync(certifier.certify, prompt)
    stream = await to_thread.run_sync(start_stream, guard, model, tokenizer, request)
    engine = TransformersStream(stream.decision, [stream], asyncio.get_running_loop())
    times, finish = [], ""
    async for frame in guarded_events(guard, engine, ChatChunkWriter(MODEL, "overhead"), 1, False, ServerMetrics(),
                                      lambda _: None):
        if frame.startswith(b"data: {"):
            choices = json.loads(frame[len(b"data: "):])["choices"]
            if choices and choices[0]["delta"].get("content"):
                times.append(time.perf_counter() - started)
            if choices and choices[0].get("finish_reason"):
                finish = choices[0]["finish_reason"]
    return times, stream.completion_tokens, finish


def stream_section(guard: Guard, policy: Policy, model: Any, tokenizer: Any, profile: dict[str, Any]) -> dict[str, Any]:
    certifier = EraseAndCheck.from_policy(refusal_policy(policy), cache=guard.classifier.query_cache)  # as served
    _, passing, _ = pick_prompts(guard, 1, profile["passing"])
    settings = SamplingSettings(max_new_tokens=profile["max_tokens"], temperature=0)
    runs: dict[str, list[dict[str, Any]]] = {"bare": [], "guarded": []}

    def fresh() -> None:
        certifier.clear_cache()
        guard.classifier.query_cache.clear()

    def one(label: str, prompt: str) -> None:
        request = TextRequest.chat([{"role": "user", "content": prompt}], settings)
        fresh()
        begun = time.perf_counter()
        if label == "bare":
            times, tokens = _bare_stream(model, tokenizer, request)
            finish = "n/a"
        else:
            times, tokens, finish = asyncio.run(_guarded_stream(guard, certifier, model, tokenizer, request, prompt))
        runs[label].append({"prompt": prompt, "first_s": times[0] if times else float("nan"),
                            "gaps_s": [b - a for a, b in zip(times, times[1:])], "tokens": tokens,
                            "total_s": time.perf_counter() - begun, "finish": finish})

    one("bare", passing[0])  # warm-up
    one("guarded", passing[0])
    runs = {"bare": [], "guarded": []}
    with console.status("streams: bare vs guarded"):
        for repeat in range(profile["repeats"]):
            for index, prompt in enumerate(passing):
                for label in (("bare", "guarded") if (index + repeat) % 2 == 0 else ("guarded", "bare")):
                    one(label, prompt)

    def gaps(label: str) -> list[float]:
        return [gap for run in runs[label] for gap in run["gaps_s"]]

    def tokens_per_s(label: str) -> float:
        return sum(r["tokens"] for r in runs[label]) / sum(r["total_s"] for r in runs[label])

    first_ratio = statistics.median(g["first_s"] / b["first_s"] for g, b in zip(runs["guarded"], runs["bare"]))
    return {"prompts": passing, "requests": len(runs["bare"]), "max_new_tokens": profile["max_tokens"],
            "certify": f"{certifier.mode} d={certifier.max_erase} filter={certifier.filter.name}",
            "first_text_ms": {label: statistics.median(r["first_s"] for r in runs[label]) * 1000 for label in runs},
            "first_text_ratio": first_ratio,
            "gap_ms_p50": {label: _percentile(gaps(label), 50) * 1000 for label in runs},
            "gap_ms_p99": {label: _percentile(gaps(label), 99) * 1000 for label in runs},
            "gap_p99_ratio": _percentile(gaps("guarded"), 99) / _percentile(gaps("bare"), 99),
            "tokens_per_s": {label: tokens_per_s(label) for label in runs},
            "tokens_per_s_ratio": tokens_per_s("guarded") / tokens_per_s("bare"),
            "blocked": sum(r["finish"] == "content_filter" for r in runs["guarded"]),
            "runs": runs}


# -------------------------------------------------------------------------------------------------
# 5. the logits processor on a Llama-3-8B-sized model


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def gpu_section(guard: Guard, tokenizer: Any, config_name: str, device: str, concept_ids: list[str],
                profile: dict[str, Any]) -> dict[str, Any]:
    config = LlamaConfig(**GPU_CONFIGS[config_name])
    torch.manual_seed(0)
    started = time.perf_counter()
    with console.status(f"building a random-weight Llama ({config_name}) on {device}"), torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    build_s = time.perf_counter() - started
    penalties = guard.token_penalties(tokenizer)
    tokens = profile["gpu_tokens"]
    rows = []
    for batch in profile["gpu_batches"]:
        generator = torch.Generator().manual_seed(batch)
        input_ids = torch.randint(0, len(tokenizer), (batch, GPU_PROMPT_TOKENS), generator=generator).to(device)

        def processor() -> Any:
            return TokenPenaltyProcessor(penalties, [PenaltyRow(tuple(concept_ids))] * batch)

        # The processor on one step of wide logits: it must touch only ids its tokenizer knows.
        scores = torch.zeros(batch, config.vocab_size, device=device)
        processor()(input_ids, scores)
        touched = (scores[0] != 0).nonzero().flatten()

        def run(penalised: bool) -> float:
            processors = LogitsProcessorList([processor()] if penalised else [])
            _sync(device)
            begun = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=tokens,
                               min_new_tokens=tokens, do_sample=False, pad_token_id=0, logits_processor=processors)
            _sync(device)
            return time.perf_counter() - begun

        with console.status(f"decoding {tokens} tokens at batch {batch}"):
            run(False)  # warm-up
            run(True)
            runs: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(profile["gpu_repeats"]):
                for penalised in (False, True):
                    runs[penalised].append(run(penalised))
        plain, penalised = min(runs[False]), min(runs[True])
        rows.append({"batch": batch, "plain_s": plain, "penalised_s": penalised,
                     "plain_tokens_per_s": batch * tokens / plain,
                     "penalised_tokens_per_s": batch * tokens / penalised,
                     "tokens_per_s_ratio": plain / penalised,
                     "processor_ms_per_step": (penalised - plain) / tokens * 1000,
                     "penalised_ids_first_step": len(touched),
                     "penalised_ids_within_tokenizer": bool(len(touched) and int(touched.max()) < len(tokenizer))})
    return {"run": True, "config": config_name, "architecture": GPU_CONFIGS[config_name], "dtype": "bfloat16",
            "device": device, "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else
            platform.processor() or platform.machine(), "parameters": sum(p.numel() for p in model.parameters()),
            "build_s": build_s, "logits_width": config.vocab_size, "tokenizer_vocab": len(tokenizer),
            "penalized_concepts": concept_ids, "prompt_tokens": GPU_PROMPT_TOKENS, "new_tokens": tokens,
            "repeats": profile["gpu_repeats"], "timing": "fastest of the repeats, plain and penalised alternating",
            "results": rows}


# -------------------------------------------------------------------------------------------------
# report


def machine_info(device: str) -> dict[str, Any]:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_logical": psutil.cpu_count(),
            "cpu_physical": psutil.cpu_count(logical=False),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "load_average": list(os.getloadavg()), "torch": torch.__version__,
            "transformers": transformers.__version__, "torch_threads": torch.get_num_threads(),
            "cuda_available": torch.cuda.is_available()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def ratio_table(report: dict[str, Any]) -> Table:
    table = Table(title="Guard overhead: guarded / bare, measured in this run")
    for column in ("measure", "bare / reference", "guarded", "ratio"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    decode = report["decode"]
    if decode.get("run", True):
        flagged, only, passing = decode["flagged"], decode["flagged"]["decode_only"], decode["passing"]
        table.add_row("tokens/s, steered requests (end to end)", f"{flagged['bare_tokens_per_s']:.1f}",
                      f"{flagged['guarded_tokens_per_s']:.1f}", f"{flagged['tokens_per_s_ratio']:.2f}x")
        table.add_row("tokens/s, decoding alone, every row penalised", f"{only['bare_tokens_per_s']:.1f}",
                      f"{only['penalised_tokens_per_s']:.1f}", f"{only['tokens_per_s_ratio']:.2f}x")
        table.add_row("pass-through request, median ms", f"{passing['bare_median_ms']:.0f}",
                      f"{passing['guarded_median_ms']:.0f}", f"{passing['median_ratio']:.2f}x")
        table.add_row("pass-through added ms (wall difference), p50 / p99", "", f"{passing['added_ms_p50']:.0f} / "
                      f"{passing['added_ms_p99']:.0f}", "")
        table.add_row("pass-through guard checks ms (prompt + output, fresh), p50 / p99 vs bare request",
                      f"{passing['bare_median_ms']:.0f}",
                      f"{passing['guard_checks_ms_p50']:.1f} / {passing['guard_checks_ms_p99']:.1f}",
                      f"{passing['guard_checks_p50_ratio_to_bare']:.3f} / "
                      f"{passing['guard_checks_p99_ratio_to_bare']:.3f}x")
    streams = report["stream"]
    if streams.get("run", True):
        for label, values, ratio in (("stream: first visible text ms (fresh prompt, certified)", "first_text_ms",
                                      "first_text_ratio"),
                                     ("stream: gap between text chunks, p99 ms", "gap_ms_p99", "gap_p99_ratio"),
                                     ("stream: tokens/s, start to end", "tokens_per_s", "tokens_per_s_ratio")):
            table.add_row(label, f"{streams[values]['bare']:.1f}", f"{streams[values]['guarded']:.1f}",
                          f"{streams[ratio]:.2f}x")
    classify = report["classify"]
    if classify.get("run", True):
        first = classify["results"][0]
        for row in classify["results"][1:]:
            table.add_row(f"classification p50 ms, {row['concepts']:,} vs {first['concepts']} concepts",
                          f"{first['p50_ms']:.1f}", f"{row['p50_ms']:.1f}", f"{row['p50_ratio_to_smallest']:.2f}x")
    certify = report["certify"]
    if certify.get("run", True):
        base = certify["results"][0]
        for row in certify["results"][1:]:
            table.add_row(f"erase-and-check ms/prompt, d={row['d']} vs d={base['d']}", f"{base['median_ms']:.0f}",
                          f"{row['median_ms']:.0f}", f"{row['ratio_to_d0']:.2f}x")
        table.add_row("erase-and-check ms, d=10, a prompt certified before", "", f"{certify['repeated_prompt_d10_ms']:.2f}",
                      "")
    gpu = report["gpu"]
    if gpu.get("run"):
        for row in gpu["results"]:
            table.add_row(f"{gpu['config']} tokens/s, batch {row['batch']}, processor on every row",
                          f"{row['plain_tokens_per_s']:.1f}", f"{row['penalised_tokens_per_s']:.1f}",
                          f"{row['tokens_per_s_ratio']:.2f}x")
    return table


def plot(report: dict[str, Any], path: Path) -> None:
    figure, axes = plt.subplots(2, 2, figsize=(12, 9))
    (speed, added), (classify, certify) = axes

    def missing(axis: Any, title: str, section: dict[str, Any]) -> bool:
        axis.set_title(title)
        if section.get("run", True):
            return False
        axis.text(0.5, 0.5, "not run", ha="center", va="center", transform=axis.transAxes)
        axis.set_axis_off()
        return True

    decode = report["decode"]
    if not missing(speed, "tokens/s, steered requests (token penalties on)", decode):
        flagged, only = decode["flagged"], decode["flagged"]["decode_only"]
        groups = ["end to end\n(checks, regenerations)", "decoding alone\n(every row penalised)"]
        positions = np.arange(len(groups))
        bare = [flagged["bare_tokens_per_s"], only["bare_tokens_per_s"]]
        guarded = [flagged["guarded_tokens_per_s"], only["penalised_tokens_per_s"]]
        speed.bar(positions - 0.2, bare, 0.4, label="bare engine")
        speed.bar(positions + 0.2, guarded, 0.4, label="guard")
        for x, b, g in zip(positions, bare, guarded):
            speed.text(x + 0.2, g, f"{g / b:.2f}x", ha="center", va="bottom")
        speed.set_xticks(positions, groups)
        speed.set_ylabel("generated tokens / s")
        speed.legend()
    if not missing(added, "added latency, pass-through requests", decode):
        passing = decode["passing"]
        added.hist(passing["added_ms"], bins=min(20, max(5, len(passing["added_ms"]) // 2)), color="tab:orange")
        for q, style in (("p50", "--"), ("p99", ":")):
            added.axvline(passing[f"added_ms_{q}"], color="black", linestyle=style,
                          label=f"{q} {passing[f'added_ms_{q}']:.0f} ms")
        added.axvline(passing["guard_checks_ms_p50"], color="tab:green", linestyle="-",
                      label=f"guard checks alone, p50 {passing['guard_checks_ms_p50']:.0f} ms")
        added.set_xlabel(f"guarded - bare wall time, ms (bare median {passing['bare_median_ms']:.0f} ms)")
        added.set_ylabel("requests")
        added.legend()
    scaling = report["classify"]
    if not missing(classify, "prompt classification latency vs policy size", scaling):
        rows = scaling["results"]
        concepts = [r["concepts"] for r in rows]
        classify.plot(concepts, [r["p50_ms"] for r in rows], "o-", label="p50")
        classify.plot(concepts, [r["p95_ms"] for r in rows], "s--", label="p95")
        classify.set_xscale("log")
        classify.set_xlabel("concepts in the policy")
        classify.set_ylabel("ms per prompt")
        classify.set_ylim(bottom=0)
        classify.legend()
    erase = report["certify"]
    if not missing(certify, f"erase-and-check per prompt vs d ({erase.get('mode', 'suffix')} mode)", erase):
        rows = erase["results"]
        certify.plot([r["d"] for r in rows], [r["median_ms"] for r in rows], "o-")
        for row in rows:
            certify.annotate(f"{row['ratio_to_d0']:.1f}x", (row["d"], row["median_ms"]), textcoords="offset points",
                             xytext=(0, 6), ha="center")
        certify.set_xlabel(f"d (max tokens erased; prompts average {erase['mean_prompt_tokens']:.0f} tokens)")
        certify.set_ylabel("median ms per prompt (ratio to d=0)")
        certify.set_ylim(bottom=0)
    figure.suptitle(f"erasure-guard overhead ({report['settings']['profile']} run, "
                    f"{report['machine']['torch_threads']} torch thread(s))")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run (~1-2 minutes)")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=None,
                        help="default: decode classify certify, plus gpu with --device cuda")
    parser.add_argument("--device", default="cpu", help="where the gpu section's model runs (cpu, cuda, cuda:1 …)")
    parser.add_argument("--gpu-config", choices=sorted(GPU_CONFIGS), default="llama3-8b")
    parser.add_argument("--policy", type=Path, default=ROOT / "policies" / "default.yaml")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 is steadiest on a shared machine; raise it on a dedicated one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead.json",
                        help="JSON path; the plot goes next to it with .png")
    args = parser.parse_args(argv)
    sections = args.sections or [s for s in SECTIONS if s != "gpu" or args.device.startswith("cuda")]
    if "gpu" in sections and not args.device.startswith("cuda") and args.gpu_config != "tiny":
        parser.error("the Llama-3-8B config needs --device cuda; use --gpu-config tiny to run this section on a CPU")
    torch.set_num_threads(args.threads)
    profile = PROFILES["quick" if args.quick else "default"]
    started = time.perf_counter()

    policy = load_policy(args.policy)
    guard = TimedGuard(policy)
    model, tokenizer = load_language_model(MODEL)
    guard.token_penalties(tokenizer)  # compiled once, outside every timed pass
    steered = [c.id for c in policy.concepts if c.action.type is ActionType.steer and c.methods.token_penalty.enabled]

    def section(name: str, run: Callable[[], dict[str, Any]], reason: str) -> dict[str, Any]:
        if name not in sections:
            return {"run": False, "reason": reason}
        began = time.perf_counter()
        result = run()
        console.print(f"[green]{name}[/green] done in {time.perf_counter() - began:.0f} s")
        return {"run": True, **result, "section_s": time.perf_counter() - began}

    skipped = "not selected (--sections)"
    no_gpu = (f"no CUDA device in this run (torch.cuda.is_available() = {torch.cuda.is_available()}): the "
              "Llama-3-8B timing was not measured; run with --device cuda on a GPU machine")
    report: dict[str, Any] = {
        "issue": 17,
        "settings": {"profile": "quick" if args.quick else "default", "sections": sections, "device": args.device,
                     "gpu_config": args.gpu_config, "policy": policy.version_tag, **profile},
        "machine": machine_info(args.device),
        "decode": section("decode", lambda: decode_section(guard, model, tokenizer, profile), skipped),
        "stream": section("stream", lambda: stream_section(guard, policy, model, tokenizer, profile), skipped),
        "classify": section("classify", lambda: classify_section(profile), skipped),
        "certify": section("certify", lambda: certify_section(policy, profile), skipped),
        "gpu": section("gpu", lambda: gpu_section(guard, tokenizer, args.gpu_config, args.device, steered, profile),
                       skipped if args.device.startswith("cuda") or args.gpu_config == "tiny" else no_gpu),
    }
    report["total_s"] = time.perf_counter() - started
    console.print(ratio_table(report))
    if not report["gpu"]["run"]:
        console.print(f"gpu section: {report['gpu']['reason']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(report, args.out.with_suffix(".png"))
    console.print(f"wrote {args.out} and {args.out.with_suffix('.png').name} in {report['total_s']:.0f} s")
    return report


if __name__ == "__main__":
    main()
