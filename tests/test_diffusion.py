"""Guarded text-to-image pipelines (guard.images.pipeline, guard.methods.semantic_surgery, guard.methods.adavd) on tiny pipelines.

The pipelines come from tests/tiny_pipeline.py (random UNet/VAE, bag-of-words CLIP text encoders); the policy
thresholds in tests/policies/diffusion_guard.yaml are calibrated on them, and the first test asserts that.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from tiny_pipeline import tiny_sd_pipeline, tiny_sdxl_pipeline

from detectors.image_nsfw import ImageNsfwDetector
from guard.errors import AdaVDError, ConceptRefused, ModelError
from guard.images.pipeline import ImageGuard, ImageRefused, guard_pipeline, parse_size
from guard.methods.adavd import AdaVDProcessor, LayerTargets, ValueErasure, erase_value_components
from guard.methods.semantic_surgery import ErasureTarget
from guard.policy import AdaVDSettings, load_policy

POLICIES = Path(__file__).parent / "policies"
ABSENT = ["a photo of a cat", "a red car in the city", "a house on a mountain", "a blue bird",
          "a portrait of a woman wearing clothes"]
PRESENT = {"a painting by van gogh": "van-gogh-style", "a nude woman on the beach": "nudity",
           "a naked man": "nudity", "harry potter castle": "harry-potter", "a green dragon over a river": "dragons"}
RUN = dict(num_inference_steps=2, height=32, width=32, output_type="np")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU extra threads spin-wait for seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def policy():
    return load_policy(POLICIES / "diffusion_guard.yaml")


@pytest.fixture()
def pipe():
    return tiny_sd_pipeline()


def unguarded(pipe, prompt: str, seed: int = 3, n: int = 2) -> np.ndarray:
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    return pipe(prompt, generator=generators, num_images_per_prompt=n, **RUN).images


class ValueRecorder:
    """A cross-attention processor that records its text input and values, then attends with SDPA."""

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.attention = AttnProcessor2_0()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
        self.calls.append((encoder_hidden_states.clone(), attn.to_v(encoder_hidden_states).clone()))
        return self.attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_recorders(unet) -> dict[str, ValueRecorder]:
    processors = dict(unet.attn_processors)
    recorders = {name: ValueRecorder() for name in processors if name.endswith("attn2.processor")}
    processors.update(recorders)
    unet.set_attn_processor(processors)
    return recorders


def target_value(pipe, attn, text: str) -> torch.Tensor:
    """W_v of the text's last subject token, computed here independently of guard.methods.adavd."""
    ids = pipe.tokenizer(text).input_ids
    with torch.no_grad():
        sequence = pipe.encode_prompt(text, device=torch.device("cpu"), num_images_per_prompt=1,
                                      do_classifier_free_guidance=False)[0][0]
        return attn.to_v(sequence[len(ids) - 2])


def test_presence_is_below_threshold_for_absent_prompts_and_above_for_present(pipe, policy):
    with guard_pipeline(pipe, policy) as guarded:
        for prompt in ABSENT:
            for presence in guarded.detect(prompt):
                concept = policy.concept(presence.concept_id)
                assert not presence.active, (prompt, presence)
                assert presence.best.alpha < concept.methods.semantic_surgery.threshold, (prompt, presence)
        for prompt, concept_id in PRESENT.items():
            active = [p.concept_id for p in guarded.detect(prompt) if p.active]
            assert active == [concept_id], (prompt, active)


def test_absent_concepts_leave_images_bit_identical(pipe, policy):
    before = {prompt: unguarded(pipe, prompt) for prompt in ABSENT[:2]}
    with guard_pipeline(pipe, policy) as guarded:
        for prompt, images in before.items():
            output = guarded(prompt, num_images=2, seed=3, **RUN)
            assert np.array_equal(output.images, images)
            assert output.report.detections == [] and output.report.surgery_strength == 0.0
            assert output.report.value_erasure == []


