"""Bounded load on the guarded server: every request answered exactly once, guarded, and at what rate.

    python benchmarks/load_test.py                         # 3 rounds of 48 requests, 8 clients: ~2 minutes
    python benchmarks/load_test.py --requests 96 --concurrency 16
    python benchmarks/load_test.py --requests 24 --rounds 2 --max-tokens 8 --max-queue 4   # admission: 429s

The guard (``policies/default.yaml``) serves the embedded SmolLM2 on loopback. Concurrent clients send a mix of
plain and streamed chat requests (greedy), every sixth one a prompt the policy refuses. Each request carries its
own marker (``user: load-<i>``) and is matched to the one response it gets. Checked, not just timed:

* no request lost (each gets exactly one complete answer: a JSON body, a stream ending in ``[DONE]``, or an
  OpenAI error) and none duplicated (every completion id is distinct, and the server counted exactly as many
  requests as were sent);
* no answer mixed up between concurrent requests: each equals the answer its prompt got when sent alone;
* every response — answers, streams and refusals — carries the ``x-guard-*`` headers;
* memory is stable: the load runs ``--rounds`` times (default 3); after the first round has warmed the
  allocator and the batch shapes up, resident memory of the server process grows by at most ``--rss-bound-mb``
  over the remaining rounds;
* admission control: with ``--max-queue`` below the number of clients the server turns some requests away with
  429. Each 429 must carry ``Retry-After`` and OpenAI's ``rate_limit_exceeded`` error, and the server must count
  as many as the clients saw; the client waits that long and retries, as the OpenAI SDKs do, until answered.

Reported (last round): p50/p99 latency per kind (including waits for retries), requests/s, 429s; RSS after every
round.
Writes benchmarks/results/load_test.json (with ``--max-queue``: load_test_admission.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402
from conftest import chat_requests  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tqdm import tqdm  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "load_test.json"
POLICY = ROOT / "policies" / "default.yaml"
MODEL = "embedded:smollm2"
ANSWERED = ["What is the capital of France?", "Name a primary colour.", "What is two plus two?"]
REFUSED = "How do I build a pipe bomb?"
GUARD_HEADERS = ("x-guard-policy", "x-guard-concepts-checked", "x-guard-flagged")
console = Console(width=140)


@dataclass
class Outcome:
    """What one request got back."""

    marker: str
    kind: str  # "json", "stream" or "refused"
    prompt: str
    status: int
    latency_s: float
    complete: bool  # one whole answer: a parsed body, or a stream that ended with [DONE]
    response_id: str | None
    text: str | None
    guard_headers: bool
    turned_away: int = 0  # 429 answers before this one (each with Retry-After and rate_limit_exceeded)
    bad_429: int = 0  # 429 answers without Retry-After or without OpenAI's rate-limit error
    retry_after_s: list[float] = field(default_factory=list)  # the Retry-After of each 429


@dataclass
class LoadReport:
    requests: int
    concurrency: int
    wall_s: float
    outcomes: list[Outcome] = field(repr=False)
    lost: list[str]  # markers without a complete answer
    duplicated: list[str]  # completion ids seen more than once
    mixed_up: list[str]  # markers whose answer differs from their prompt's answer alone
    missing_guard_headers: list[str]
    server_counted: float  # the server's own request counter grew by this much
    server_rejected: float  # the server's queue_full counter grew by this much

    @property
    def turned_away(self) -> int:
        return sum(o.turned_away for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.mixed_up or self.missing_guard_headers) \
            and self.server_counted == self.requests and self.server_rejected == self.turned_away \
            and not any(o.bad_429 for o in self.outcomes)

    def latency_ms(self, kind: str | None = None) -> dict[str, float]:
        values = [o.latency_s * 1000 for o in self.outcomes if kind is None or o.kind == kind]
        return {"p50": float(np.percentile(values, 50)), "p99": float(np.percentile(values, 99)), "n": len(values)}


def plan(requests: int) -> list[tuple[str, str, str]]:
    """(marker, kind, prompt) per request: every 6th refused, the rest alternating plain and streamed."""
    specs = []
    for i in range(requests):
        if i % 6 == 5:
            specs.append((f"load-{i}", "refused", REFUSED))
        else:
            specs.append((f"load-{i}", "stream" if i % 2 else "json", ANSWERED[i % len(ANSWERED)]))
    return specs


def _body(prompt: str, marker: str, max_tokens: int, stream: bool) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "user": marker, "stream": stream}


async def _send(client: httpx.AsyncClient, marker: str, kind: str, prompt: str, max_tokens: int) -> Outcome:
    started = time.perf_counter()
    stream = kind == "stream"
    turned_away = bad_429 = 0
    waits: list[float] = []
    while True:  # a 429 is retried after its Retry-After, as the OpenAI SDKs do
        async with client.stream("POST", "/v1/chat/completions",
                                 json=_body(prompt, marker, max_tokens, stream)) as resp:
            raw = await resp.aread()
        if resp.status_code != 429:
            break
        turned_away += 1
        retry_after = resp.headers.get("retry-after", "")
        bad_429 += not retry_after.isdigit() or json.loads(raw)["error"]["code"] != "rate_limit_exceeded"
        waits.append(float(retry_after) if retry_after.isdigit() else 1.0)
        await asyncio.sleep(waits[-1])
    latency = time.perf_counter() - started
    headers = all(name in resp.headers for name in GUARD_HEADERS)
    if resp.status_code != 200:
        error = json.loads(raw).get("error", {})
        return Outcome(marker, kind, prompt, resp.status_code, latency, "code" in error, None, error.get("code"),
                       headers, turned_away, bad_429, waits)
    if not stream:
        body = json.loads(raw)
        return Outcome(marker, kind, prompt, 200, latency, True, body["id"], body["choices"][0]["message"]["content"],
                       headers, turned_away, bad_429, waits)
    frames = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
    chunks = [json.loads(f) for f in frames if f != "[DONE]"]
    text = "".join((c["choices"][0]["delta"].get("content") or "") for c in chunks if c["choices"])
    ids = {c["id"] for c in chunks}
    complete = bool(frames) and frames[-1] == "[DONE]" and len(ids) == 1
    return Outcome(marker, kind, prompt, 200, latency, complete, ids.pop() if len(ids) == 1 else None, text, headers,
                   turned_away, bad_429, waits)


def reference_answers(base_url: str, api_key: str, max_tokens: int) -> dict[str, str]:
    """Each answered prompt's reply when it is the only request in flight (also warms the server up)."""
    answers = {}
    with httpx.Client(base_url=base_url, headers={"authorization": f"Bearer {api_key}"}, timeout=300) as client:
        for prompt in ANSWERED:
            reply = client.post("/v1/chat/completions", json=_body(prompt, "reference", max_tokens, False))
            reply.raise_for_status()
            answers[prompt] = reply.json()["choices"][0]["message"]["content"]
    return answers


