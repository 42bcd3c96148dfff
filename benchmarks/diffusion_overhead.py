"""Cost of the image guard: AdaVD per denoising step, Semantic Surgery per prompt, and whole generations.

    python benchmarks/diffusion_overhead.py                  # CPU: tiny pipeline + SD1.5-sized, ~3 minutes
    python benchmarks/diffusion_overhead.py --skip-sd15      # tiny pipeline only, seconds
    python benchmarks/diffusion_overhead.py --device cuda    # GPU: fp16, 512x512, 25 steps for the SD1.5-sized model

No diffusion weights exist offline, so both pipelines are built from configs with random weights (timing does not
depend on the weights): the tests' tiny pipeline, and one with Stable Diffusion 1.5's UNet (860M parameters), CLIP
ViT-L text encoder and VAE shapes (its CPU default is 128x128 and 2 steps so that it finishes in minutes). Both use
the tests' bag-of-words text encoder so the concept prompt is really detected and erased (checked). The policy is
tests/policies/diffusion_guard.yaml. Every guarded time is divided by the unguarded time of the same work,
measured in the same run and interleaved repetition by repetition. Ratios are given for the best repetition of
each (the least disturbed run on a shared machine) and for the medians. On the CPU, times are the process's CPU
time with one torch thread, so that other jobs on a shared machine do not distort the ratios.

* UNet step: one classifier-free-guidance UNet call with the original processors, with the AdaVD processors
  installed but nothing to erase (pass-through), and with one concept's value directions projected out.
* Semantic Surgery per prompt: presence scoring, plus the subtraction for a prompt with a concept (cold: the
  co-occurrence and anchor texts are encoded; warm: they are cached), as a ratio to one unguarded generation.
* Generation: the unguarded pipeline vs the guard on a prompt without and with a concept (surgery + AdaVD).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from tiny_pipeline import sd15_sized_pipeline, tiny_sd_pipeline  # noqa: E402
from tqdm import tqdm  # noqa: E402

from guard.images.pipeline import guard_pipeline  # noqa: E402
from guard.methods.adavd import AdaVD, ValueErasure, last_subject_embedding  # noqa: E402
from guard.methods.semantic_surgery import ErasureTarget, SemanticSurgery  # noqa: E402
from guard.policy import Policy, load_policy  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "diffusion_overhead.json"
POLICY = ROOT / "tests" / "policies" / "diffusion_guard.yaml"
ABSENT, PRESENT, CONCEPT = "a photo of a cat", "a painting by van gogh", "van-gogh-style"
console = Console(width=140)


def timed(work: Callable[[], Any], device: torch.device) -> float:
    """Seconds of ``work``: wall clock on a GPU; on the CPU, this process's CPU time (one thread), which other
    jobs sharing the machine do not inflate the way they inflate wall-clock time."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = time.perf_counter()
        work()
        torch.cuda.synchronize()
        return time.perf_counter() - start
    start = time.process_time()
    work()
    return time.process_time() - start


