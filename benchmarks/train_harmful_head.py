"""Train the harmful-request head shipped in guard/data/harmful_head.npz (reproducible: seeded end to end).

    python benchmarks/train_harmful_head.py            # writes guard/data/harmful_head.npz
    python benchmarks/train_harmful_head.py --out /tmp/head.npz

Data: the erase-and-check training prompts (Kumar et al., MIT; guard/data/erase-and-check/), 400 harmful and
395 distinct safe prompts. A stratified 20% of each class is held out (seeded) and recorded in the head file;
benchmarks/erase_and_check.py evaluates on exactly those prompts.

Why erased negatives: erase-and-check asks the filter about fragments of every prompt ("Describe the
cultural significance of the", "How do plants adapt"). A filter trained on whole prompts only flags some of
those fragments, and each such false alarm makes a safe prompt look harmful. As in the paper, erased versions
of the training safe prompts are added as safe examples: every suffix erasure up to 20 tokens, plus a few
random contiguous-block (insertion-mode) and scattered-token (infusion-mode) erasures per prompt. Erased
harmful prompts are not used: a fragment of a harmful request may well be harmless.

The model is a logistic regression on normalised MiniLM embeddings (384 weights + bias) fitted by full-batch
L-BFGS with class-balanced weights and L2 regularisation.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectors.encoder import CachedEncoder  # noqa: E402
from detectors.harmful import (  # noqa: E402
    HARMFUL_PROMPTS,
    HEAD_FILE,
    SAFE_PROMPTS,
    HarmfulHead,
    prompts_digest,
    read_prompts,
)
from guard.certification import TokenizedPrompt, backend_tokenizer  # noqa: E402
from guard.models import load_sentence_encoder  # noqa: E402

ENCODER = "embedded:minilm"
SEED = 912  # the paper's split seed
HOLDOUT_FRACTION = 0.2
MAX_SUFFIX_ERASE = 20
RANDOM_ERASURES_PER_MODE = 6
MAX_INFUSION_ERASE = 4


def split(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices, held-out = ceil(20%) drawn at random."""
    order = rng.permutation(count)
    held = math.ceil(HOLDOUT_FRACTION * count)
    return np.sort(order[held:]), np.sort(order[:held])


def erased_safe_versions(prompts: list[str], tokenizer, rng: np.random.Generator) -> list[str]:  # noqa: ANN001
    """Suffix, block and scattered erasures of safe prompts: fragments erase-and-check will ask about."""
    fragments: list[str] = []
    for prompt in prompts:
        tokens = TokenizedPrompt(prompt, tokenizer)
        n = len(tokens)
        if n < 2:
            continue
        for erased in range(1, min(MAX_SUFFIX_ERASE, n - 1) + 1):
            fragments.append(tokens.render(range(n - erased)))
        for _ in range(RANDOM_ERASURES_PER_MODE):
            length = int(rng.integers(1, min(MAX_SUFFIX_ERASE, n - 1) + 1))
            start = int(rng.integers(0, n - length + 1))
            fragments.append(tokens.render([i for i in range(n) if not start <= i < start + length]))
            scattered = int(rng.integers(1, min(MAX_INFUSION_ERASE, n - 1) + 1))
            gone = set(rng.choice(n, size=scattered, replace=False).tolist())
            fragments.append(tokens.render([i for i in range(n) if i not in gone]))
    return list(dict.fromkeys(f for f in fragments if f))


def fit_logistic_regression(x: np.ndarray, y: np.ndarray, sample_weight: np.ndarray, l2: float,
                            seed: int) -> tuple[np.ndarray, float]:
    torch.manual_seed(seed)
    features = torch.from_numpy(x).double()
    labels = torch.from_numpy(y).double()
    weights = torch.from_numpy(sample_weight / sample_weight.sum()).double()
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], lr=1.0, max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                                  line_search_fn="strong_wolfe")

    def loss_fn() -> torch.Tensor:
        optimizer.zero_grad()
        logits = features @ w + b
        loss = (weights * torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")).sum()
        loss = loss + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    optimizer.step(loss_fn)
    return w.detach().numpy().astype(np.float32), float(b.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HEAD_FILE)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--l2", type=float, default=1e-3, help="L2 penalty on the weights (per unit sample weight).")
    args = parser.parse_args()

    started = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    harmful, safe = read_prompts(HARMFUL_PROMPTS), read_prompts(SAFE_PROMPTS)
    harmful_train, harmful_held = split(len(harmful), rng)
    safe_train, safe_held = split(len(safe), rng)

    encoder = CachedEncoder(load_sentence_encoder(ENCODER))
    tokenizer = backend_tokenizer(encoder)
    train_harmful = [harmful[i] for i in harmful_train]
    train_safe = [safe[i] for i in safe_train]
    fragments = [f for f in erased_safe_versions(train_safe, tokenizer, rng) if f not in set(train_safe)]
    print(f"training on {len(train_harmful)} harmful, {len(train_safe)} safe prompts and {len(fragments)} erased safe "
          f"fragments; holding out {len(harmful_held)} harmful and {len(safe_held)} safe prompts")

    texts = [*train_harmful, *train_safe, *fragments]
    vectors = encoder.encode(texts, batch_size=128, show_progress_bar=True)
    labels = np.concatenate([np.ones(len(train_harmful)), np.zeros(len(train_safe) + len(fragments))])
    # Harmful prompts carry half the total weight, whole safe prompts and fragments a quarter each.
    sample_weight = np.concatenate([np.full(len(train_harmful), 0.5 / len(train_harmful)),
                                    np.full(len(train_safe), 0.25 / len(train_safe)),
                                    np.full(len(fragments), 0.25 / len(fragments))])
    weight, bias = fit_logistic_regression(vectors, labels, sample_weight, args.l2, args.seed)

    head = HarmfulHead(weight=weight, bias=bias, threshold=0.0, encoder=ENCODER, seed=args.seed,
                       held_out_harmful=harmful_held, held_out_safe=safe_held,
                       harmful_digest=prompts_digest(harmful), safe_digest=prompts_digest(safe))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    head.save(args.out)

    train_logits = vectors @ weight + bias
    held_harmful, held_safe = head.held_out()
    held_logits = encoder.encode([*held_harmful, *held_safe]) @ weight + bias
    print(f"train accuracy: harmful {np.mean(train_logits[:len(train_harmful)] > 0):.3f}, "
          f"safe {np.mean(train_logits[len(train_harmful):len(train_harmful) + len(train_safe)] <= 0):.3f}, "
          f"fragments {np.mean(train_logits[len(train_harmful) + len(train_safe):] <= 0):.3f}")
    print(f"held-out accuracy: harmful {np.mean(held_logits[:len(held_harmful)] > 0):.3f}, "
          f"safe {np.mean(held_logits[len(held_harmful):] <= 0):.3f}")
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes) in {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
