"""Which MiniLM backend the detectors run: torch, ONNX Runtime (float32) or ONNX Runtime dynamically quantised (int8).

    python benchmarks/encoder_backends.py            # every detection probe (~3-5 minutes on 2 CPU cores)
    python benchmarks/encoder_backends.py --quick    # 2 requests per category

The probes are those of benchmarks/detection.py (harmful and benign requests, each inside every wrapper), read as
the detectors read them (``split_pieces``). Each backend embeds every piece; reported: the cosine between its
vectors and torch's (worst and mean), whether the server's refusal decision (``filter: both`` at d = 0) is the same
for every request, and the time to embed one short sentence, a 4-piece answer and a 64-piece batch (medians,
backends interleaved so machine noise hits all alike). The guard ships the fastest backend whose decisions equal
torch's on every probe. Writes benchmarks/results/encoder_backends.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from detection import DATA, ServerRefusal, messages_for  # noqa: E402
from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import guard.models  # noqa: E402
from detectors.pieces import split_pieces  # noqa: E402
from guard.models import OnnxSentenceEncoder, load_sentence_encoder  # noqa: E402
from guard.policy import load_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "encoder_backends.json"
POLICY = ROOT / "policies" / "default.yaml"
ENCODER = "embedded:minilm"
console = Console(width=130)


def probe_requests(quick: bool) -> list[list[str]]:
    """Every detection probe inside every wrapper, as the texts of one request."""
    harmful = yaml.safe_load((DATA / "harmful.yaml").read_text())
    benign = yaml.safe_load((DATA / "benign.yaml").read_text())
    wrappers = yaml.safe_load((DATA / "wrappers.yaml").read_text())
    filler = " ".join(wrappers["filler"].split())
    take = (lambda items: items[:2]) if quick else (lambda items: items)
    requests = [item for groups in harmful.values() for items in groups.values() for item in take(items)]
    requests += [item for items in benign.values() for item in take(items)]
    return [[m["content"] for m in messages_for(attack, template, request, filler)]
            for request in requests for attack, template in wrappers["attacks"].items()]


def decisions(backend: str, requests: list[list[str]]) -> list[bool]:
    """The server's refusal decision for every request, with the detectors on ``backend``."""
    os.environ[guard.models.ENCODER_BACKEND_VARIABLE] = backend
    load_sentence_encoder.cache_clear()
    refusal = ServerRefusal(load_policy(POLICY))
    return [refusal.refuses([{"content": text} for text in texts]) for texts in requests]


def median_ms(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (ONNX Runtime uses up to 4 cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    requests = probe_requests(args.quick)
    pieces = list(dict.fromkeys(p.text for texts in requests for p in split_pieces(texts)))
    os.environ[guard.models.ENCODER_BACKEND_VARIABLE] = "onnx"
    load_sentence_encoder.cache_clear()
    onnx = load_sentence_encoder(ENCODER)
    assert isinstance(onnx, OnnxSentenceEncoder)
    torch_model = onnx.model
    exported = next((guard.models.cache_dir() / "onnx").glob("*.onnx"))
    quantised_path = Path(tempfile.mkdtemp()) / "minilm-int8.onnx"
    quantize_dynamic(str(exported), str(quantised_path), weight_type=QuantType.QInt8)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = onnx._session.get_session_options().intra_op_num_threads
    int8 = OnnxSentenceEncoder(torch_model, onnxruntime.InferenceSession(str(quantised_path), options,
                                                                         providers=["CPUExecutionProvider"]))
    backends: dict[str, Any] = {"torch": torch_model, "onnx": onnx, "onnx-int8": int8}

    def encode(name: str, texts: list[str]) -> np.ndarray:
        return np.asarray(backends[name].encode(texts, batch_size=64, convert_to_numpy=True,
                                                normalize_embeddings=True), np.float32)

    reference = encode("torch", pieces)
    agreement = {}
    for name in ("onnx", "onnx-int8"):
        cosine = (encode(name, pieces) * reference).sum(axis=1)
        agreement[name] = {"min": float(cosine.min()), "mean": float(cosine.mean())}

    answer = ("The capital of France is Paris. It is known for its museums, its cafes and the river Seine. "
              "Many people visit it every year.")
    shapes = {"one sentence": ["What is the capital of France?"],
              "4-piece answer": [p.text for p in split_pieces([answer])], "64 pieces": pieces[:64]}
    timing: dict[str, dict[str, float]] = {shape: {} for shape in shapes}
    for _round in range(3):  # interleaved: every backend sees the same load
        for shape, texts in shapes.items():
            for name in backends:
                repeats = 3 if len(texts) > 8 else 15
                timing[shape].setdefault(name, [])
                timing[shape][name].append(median_ms(lambda: encode(name, texts), repeats))
    timing_ms = {shape: {name: statistics.median(values) for name, values in rows.items()}
                 for shape, rows in timing.items()}

    refused = {name: decisions(name, requests) for name in ("torch", "onnx")}
    same = sum(a == b for a, b in zip(refused["torch"], refused["onnx"]))
    # int8 is only a candidate if its vectors could keep decisions; judged by agreement below.
    os.environ.pop(guard.models.ENCODER_BACKEND_VARIABLE, None)

    table = Table(title=f"MiniLM backends on {len(pieces)} detection pieces ({len(requests)} requests)")
    for column in ("backend", "cosine vs torch (min / mean)", *(f"{s} ms" for s in shapes)):
        table.add_column(column)
    for name in backends:
        cos = agreement.get(name)
        table.add_row(name, "-" if cos is None else f"{cos['min']:.6f} / {cos['mean']:.6f}",
                      *(f"{timing_ms[s][name]:.1f}" for s in shapes))
    console.print(table)
    console.print(f"refusal decisions, onnx vs torch: {same}/{len(requests)} identical")
    result = {"encoder": ENCODER, "quick": args.quick, "pieces": len(pieces), "requests": len(requests),
              "torch_threads": args.threads, "onnx_threads": options.intra_op_num_threads,
              "cosine_vs_torch": agreement, "median_ms": timing_ms,
              "decisions_identical": {"onnx": same, "of": len(requests)},
              "refused": {"torch": sum(refused["torch"]), "onnx": sum(refused["onnx"])}}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    console.print(f"wrote {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