def bench_unet_step(pipe: Any, policy: Policy, size: int, repeats: int, device: torch.device) -> dict[str, Any]:
    """One CFG UNet call: original processors vs AdaVD pass-through vs AdaVD erasing one concept."""
    unet = pipe.unet
    latent = size // pipe.vae_scale_factor
    sample = torch.randn(2, unet.config.in_channels, latent, latent, device=device, dtype=unet.dtype)
    concept = policy.concept(CONCEPT)
    probe = concept.aliases[0]
    with torch.no_grad():
        conditional, negative = pipe.encode_prompt(PRESENT, device, 1, True)
        probe_sequence = pipe.encode_prompt(probe, device, 1, False)[0][0]
    condition = torch.cat([negative, conditional])
    ids = pipe.tokenizer(probe, padding="max_length", max_length=pipe.tokenizer.model_max_length).input_ids
    erasure = ValueErasure.build([last_subject_embedding(probe_sequence, ids, pipe.tokenizer.eos_token_id)],
                                 [concept.methods.adavd], classifier_free_guidance=True, labels=(probe,))

    def step() -> None:
        with torch.no_grad():
            unet(sample, 500, condition)

    def guarded_step(target: ValueErasure | None) -> float:
        """A step after a first one: targets are computed on a request's first step and reused after it."""
        adavd = AdaVD(unet)
        try:
            with adavd.erasing(target):
                step()
                return timed(step, device)
        finally:
            adavd.remove()

    measure = {"plain": lambda: timed(step, device), "passthrough": lambda: guarded_step(None),
               "adavd": lambda: guarded_step(erasure)}
    step()  # warm-up: kernel selection, allocator
    times: dict[str, list[float]] = {name: [] for name in measure}
    for repeat in tqdm(range(repeats), desc="UNet step", leave=False):
        names = list(measure)
        for name in names[repeat % 3:] + names[:repeat % 3]:  # rotate the order: no variant always runs first
            times[name].append(measure[name]())
    layers = len([m for m in unet.modules() if getattr(m, "is_cross_attention", False)])
    return {"cross_attention_layers": layers, "latent": latent, **summarise(times, ("passthrough", "adavd"))}


def summarise(times: dict[str, list[float]], guarded: tuple[str, ...]) -> dict[str, Any]:
    """Best and median seconds of every measurement, and each guarded one as a ratio to ``plain``."""
    result: dict[str, Any] = {}
    for name, values in times.items():
        result[f"{name}_best_s"] = min(values)
        result[f"{name}_median_s"] = statistics.median(values)
    for name in guarded:
        for statistic in ("best", "median"):
            result[f"{name}_{statistic}_ratio"] = result[f"{name}_{statistic}_s"] / result[f"plain_{statistic}_s"]
    return result


def generation_round(pipe: Any, policy: Policy, run: dict[str, Any], device: torch.device,
                     repeat: int) -> dict[str, float]:
    """One repetition of every generation-level measurement (the three generations in rotating order)."""
    reports = {}

    def plain() -> float:
        return timed(lambda: pipe(ABSENT, generator=torch.Generator("cpu").manual_seed(0), **run), device)

    def guarded(prompt: str) -> float:
        guarded_pipe = guard_pipeline(pipe, policy)  # installing (encoding the policy's probes) is not timed
        try:
            return timed(lambda: reports.__setitem__(prompt, guarded_pipe(prompt, seed=0, **run).report), device)
        finally:
            guarded_pipe.remove()

    measure = {"plain": plain, "absent": lambda: guarded(ABSENT), "present": lambda: guarded(PRESENT)}
    names = list(measure)
    times = {name: measure[name]() for name in names[repeat % 3:] + names[:repeat % 3]}
    if reports[ABSENT].value_erasure or not reports[PRESENT].value_erasure or not reports[PRESENT].surgery_strength:
        raise SystemExit(f"error: the benchmark prompts were not detected as expected: {reports}")

    # The text-side work the guard adds per prompt; a fresh SemanticSurgery has an empty text cache (cold).
    with guard_pipeline(pipe, policy) as text_side:
        surgery = SemanticSurgery(policy.concepts, text_side.encode)
        absent, present = text_side.encode([ABSENT]), text_side.encode([PRESENT])
    anchor = policy.concept(CONCEPT).anchor

    def surgery_for_present() -> None:
        found = next(p for p in surgery.presence(present) if p.concept_id == CONCEPT)
        surgery.erase(present, [ErasureTarget(s.probe.text, s.presence, anchor) for s in found.matched])

    times["presence"] = timed(lambda: surgery.presence(absent), device)
    times["surgery_cold"] = timed(surgery_for_present, device)
    times["surgery_warm"] = timed(surgery_for_present, device)
    return times