def test_adavd_wraps_exactly_the_cross_attention_processors(pipe, policy):
    recorders = install_recorders(pipe.unet)
    before = dict(pipe.unet.attn_processors)
    guarded = guard_pipeline(pipe, policy)
    after = pipe.unet.attn_processors
    for name, processor in after.items():
        module = pipe.unet.get_submodule(name.removesuffix(".processor"))
        if module.is_cross_attention:
            assert isinstance(processor, AdaVDProcessor) and processor.inner is before[name]
        else:
            assert processor is before[name]
    cross = [name for name, module in pipe.unet.named_modules() if getattr(module, "is_cross_attention", False)]
    assert sorted(guarded.adavd.layers) == sorted(recorders) == sorted(f"{name}.processor" for name in cross)
    guarded("a painting by van gogh", seed=0, **RUN)
    assert all(len(recorder.calls) == 2 for recorder in recorders.values())  # one per denoising step
    assert all(call[0].shape == (2, 77, 128) for recorder in recorders.values() for call in recorder.calls)


def test_present_concept_value_component_is_removed_on_the_conditional_branch(pipe, policy):
    recorders = install_recorders(pipe.unet)
    guarded = guard_pipeline(pipe, policy)
    output = guarded("a painting by van gogh", seed=0, **RUN)
    assert output.report.value_erasure == ["Van Gogh"]
    with torch.no_grad():
        empty = pipe.encode_prompt("", device=torch.device("cpu"), num_images_per_prompt=1,
                                   do_classifier_free_guidance=False)[0]
    aligned_before = 0.0
    for name, recorder in recorders.items():
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        target = target_value(pipe, attn, "Van Gogh")
        for text, values in recorder.calls:
            with torch.no_grad():
                original = attn.to_v(text)
            assert torch.equal(text[0], empty[0])  # the unconditional embedding is not touched by surgery
            assert torch.equal(values[0], original[0])  # nor are its values
            assert torch.equal(values[1, 0], original[1, 0])  # the SOT token is never edited
            before = F.cosine_similarity(original[1, 1:], target, dim=-1).abs().max().item()
            after = F.cosine_similarity(values[1, 1:], target, dim=-1).abs().max().item()
            aligned_before = max(aligned_before, before)
            assert after < 1e-4, name
    assert aligned_before > 0.2  # there was a component to remove


def test_value_erasure_formula_single_and_multi_target():
    torch.manual_seed(0)
    values = torch.randn(2, 7, 16)
    targets = torch.randn(3, 16)
    settings = AdaVDSettings(a=10.0, b=0.1, c=1.5, adaptive=True)
    one = ValueErasure.build([torch.zeros(4)], [settings], classifier_free_guidance=False)
    erased = erase_value_components(values, LayerTargets.of(targets[:1], one))
    t = targets[0]
    cos = F.cosine_similarity(values, t, dim=-1)
    shift = 1.5 / (1 + torch.exp(-10.0 * (cos - 0.1)))
    expected = values - (shift * (values @ t) / (t @ t)).unsqueeze(-1) * t
    assert torch.allclose(erased[:, 1:], expected[:, 1:], atol=1e-5)
    assert torch.equal(erased[:, 0], values[:, 0])

    exact = AdaVDSettings(adaptive=False)
    three = ValueErasure.build([torch.zeros(4)] * 3, [exact] * 3, classifier_free_guidance=False)
    projected = erase_value_components(values, LayerTargets.of(targets, three))
    assert (projected[:, 1:] @ targets.T).abs().max() < 1e-4  # orthogonal to every target
    removed = (values - projected)[:, 1:].reshape(-1, 16)
    coefficients = torch.linalg.lstsq(targets.T, removed.T).solution
    assert torch.allclose(targets.T @ coefficients, removed.T, atol=1e-4)  # and only their span was removed


def test_surgery_lowers_the_prompts_cosine_to_the_concept(pipe, policy):
    with guard_pipeline(pipe, policy) as guarded:
        surgery = guarded.surgery
        prompt = surgery.embed("a painting by van gogh")
        before = next(p for p in surgery.presence(prompt) if p.concept_id == "van-gogh-style")
        edit = surgery.erase(prompt, [ErasureTarget("Van Gogh", before.presence, "a painting")])
        after = next(p for p in surgery.presence(edit.embeddings) if p.concept_id == "van-gogh-style")
        assert before.active and not after.active
        assert after.best.alpha < before.best.alpha - 0.3
        assert edit.strength == pytest.approx(before.presence) and edit.anchor_text == "a painting"
        assert surgery.erase(prompt, []).embeddings is prompt  # nothing active: the identity