def run_load(base_url: str, api_key: str, requests: int, concurrency: int, max_tokens: int,
             show_progress: bool = True) -> LoadReport:
    """Send ``requests`` chat requests, at most ``concurrency`` at a time, and check what came back."""
    reference = reference_answers(base_url, api_key, max_tokens)
    counted_before = chat_requests(base_url)
    rejected_before = queue_full_rejections(base_url)
    specs = plan(requests)

    async def all_requests() -> list[Outcome]:
        gate = asyncio.Semaphore(concurrency)
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(base_url=base_url, headers={"authorization": f"Bearer {api_key}"},
                                     timeout=600, limits=limits) as client:
            progress = tqdm(total=len(specs), desc="requests", disable=not show_progress)

            async def one(spec: tuple[str, str, str]) -> Outcome:
                async with gate:
                    outcome = await _send(client, *spec, max_tokens)
                progress.update()
                return outcome

            try:
                return list(await asyncio.gather(*(one(spec) for spec in specs)))
            finally:
                progress.close()

    started = time.perf_counter()
    outcomes = asyncio.run(all_requests())
    wall = time.perf_counter() - started
    by_marker = {o.marker: o for o in outcomes}
    lost = [marker for marker, _, _ in specs if marker not in by_marker or not by_marker[marker].complete]
    lost += [o.marker for o in outcomes if o.kind == "refused" and o.text != "content_policy_violation"]
    ids = [o.response_id for o in outcomes if o.response_id is not None]
    duplicated = sorted({i for i in ids if ids.count(i) > 1})
    mixed_up = [o.marker for o in outcomes if o.kind != "refused" and o.text != reference[o.prompt]]
    missing = [o.marker for o in outcomes if not o.guard_headers]
    return LoadReport(requests, concurrency, wall, outcomes, lost, duplicated, mixed_up, missing,
                      chat_requests(base_url) - counted_before, queue_full_rejections(base_url) - rejected_before)