def bench_generation(pipe: Any, policy: Policy, size: int, steps: int, repeats: int,
                     device: torch.device) -> dict[str, Any]:
    """Whole generations (1 image): unguarded vs guarded without a concept vs guarded with one."""
    run = dict(num_inference_steps=steps, height=size, width=size, output_type="np")
    pipe(ABSENT, generator=torch.Generator("cpu").manual_seed(0), **run)  # warm-up
    rounds = [generation_round(pipe, policy, run, device, repeat)
              for repeat in tqdm(range(repeats), desc="generation", leave=False)]
    times = {name: [r[name] for r in rounds] for name in rounds[0]}
    return {"steps": steps, "size": size,
            **summarise(times, ("absent", "present", "presence", "surgery_cold", "surgery_warm"))}


def bench_config(name: str, pipe: Any, policy: Policy, size: int, steps: int, repeats: int,
                 device: torch.device) -> dict[str, Any]:
    console.print(f"[bold]{name}[/]: {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.1f}M UNet parameters, "
                  f"{size}x{size}, {steps} steps, {repeats} repeats, {pipe.unet.dtype}")
    return {"unet_step": bench_unet_step(pipe, policy, size, repeats, device),
            "generation": bench_generation(pipe, policy, size, steps, repeats, device)}


def print_table(results: dict[str, Any]) -> None:
    table = Table(title=f"Image guard overhead on {results['device']} (guarded / unguarded, same run)")
    for column in ("pipeline", "measurement", "unguarded", "guarded", "ratio (best)", "ratio (median)"):
        table.add_column(column, justify="left" if column in ("pipeline", "measurement") else "right")
    for name, config in results["configs"].items():
        step, generation = config["unet_step"], config["generation"]
        rows = [
            (step, "passthrough", "UNet step, AdaVD installed, nothing to erase"),
            (step, "adavd", f"UNet step, AdaVD erasing 1 concept ({step['cross_attention_layers']} layers)"),
            (generation, "presence", "Semantic Surgery presence, per prompt (vs generation)"),
            (generation, "surgery_cold", "Surgery presence + subtraction, cold (vs generation)"),
            (generation, "surgery_warm", "Surgery presence + subtraction, warm (vs generation)"),
            (generation, "absent", f"generation ({generation['steps']} steps), no concept in prompt"),
            (generation, "present", f"generation ({generation['steps']} steps), concept erased"),
        ]
        for measured, key, label in rows:
            table.add_row(name, label, f"{measured['plain_best_s'] * 1000:.1f} ms",
                          f"{measured[f'{key}_best_s'] * 1000:.2f} ms", f"{measured[f'{key}_best_ratio']:.3f}",
                          f"{measured[f'{key}_median_ratio']:.3f}")
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--skip-sd15", action="store_true", help="only the tiny pipeline")
    parser.add_argument("--sd15-size", type=int, help="image side for the SD1.5-sized pipeline (cpu 128, cuda 512)")
    parser.add_argument("--sd15-steps", type=int, help="denoising steps for the SD1.5-sized pipeline (cpu 2, cuda 25)")
    parser.add_argument("--repeats", type=int,
                        help="repetitions per measurement (tiny: 15; SD1.5-sized: cpu 3, cuda 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for torch (default 1: CPU time then measures the work, not the waiting)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda needs a CUDA build of torch and a GPU")
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    policy = load_policy(POLICY)
    results: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if gpu else f"CPU ({platform.processor() or platform.machine()}, "
                                                             f"threads={torch.get_num_threads()})",
        "torch": torch.__version__, "policy": str(POLICY.relative_to(ROOT)), "configs": {}}
    tiny = tiny_sd_pipeline().to(device)
    results["configs"]["tiny-sd"] = bench_config("tiny-sd", tiny, policy, 32, 4, args.repeats or 15, device)
    if not args.skip_sd15:
        console.print("building the SD1.5-sized pipeline from configs (random weights) ...")
        sd15 = sd15_sized_pipeline(dtype=torch.float16 if gpu else torch.float32).to(device)
        results["configs"]["sd15-sized"] = bench_config(
            "sd15-sized", sd15, policy, args.sd15_size or (512 if gpu else 128), args.sd15_steps or (25 if gpu else 2),
            args.repeats or (5 if gpu else 3), device)
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