def test_several_concepts_are_erased_with_one_co_occurrence_direction(pipe, policy):
    with guard_pipeline(pipe, policy) as guarded:
        report = guarded("a nude by van gogh", seed=0, **RUN).report
    strengths = {d.concept_id: d.presence for d in report.detections}
    assert set(strengths) == {"van-gogh-style", "nudity"}
    assert report.surgery_strength == pytest.approx(max(strengths.values()))
    assert report.erased_text == "Van Gogh, nude"  # strongest first, only the matched probes
    assert report.anchor_text == "a painting, a person wearing clothes"
    assert report.value_erasure == ["Van Gogh", "nude"]  # AdaVD: the matched probes only ("naked" is not there)
    every_alias = policy.model_copy(deep=True)
    for concept in every_alias.concepts:
        concept.methods.adavd.targets = "all"
    with guard_pipeline(pipe, every_alias) as guarded:
        assert guarded("a nude by van gogh", seed=0, **RUN).report.value_erasure == ["Van Gogh", "nude", "naked"]


def test_adavd_defaults_are_the_papers():
    settings = AdaVDSettings()
    assert (settings.a, settings.b, settings.c, settings.adaptive) == (100.0, 0.93, 2.0, True)
    assert (settings.decomp_timestep, settings.targets) == (0, "matched")


def test_adavd_timestep_gate_erases_only_above_decomp_timestep(pipe, policy):
    pipe.scheduler.set_timesteps(RUN["num_inference_steps"])
    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    assert timesteps[0] > 250 > timesteps[1]
    gated = policy.model_copy(deep=True)
    gated.concept("van-gogh-style").methods.adavd.decomp_timestep = 250
    recorders = install_recorders(pipe.unet)
    with guard_pipeline(pipe, gated) as guarded:
        guarded("a painting by van gogh", seed=0, **RUN)
    for name, recorder in recorders.items():
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        target = target_value(pipe, attn, "Van Gogh")
        (early_text, early), (late_text, late) = recorder.calls
        with torch.no_grad():
            assert not torch.allclose(early, attn.to_v(early_text))  # timestep 501 > 250: erased
            assert F.cosine_similarity(early[1, 1:], target, dim=-1).abs().max() < 1e-4
            assert torch.equal(late, attn.to_v(late_text))  # timestep 1 <= 250: untouched


def test_refuse_raises_before_generating_and_log_only_reports(pipe, policy):
    recorders = install_recorders(pipe.unet)
    logged_unguarded = unguarded(pipe, "a green dragon over a river")
    for recorder in recorders.values():
        recorder.calls.clear()
    with guard_pipeline(pipe, policy) as guarded:
        with pytest.raises(ConceptRefused) as refused:
            guarded("harry potter castle", **RUN)
        assert refused.value.concept_ids == ["harry-potter"]
        assert refused.value.message == "No wizards here (harry-potter)."
        assert all(not recorder.calls for recorder in recorders.values())
        logged = guarded("a green dragon over a river", num_images=2, seed=3, **RUN)
    assert [(d.concept_id, d.action) for d in logged.report.detections] == [("dragons", "log")]
    assert np.array_equal(logged.images, logged_unguarded)


def test_remove_restores_processors_and_outputs_bit_identically(pipe, policy):
    original = dict(pipe.unet.attn_processors)
    before = unguarded(pipe, "a painting by van gogh")
    guarded = guard_pipeline(pipe, policy)
    with pytest.raises(AdaVDError, match="guarded"):  # the bare pipeline cannot run while guarded
        pipe("a photo of a cat", **RUN)
    steered = guarded("a painting by van gogh", num_images=2, seed=3, **RUN).images
    assert not np.allclose(steered, before)
    guarded.remove()
    assert all(pipe.unet.attn_processors[name] is processor for name, processor in original.items())
    assert np.array_equal(unguarded(pipe, "a painting by van gogh"), before)


def test_fails_closed_when_the_processor_does_not_use_to_v(policy):
    pipe = tiny_sd_pipeline()
    pipe.unet.fuse_qkv_projections()  # fused processors compute keys and values with attn.to_kv
    with guard_pipeline(pipe, policy) as guarded:
        guarded("a photo of a cat", **RUN)  # nothing to erase: runs
        with pytest.raises(AdaVDError, match="to_v"):
            guarded("a painting by van gogh", **RUN)


def test_fails_closed_when_processors_are_replaced_after_guarding(pipe, policy):
    with guard_pipeline(pipe, policy) as guarded:
        pipe.enable_attention_slicing()  # swaps every attention processor for a sliced one
        with pytest.raises(AdaVDError, match="replaced"):
            guarded("a photo of a cat", **RUN)