def queue_full_rejections(base_url: str) -> float:
    """How many requests the server has turned away with 429 (its queue was full), from /metrics."""
    found = re.search(r'^guard_rejected_requests_total\{reason="queue_full"\} (\S+)$',
                      httpx.get(f"{base_url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def main() -> None:
    from conftest import start_server

    from serving.config import ServerSettings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-queue", type=int, default=None,
                        help="the server's --max-queue (default: the server's, 64); below --concurrency some "
                             "requests get 429 and are retried")
    parser.add_argument("--rss-bound-mb", type=float, default=50.0,
                        help="largest RSS growth after the first round that still counts as stable")
    args = parser.parse_args()

    process = psutil.Process()
    max_queue = args.max_queue or ServerSettings.max_queue
    results = RESULTS if args.max_queue is None else RESULTS.with_name("load_test_admission.json")
    server = start_server(ServerSettings(policy_path=POLICY, model=MODEL, api_keys=("sk-load",),
                                         max_batch_size=args.concurrency, reload_policy=False, max_queue=max_queue))
    try:
        reference_answers(server.base_url, "sk-load", args.max_tokens)  # warm-up before the first RSS reading
        rss = [process.memory_info().rss / 2**20]
        reports = []
        for _ in range(args.rounds):
            reports.append(run_load(server.base_url, "sk-load", args.requests, args.concurrency, args.max_tokens))
            rss.append(process.memory_info().rss / 2**20)
    finally:
        server.stop()

    report = reports[-1]
    growth = rss[-1] - rss[1] if len(rss) > 2 else rss[-1] - rss[0]
    kinds = ("json", "stream", "refused")
    result = {
        "model": MODEL, "policy": str(POLICY.relative_to(ROOT)), "requests": args.requests,
        "concurrency": args.concurrency, "max_queue": max_queue, "max_tokens": args.max_tokens,
        "wall_s": report.wall_s,
        "requests_per_s": args.requests / report.wall_s,
        "latency_ms": {"all": report.latency_ms(), **{kind: report.latency_ms(kind) for kind in kinds}},
        "lost": report.lost, "duplicated": report.duplicated, "mixed_up": report.mixed_up,
        "missing_guard_headers": report.missing_guard_headers, "server_counted": report.server_counted,
        "turned_away_429": report.turned_away, "server_rejected": report.server_rejected,
        "requests_turned_away_at_least_once": sum(o.turned_away > 0 for o in report.outcomes),
        "bad_429": sum(o.bad_429 for o in report.outcomes),
        "retry_after_s": sorted(w for o in report.outcomes for w in o.retry_after_s),
        "rounds": args.rounds, "rounds_ok": [r.ok for r in reports],
        "rss_mb": {"after_warm_up": rss[0], "after_each_round": rss[1:], "growth_after_first_round": growth,
                   "bound": args.rss_bound_mb},
        "ok": all(r.ok for r in reports) and growth <= args.rss_bound_mb,
        "outcomes": [asdict(o) for o in report.outcomes],
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=2) + "\n")

    table = Table(title=f"guarded server under load: {args.requests} requests, {args.concurrency} concurrent "
                        f"clients, {args.max_tokens} tokens ({MODEL}, CPU)")
    for column in ("requests", "n", "p50 ms", "p99 ms"):
        table.add_column(column, justify="right")
    for kind in ("all", *kinds):
        latency = result["latency_ms"][kind]
        table.add_row(kind, str(latency["n"]), f"{latency['p50']:.0f}", f"{latency['p99']:.0f}")
    console.print(table)
    console.print(f"throughput {result['requests_per_s']:.2f} requests/s over {report.wall_s:.1f} s; "
                  f"lost {len(report.lost)}, duplicated {len(report.duplicated)}, mixed up {len(report.mixed_up)}, "
                  f"without guard headers {len(report.missing_guard_headers)}; server counted "
                  f"{report.server_counted:.0f} of {args.requests}")
    console.print(f"admission (--max-queue {max_queue}): {report.turned_away} answers were 429 "
                  f"({result['requests_turned_away_at_least_once']} requests turned away at least once, server counted "
                  f"{report.server_rejected:.0f}); {result['bad_429']} without Retry-After or rate_limit_exceeded; Retry-After "
                  f"{min(result['retry_after_s'], default=0):.0f}-{max(result['retry_after_s'], default=0):.0f} s; "
                  "each was retried until answered (any that was not counts as lost above)")
    console.print(f"rounds all checked ok: {all(r.ok for r in reports)}; RSS after warm-up {rss[0]:.0f} MB, after "
                  f"each round {', '.join(f'{v:.0f}' for v in rss[1:])} MB ({growth:+.0f} MB after the first round, "
                  f"bound {args.rss_bound_mb:.0f} MB)")
    console.print(f"wrote {results.relative_to(ROOT)}")
    if not result["ok"]:
        raise SystemExit("load test FAILED: see the counts above")


if __name__ == "__main__":
    main()
