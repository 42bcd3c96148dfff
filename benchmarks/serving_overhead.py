"""What the guarded server costs over plain in-process decoding, on the embedded SmolLM2 (CPU, greedy).

    python benchmarks/serving_overhead.py                 # ~2-4 minutes on 2 CPU cores
    python benchmarks/serving_overhead.py --repeats 3 --max-tokens 48

One run measures, interleaved prompt by prompt so machine noise hits every variant alike:

* ``plain``: ``guard.text.generation.generate(None, ...)`` — the model alone, no guard, no HTTP.
* ``http``: the same request through ``guard serve`` (policies/default.yaml) with the official openai client:
  prompt check, token penalties, output check, JSON and HTTP on top.
* ``stream``: the same request streamed; time to first content and to the end, against the plain decode's
  first token (``start_stream(None, ...)``). The guard holds back a sliding window of text before releasing it.
* ``batched``: the prompts sent concurrently (the server batches them into one decode) vs one after another.

Every ratio divides guarded by unguarded time of the same work in the same run; medians over repetitions.
The server's own Prometheus histogram gives the added guard latency per check.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import openai  # noqa: E402
import torch  # noqa: E402
from conftest import start_server  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

from guard.models import load_language_model  # noqa: E402
from guard.text.generation import SamplingSettings, TextRequest, generate, start_stream  # noqa: E402
from serving.config import ServerSettings  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "serving_overhead.json"
POLICY = ROOT / "policies" / "default.yaml"
MODEL = "embedded:smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "Explain what a rainbow is in two sentences.",
    "Write a short poem about the sea.",
]
console = Console(width=140)


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    model, tokenizer = load_language_model(MODEL)
    server = start_server(ServerSettings(policy_path=POLICY, model=MODEL, reload_policy=False))
    client = server.client(api_key="unused")
    settings = SamplingSettings(max_new_tokens=args.max_tokens, temperature=0)
    times: dict[str, list[float]] = {key: [] for key in ("plain", "http", "plain_first", "stream_first",
                                                         "stream_total", "sequential", "concurrent")}
    tokens: list[int] = []
    try:
        for _ in tqdm(range(args.repeats), desc="repetitions"):
            for prompt in PROMPTS:
                messages = [{"role": "user", "content": prompt}]
                start = time.perf_counter()
                plain = generate(None, model, tokenizer, TextRequest.chat(messages, settings))
                times["plain"].append(time.perf_counter() - start)
                tokens.append(plain.completion_tokens)

                start = time.perf_counter()
                reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=args.max_tokens,
                                                       temperature=0)
                times["http"].append(time.perf_counter() - start)
                if reply.choices[0].message.content != plain.choices[0].text:
                    raise SystemExit(f"guarded and plain answers differ for {prompt!r}: the timing would not compare")

                start = time.perf_counter()
                plain_stream = start_stream(None, model, tokenizer, TextRequest.chat(messages, settings))
                for delta in plain_stream:
                    if delta.text:
                        times["plain_first"].append(time.perf_counter() - start)
                        break
                plain_stream.close()
                start = time.perf_counter()
                first = None
                for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                                            max_tokens=args.max_tokens, temperature=0):
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - start
                times["stream_first"].append(first if first is not None else time.perf_counter() - start)
                times["stream_total"].append(time.perf_counter() - start)

            start = time.perf_counter()
            for prompt in PROMPTS:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=args.max_tokens, temperature=0)
            times["sequential"].append(time.perf_counter() - start)

            async def together() -> None:
                async with openai.AsyncOpenAI(base_url=server.api_url, api_key="unused", max_retries=0) as aclient:
                    await asyncio.gather(*(aclient.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=args.max_tokens,
                        temperature=0) for p in PROMPTS))

            start = time.perf_counter()
            asyncio.run(together())
            times["concurrent"].append(time.perf_counter() - start)
        metrics = httpx.get(f"{server.base_url}/metrics").text
    finally:
        server.stop()

    def histogram_mean(stage: str) -> float:
        total = float(re.search(rf'^guard_added_latency_seconds_sum\{{stage="{stage}"\}} (\S+)$', metrics, re.M)[1])
        count = float(re.search(rf'^guard_added_latency_seconds_count\{{stage="{stage}"\}} (\S+)$', metrics, re.M)[1])
        return total / count

    result = {
        "device": f"CPU ({platform.machine()}, torch threads={torch.get_num_threads()})",
        "torch": torch.__version__,
        "model": MODEL,
        "policy": str(POLICY.relative_to(ROOT)),
        "prompts": len(PROMPTS),
        "repeats": args.repeats,
        "max_tokens": args.max_tokens,
        "mean_completion_tokens": statistics.mean(tokens),
        "median_s": {key: median(values) for key, values in times.items()},
        "ratios": {
            "http_vs_plain": median([h / p for h, p in zip(times["http"], times["plain"])]),
            "stream_first_content_vs_plain_first_token": median(
                [s / p for s, p in zip(times["stream_first"], times["plain_first"])]),
            "stream_total_vs_plain": median([s / p for s, p in zip(times["stream_total"], times["plain"])]),
            "concurrent_vs_sequential": median([c / s for c, s in zip(times["concurrent"], times["sequential"])]),
        },
        "guard_check_mean_ms": {stage: 1000 * histogram_mean(stage) for stage in ("prompt", "output",
                                                                                  "stream_output")},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"guarded server vs plain decoding ({MODEL}, {args.max_tokens} tokens, "
                        f"{len(PROMPTS)} prompts x {args.repeats})")
    for column in ("measure", "guarded (median s)", "unguarded (median s)", "ratio"):
        table.add_column(column)
    med = result["median_s"]
    ratios = result["ratios"]
    table.add_row("answer over HTTP vs plain decode", f"{med['http']:.3f}", f"{med['plain']:.3f}",
                  f"{ratios['http_vs_plain']:.2f}x")
    table.add_row("stream: first content vs first token", f"{med['stream_first']:.3f}", f"{med['plain_first']:.3f}",
                  f"{ratios['stream_first_content_vs_plain_first_token']:.2f}x")
    table.add_row("stream: whole answer vs plain decode", f"{med['stream_total']:.3f}", f"{med['plain']:.3f}",
                  f"{ratios['stream_total_vs_plain']:.2f}x")
    table.add_row(f"{len(PROMPTS)} concurrent vs sequential (HTTP)", f"{med['concurrent']:.3f}",
                  f"{med['sequential']:.3f}", f"{ratios['concurrent_vs_sequential']:.2f}x")
    console.print(table)
    checks = result["guard_check_mean_ms"]
    console.print(f"guard checks (mean): prompt {checks['prompt']:.1f} ms, output {checks['output']:.1f} ms, "
                  f"stream window {checks['stream_output']:.1f} ms per check")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