def test_saved_guarded_pipeline_is_the_original_model_and_guards_again(pipe, policy, tmp_path):
    plain = unguarded(pipe, "a painting by van gogh")
    with guard_pipeline(pipe, policy) as guarded:
        steered = guarded("a painting by van gogh", num_images=2, seed=3, **RUN).images
        pipe.save_pretrained(tmp_path)
    reloaded = DiffusionPipeline.from_pretrained(tmp_path, local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    assert np.array_equal(unguarded(reloaded, "a painting by van gogh"), plain)  # the guard changed no weights
    with guard_pipeline(reloaded, policy) as guarded_again:
        assert np.array_equal(guarded_again("a painting by van gogh", num_images=2, seed=3, **RUN).images, steered)


def test_sdxl_pipeline(policy):
    pipe = tiny_sdxl_pipeline()
    before = unguarded(pipe, "a photo of a cat")
    recorders = install_recorders(pipe.unet)
    with guard_pipeline(pipe, policy) as guarded:
        assert np.array_equal(guarded("a photo of a cat", num_images=2, seed=3, **RUN).images, before)
        for recorder in recorders.values():
            recorder.calls.clear()
        prompt = guarded.surgery.embed("a painting by van gogh")
        edit = guarded.surgery.erase(prompt, [ErasureTarget("Van Gogh", 1.0, "a painting")])
        assert not torch.equal(edit.embeddings.pooled, prompt.pooled)  # the pooled added condition is edited too
        output = guarded("a painting by van gogh", seed=0, **RUN)
    assert [d.concept_id for d in output.report.detections] == ["van-gogh-style"]
    assert recorders and all(recorder.calls for recorder in recorders.values())
    for name, recorder in recorders.items():
        attn = pipe.unet.get_submodule(name.removesuffix(".processor"))
        target = target_value(pipe, attn, "Van Gogh")
        for _, values in recorder.calls:
            assert F.cosine_similarity(values[1, 1:], target, dim=-1).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


def test_image_guard_generates_png_with_report(model_dir, policy):
    guard = ImageGuard(model_dir, policy, device="cpu")
    result = guard.generate("a nude by van gogh", n=2, size="32x32", seed=5, steps=2)
    assert len(result.images) == 2 and (result.width, result.height) == (32, 32)
    for png in result.images:
        assert png.startswith(b"\x89PNG") and Image.open(io.BytesIO(png)).size == (32, 32)
    assert {d.concept_id for d in result.report.detections} == {"van-gogh-style", "nudity"}
    assert result.report.to_dict()["seed"] == 5
    with pytest.raises(ImageRefused):
        guard.generate("harry potter castle", size="32x32", steps=2)
    with pytest.raises(ValueError):
        guard.generate("a cat", size="30x32")


def test_image_guard_rejects_missing_and_unsupported_models(tmp_path, policy):
    with pytest.raises(ModelError, match="does not exist"):
        ImageGuard(tmp_path / "missing", policy)
    with pytest.raises(ModelError, match="cannot load"):
        ImageGuard(tmp_path, policy)
    assert parse_size("64x48") == (64, 48) and parse_size(None) is None


def test_image_check_regenerates_with_nudity_erased_then_refuses_what_stays_flagged(pipe, policy):
    with guard_pipeline(pipe, policy, detectors=[ImageNsfwDetector(threshold=1.0)]) as scores_only:
        first = scores_only("a photo of a cat", num_images=2, seed=3, **RUN).report
    assert len(first.image_scores["nsfw"]) == 2 and all(0.0 <= s < 1.0 for s in first.image_scores["nsfw"])
    assert first.regenerated == []

    # Threshold 0 flags every image: the guard regenerates each with the watching concept erased at strength
    # lambda_vis = 1 (the flag is binarised, as in the paper; the prompt itself carries no nudity), rescores them,
    # and refuses because they are still flagged (image_action: refuse, the default).
    with guard_pipeline(pipe, policy, detectors=[ImageNsfwDetector(threshold=0.0)]) as guarded:
        with pytest.raises(ImageRefused) as refused:
            guarded("a photo of a cat", num_images=2, seed=3, **RUN)
    report = refused.value.report
    assert refused.value.concept_ids == ["nudity"] and report.regenerated == [0, 1]
    assert [d.source for d in report.detections] == ["image"]
    assert report.regeneration_strengths == [1.0, 1.0]
    assert report.value_erasure == ["nude", "naked"] and len(report.image_scores["nsfw"]) == 2  # AdaVD too
    assert report.flagged_images == [0, 1] and report.image_action == "refuse"

    refusing = load_policy(POLICIES / "diffusion_nsfw_refuse.yaml")
    with guard_pipeline(pipe, refusing, detectors=[ImageNsfwDetector(threshold=0.0)]) as guarded:
        with pytest.raises(ImageRefused) as refused:
            guarded("a photo of a cat", seed=3, **RUN)
    assert refused.value.concept_ids == ["nudity"] and refused.value.report.regenerated == []


def neighbour_difference(images: np.ndarray) -> float:
    """Mean absolute difference of horizontally adjacent pixels: high for the tiny VAE's noise, low once blurred."""
    return float(np.abs(np.diff(images, axis=-2)).mean())


def test_flagged_images_without_an_nsfw_concept_are_refused_or_meet_the_image_action(pipe, policy):
    """Open-NSFW flags every image at threshold 0. With no nsfw concept nothing can erase it: the default
    image_action refuses (fail closed), blur and black replace the image, flag serves it and names it."""
    no_nsfw = policy.model_copy(update={"concepts": [c for c in policy.concepts if c.kind.value != "nsfw"]})
    plain = unguarded(pipe, "a photo of a cat")
    with guard_pipeline(pipe, no_nsfw, detectors=[ImageNsfwDetector(threshold=0.0)]) as guarded:
        with pytest.raises(ImageRefused) as refused:
            guarded("a photo of a cat", num_images=2, seed=3, **RUN)
    assert refused.value.concept_ids == ["image-nsfw"] and refused.value.stage == "output"
    assert refused.value.report.regenerated == [] and refused.value.report.flagged_images == [0, 1]
    assert "image-nsfw" in refused.value.message

    served = {}
    for action in ("blur", "black", "flag"):
        acting = no_nsfw.model_copy(update={"image_action": action})
        with guard_pipeline(pipe, acting, detectors=[ImageNsfwDetector(threshold=0.0)]) as guarded:
            output = guarded("a photo of a cat", num_images=2, seed=3, **RUN)
        assert output.report.flagged_images == [0, 1] and output.report.image_action == action
        served[action] = output.images
    assert np.array_equal(served["flag"], plain)
    assert not served["black"].any()
    assert served["blur"].shape == plain.shape
    assert neighbour_difference(served["blur"]) < neighbour_difference(plain) / 4


class FirstLook:
    """An image detector that flags every image it is shown the first time, and none after: what a detector sees
    when the regeneration removed the concept."""

    def __init__(self, name: str) -> None:
        self.name, self.threshold, self.calls = name, 0.5, 0

    def scores(self, images) -> list[float]:
        self.calls += 1
        return [1.0 if self.calls == 1 else 0.0] * len(images)


def test_visual_feedback_takes_any_image_detector_per_concept(pipe, policy):
    """A concept names the detector that watches it; its flag regenerates the image with that concept erased at
    lambda_vis (binarised), and the second look is clean, so the regenerated images are served."""
    plain = unguarded(pipe, "a photo of a cat")
    watched = policy.model_copy(deep=True)
    feedback = watched.concept("van-gogh-style").methods.semantic_surgery.visual_feedback
    feedback.enabled, feedback.detector, feedback.strength = True, "style-check", 0.7
    with guard_pipeline(pipe, watched, detectors=[FirstLook("style-check")]) as guarded:
        output = guarded("a photo of a cat", num_images=2, seed=3, **RUN)
    report = output.report
    assert report.regenerated == [0, 1] and report.regeneration_strengths == [0.7, 0.7]
    assert [(d.concept_id, d.source) for d in report.detections] == [("van-gogh-style", "image")]
    assert report.value_erasure == ["Van Gogh"] and report.flagged_images == []
    assert report.image_scores == {"style-check": [0.0, 0.0]}
    assert not np.allclose(output.images, plain)

    # Switched off for the concept, nothing answers for the detector's flags: the image action (refuse) applies.
    with guard_pipeline(pipe, policy, detectors=[FirstLook("style-check")]) as guarded:
        with pytest.raises(ImageRefused) as refused:
            guarded("a photo of a cat", num_images=2, seed=3, **RUN)
    assert refused.value.concept_ids == ["image-style-check"] and refused.value.report.regenerated == []
