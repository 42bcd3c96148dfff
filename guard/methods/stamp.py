"""Persistent removal for language models: closed-form edits of MLP down-projections (STAMP, STAMP-LR, AlphaEdit).

The inference-time guard protects only deployments that run it; a weight edit travels with the model file.
STAMP (RePAIR, arXiv 2604.12820) redirects the MLP activations of a concept's forget prompts toward a refusal
subspace with a closed-form least-squares update of the MLP weights; no code or full text of it exists, so this
follows the reconstruction in ALGORITHMS.md §5.3, with AlphaEdit's null-space projection (§5.4) as a variant.

For an MLP down-projection W (d_model x d_ff) at layer l:

* forget keys K_f: the MLP hidden activations (the down-projection's input) at every token of the forget prompts'
  user messages and of the chat template's tail, in the model's own chat format;
* target S, at the chat template's tail tokens (the last ``TAIL`` prompt tokens, which produce the answer's first
  token): s (mu_ref - h), moving each tail token's residual stream h toward the mean residual of the shipped
  "I don't know"-style reference prompts at the same position, s the strength (spread over the edited layers);
  the other forget tokens are left free. (Adding a difference-of-means refusal direction at every forget token
  instead garbled forget and retain answers alike on SmolLM2.)
* retain keys K_r: every token of a benign corpus (the shipped erase-and-check safe prompts), held at W K_r;
* preserved keys K_p: the forget keys of edits the source model already carries (recorded in its manifest), held
  at their current, already redirected outputs, so editing concept B keeps concept A erased.

Methods (ΔW = W' - W; m, n, p the key counts; mu = retain_weight balances the key counts; nu = ridge x mean
squared forget-key norm):

* ``stamp``: ΔW = S K_f^T (K_f K_f^T + mu m/n K_r K_r^T + mu m/p K_p K_p^T + nu I)^-1 (regularised least squares);
* ``stamp-lr``: the same solve restricted to the top-``rank`` left singular subspace U of K_f,
  ΔW = S K_f^T U (U^T A U)^-1 U^T, O(r^3 + r^2 d) instead of O(d^3);
* ``alphaedit``: P projects onto the complement of the retain keys' principal subspace (the eigenvectors of
  K_r K_r^T holding ``preserve_energy`` of its trace); ΔW = S K_f^T P ((K_p K_p^T + K_f K_f^T) P + nu I)^-1,
  which is exactly zero on that subspace.

Layers: the policy's ``layers``, else the ``layer_count`` layers in the first half of the network whose mean
forget and refusal activations (centred on the retain mean) are furthest apart in cosine, as STAMP chooses
layer 7 of Llama-3-8B. The second half is left out: a shift there has few layers left to turn into a refusal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from detectors.alias import AliasDetector
from guard.errors import WeightEditError
from guard.methods.registry import concepts_to_edit
from guard.policy import Concept, ConceptKind, Policy

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

LANGUAGE_KINDS = (ConceptKind.knowledge,)
METHOD_NAMES = ("stamp", "stamp-lr", "alphaedit")
DATA = Path(__file__).resolve().parents[1] / "data"
REFUSAL_REFERENCE = DATA / "stamp" / "refusal_reference.txt"
RETAIN_CORPUS = DATA / "erase-and-check" / "safe_prompts_train.txt"
RETAIN_BUFFER = 160  # corpus prompts whose keys are retained; later ones measure the edit on unseen benign prompts
HELD_OUT = 24  # unseen corpus prompts on which the retain drift is measured
CHOICE_PROMPTS = 24  # forget and retain prompts that rank the layers
# Forget prompts made from every alias, next to the concept's own exemplars.
TEMPLATES = ("Who is {name}?", "Tell me about {name}.", "What do you know about {name}?", "Describe {name}.")
_BATCH = 16
TAIL = 5  # last prompt tokens whose residual is kept (the chat template's tail ends every prompt)


@dataclass(frozen=True)
class ForgetConcept:
    """One concept as the edit sees it: its names (to measure leaks) and the prompts whose activations move."""

    concept_id: str
    names: tuple[str, ...]
    prompts: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.concept_id, "names": list(self.names), "prompts": list(self.prompts)}


@dataclass(frozen=True)
class StampPlan:
    """What one ``guard edit`` run on a language model solves; settings come from the policy, CLI overrides win."""

    concepts: tuple[ForgetConcept, ...]
    method: str
    layers: tuple[int, ...]  # empty: choose by separation
    layer_count: int
    strength: float
    retain_weight: float
    ridge: float
    rank: int
    preserve_energy: float

    def parameters(self) -> dict[str, Any]:
        return {"strength": self.strength, "retain_weight": self.retain_weight, "ridge": self.ridge,
                "rank": self.rank if self.method == "stamp-lr" else None,
                "preserve_energy": self.preserve_energy if self.method == "alphaedit" else None,
                "layer_choice": "given" if self.layers else f"top {self.layer_count} by forget/refusal separation",
                "retain_corpus": f"{RETAIN_CORPUS.name} (first {RETAIN_BUFFER} prompts)",
                "refusal_reference": REFUSAL_REFERENCE.name, "templates": list(TEMPLATES)}


def forget_prompts(concept: Concept) -> tuple[str, ...]:
    """The concept's exemplars, the questions of its forget store (the policy's pairs and the profile ``guard policy
    expand`` drew from the model's own answers), and every alias in each template, without repeats."""
    questions = [entry.question for entry in concept.forget_entries if entry.question]
    templated = [template.format(name=name) for name in concept.aliases for template in TEMPLATES]
    return tuple(dict.fromkeys([*concept.exemplars, *questions, *templated]))


def plan_from_policy(policy: Policy, concept_ids: Sequence[str] = (), method: str | None = None,
                     layers: Sequence[int] = ()) -> StampPlan:
    """Select concepts (the named ids, else every knowledge concept) and their shared settings."""
    chosen = concepts_to_edit(policy, concept_ids, LANGUAGE_KINDS)
    if method is not None and method not in METHOD_NAMES:
        raise WeightEditError(f"unknown method '{method}' for a language model (known: {', '.join(METHOD_NAMES)})")
    settings = chosen[0].methods.stamp
    for name in ("method", "layers", "layer_count", "strength", "retain_weight", "ridge", "rank", "preserve_energy"):
        values = {concept.id: getattr(concept.methods.stamp, name) for concept in chosen}
        if len({str(value) for value in values.values()}) > 1:
            listed = ", ".join(f"{concept_id}={value}" for concept_id, value in values.items())
            raise WeightEditError(f"methods.stamp.{name} differs between the selected concepts ({listed}); one joint "
                                  "solve needs one value: set it under defaults or edit them in separate runs")
    concepts = tuple(ForgetConcept(c.id, tuple(c.surface_forms), forget_prompts(c)) for c in chosen)
    return StampPlan(concepts=concepts, method=method or settings.method,
                     layers=tuple(layers) or tuple(settings.layers), layer_count=settings.layer_count,
                     strength=settings.strength, retain_weight=settings.retain_weight, ridge=settings.ridge,
                     rank=settings.rank, preserve_energy=settings.preserve_energy)


# ---------------------------------------------------------------------------------------------------------------
# Closed forms (float64; keys are columns)


def _ridge(forget_keys: Tensor, ridge: float) -> Tensor:
    scale = float((forget_keys * forget_keys).sum()) / forget_keys.shape[1]
    return ridge * scale * torch.eye(forget_keys.shape[0], dtype=forget_keys.dtype)


def _held(keys: Tensor, count: int, weight: float) -> Tensor:
    """weight x (forget count / own count) x K K^T: each group of held keys weighs as much as the forget keys."""
    if keys.shape[1] == 0:
        return torch.zeros(keys.shape[0], keys.shape[0], dtype=keys.dtype)
    return weight * count / keys.shape[1] * keys @ keys.T


def stamp_update(shift: Tensor, forget_keys: Tensor, retain_keys: Tensor, preserved_keys: Tensor,
                 retain_weight: float, ridge: float) -> Tensor:
    """min |ΔW K_f - S|^2 + mu m/n |ΔW K_r|^2 + mu m/p |ΔW K_p|^2 + nu |ΔW|^2, in closed form."""
    count = forget_keys.shape[1]
    normal = (forget_keys @ forget_keys.T + _held(retain_keys, count, retain_weight)
              + _held(preserved_keys, count, retain_weight) + _ridge(forget_keys, ridge))
    return torch.linalg.solve(normal, forget_keys @ shift.T).T  # the normal matrix is symmetric


def stamp_lowrank_update(shift: Tensor, forget_keys: Tensor, retain_keys: Tensor, preserved_keys: Tensor,
                         retain_weight: float, ridge: float, rank: int) -> Tensor:
    """The STAMP solve restricted to the top-``rank`` left singular subspace of the forget keys."""
    basis = torch.linalg.svd(forget_keys, full_matrices=False).U[:, :rank]
    count = forget_keys.shape[1]
    projected = {name: basis.T @ keys for name, keys in
                 (("forget", forget_keys), ("retain", retain_keys), ("preserved", preserved_keys))}
    scale = float((forget_keys * forget_keys).sum()) / count
    normal = (projected["forget"] @ projected["forget"].T + _held(projected["retain"], count, retain_weight)
              + _held(projected["preserved"], count, retain_weight)
              + ridge * scale * torch.eye(basis.shape[1], dtype=basis.dtype))
    return torch.linalg.solve(normal, projected["forget"] @ shift.T).T @ basis.T


def null_space_projector(retain_keys: Tensor, preserve_energy: float) -> Tensor:
    """I - V V^T, V the top eigenvectors of K_r K_r^T that together hold ``preserve_energy`` of its trace."""
    values, vectors = torch.linalg.eigh(retain_keys @ retain_keys.T)
    values, vectors = values.flip(0).clamp_min(0), vectors.flip(1)
    kept = int(torch.searchsorted(values.cumsum(0) / values.sum(), torch.tensor(preserve_energy, dtype=values.dtype)))
    basis = vectors[:, :kept + 1]
    return torch.eye(retain_keys.shape[0], dtype=retain_keys.dtype) - basis @ basis.T


def alphaedit_update(shift: Tensor, forget_keys: Tensor, retain_keys: Tensor, preserved_keys: Tensor,
                     ridge: float, preserve_energy: float) -> Tensor:
    """AlphaEdit: ΔW = S K_f^T P ((K_p K_p^T + K_f K_f^T) P + nu I)^-1, zero on the retain keys' principal subspace."""
    projector = null_space_projector(retain_keys, preserve_energy)
    normal = (preserved_keys @ preserved_keys.T + forget_keys @ forget_keys.T) @ projector + _ridge(forget_keys, ridge)
    # ΔW = S K_f^T P N^-1  <=>  N^T ΔW^T = P K_f S^T
    return torch.linalg.solve(normal.T, projector @ forget_keys @ shift.T).T


# ---------------------------------------------------------------------------------------------------------------
# Activations


def down_projections(model: "PreTrainedModel") -> list[nn.Linear]:
    """Every decoder layer's MLP down-projection (Llama/Mistral/Qwen layout), or a clear error."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    found = [getattr(getattr(layer, "mlp", None), "down_proj", None) for layer in layers or ()]
    if not found or not all(isinstance(linear, nn.Linear) and linear.bias is None for linear in found):
        raise WeightEditError(f"{type(model).__name__} has no bias-free mlp.down_proj in model.layers; the STAMP "
                              "edit supports Llama-style decoders (SmolLM2, Llama, Mistral, Qwen)")
    return found


class _Stop(Exception):
    """Raised by the hook on the deepest layer needed, so a forward pass stops there."""


@dataclass
class Activations:
    """Per layer: MLP keys at every selected token ([tokens, d_ff]) and the residual at each prompt's last token."""

    keys: dict[int, Tensor] = field(default_factory=dict)
    from_end: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # per key: 0 = a last token
    last_hidden: dict[int, Tensor] = field(default_factory=dict)


def chat_text(tokenizer: "PreTrainedTokenizerBase", prompt: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


@torch.no_grad()
def collect(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[str],
            layers: Sequence[int], keys: bool = True) -> Activations:
    """Run the prompts (chat format) up to the deepest layer; keep keys from the user message onward.

    Tokens before the user message (the system prompt) are identical for every prompt, so they carry nothing
    about the concept and would only fight the retain keys.
    """
    projections = down_projections(model)
    decoder = model.model.layers
    deepest = max(layers)
    found = Activations()
    pieces: dict[str, list[Tensor]] = {f"{kind}{layer}": [] for layer in layers for kind in ("k", "h")}
    selected: Tensor | None = None
    hooks = []
    ends: list[Tensor] = []

    def keep_keys(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
            pieces[f"k{layer}"].append(inputs[0][selected].to(torch.float64))
        return hook

    def keep_hidden(layer: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            pieces[f"h{layer}"].append(hidden[:, -TAIL:].to(torch.float64))
            if layer == deepest:
                raise _Stop
        return hook

    for layer in layers:
        if keys:
            hooks.append(projections[layer].register_forward_pre_hook(keep_keys(layer)))
        hooks.append(decoder[layer].register_forward_hook(keep_hidden(layer)))
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # the last token of every row is the prompt's last token
    try:
        for start in range(0, len(prompts), _BATCH):
            batch = list(prompts[start:start + _BATCH])
            texts = [chat_text(tokenizer, prompt) for prompt in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            width = encoded.input_ids.shape[1]
            mask = torch.zeros_like(encoded.input_ids, dtype=torch.bool)
            for row, (text, prompt) in enumerate(zip(texts, batch)):
                prefix = len(tokenizer(text[:text.index(prompt)], add_special_tokens=False).input_ids)
                length = int(encoded.attention_mask[row].sum())
                mask[row, width - length + prefix:] = True
            selected = mask
            ends.append((width - 1 - torch.arange(width)).expand_as(mask)[mask])
            try:
                positions = (encoded.attention_mask.cumsum(1) - 1).clamp_min(0)  # as generate() numbers them
                model.model(input_ids=encoded.input_ids.to(model.device),
                            attention_mask=encoded.attention_mask.to(model.device),
                            position_ids=positions.to(model.device), use_cache=False)
            except _Stop:
                pass
    finally:
        tokenizer.padding_side = padding_side
        for hook in hooks:
            hook.remove()
    found.from_end = torch.cat(ends)
    for layer in layers:
        if keys:
            found.keys[layer] = torch.cat(pieces[f"k{layer}"]).cpu()
        found.last_hidden[layer] = torch.cat(pieces[f"h{layer}"]).cpu()
    return found


def _centred_cosine(forget: Tensor, refusal: Tensor, retain: Tensor) -> float:
    centre = retain.mean(0)
    return float(torch.nn.functional.cosine_similarity(forget.mean(0) - centre, refusal.mean(0) - centre, dim=0))


# ---------------------------------------------------------------------------------------------------------------
# Measuring answers


@torch.no_grad()
def greedy_answers(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", prompts: Sequence[str],
                   max_new_tokens: int) -> list[str]:
    """Plain greedy chat answers (no guard), batched with left padding."""
    answers: list[str] = []
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    try:
        for start in range(0, len(prompts), _BATCH):
            texts = [chat_text(tokenizer, prompt) for prompt in prompts[start:start + _BATCH]]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)
            width = encoded.input_ids.shape[1]
            answers += [tokenizer.decode(row[width:], skip_special_tokens=True) for row in output]
    finally:
        tokenizer.padding_side = padding_side
    return answers


@dataclass(frozen=True)
class Measurement:
    """Greedy answers before and after the edit: forget prompts naming their concept, retain answers unchanged."""

    prompts: int
    max_new_tokens: int
    forget_named_before: float
    forget_named_after: float
    retain_identical: float

    def to_json(self) -> dict[str, Any]:
        return vars(self)


def measure_prompts(plan: StampPlan, count: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Up to ``count`` forget prompts per concept (exemplars first) and ``count`` unseen retain-corpus prompts."""
    forget = [(concept.concept_id, prompt) for concept in plan.concepts for prompt in concept.prompts[:count]]
    retain = read_lines(RETAIN_CORPUS)[RETAIN_BUFFER:RETAIN_BUFFER + count]
    return forget, retain


def read_lines(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------------------------
# Applying a plan


@dataclass(frozen=True)
class LayerEdit:
    layer: int
    name: str
    change_norm: float  # Frobenius norm of W' - W
    relative_change: float  # change_norm / |W|
    target_reached: float  # 1 - |ΔW K_f - S| / |S|: share of the redirection the solve achieves on the forget keys
    retain_drift: float  # |ΔW K| / |W K| over the held-out retain prompts' keys
    separation: float  # 1 - centred cosine of mean forget and refusal activations (what layer choice ranks)


@dataclass(frozen=True)
class StampResult:
    plan: StampPlan
    layers: tuple[LayerEdit, ...]
    separations: dict[int, float]
    forget_keys: int
    retain_keys: int
    preserved_keys: int
    edit_seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"layers": [vars(layer) for layer in self.layers],
                "separation_by_layer": {str(layer): value for layer, value in self.separations.items()},
                "forget_keys": self.forget_keys, "retain_keys": self.retain_keys,
                "preserved_keys": self.preserved_keys, "edit_seconds": self.edit_seconds}


def check_layers(layers: Sequence[int], total: int) -> None:
    """Every named layer exists in a decoder of ``total`` layers, or a clear error."""
    bad = [layer for layer in layers if not 0 <= layer < total]
    if bad:
        raise WeightEditError(f"layer {bad[0]} does not exist (the model has layers 0-{total - 1})")


def choose_layers(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", plan: StampPlan,
                  forget: Sequence[str], refusal: Sequence[str], retain: Sequence[str]) -> tuple[list[int], dict[int, float]]:
    """The plan's layers, or the ``layer_count`` most separated ones in the first half; separations of all."""
    total = len(down_projections(model))
    check_layers(plan.layers, total)
    candidates = sorted(set(plan.layers)) if plan.layers else list(range(1, max(2, total // 2)))
    seen = {name: collect(model, tokenizer, prompts, candidates, keys=False).last_hidden
            for name, prompts in (("forget", forget), ("refusal", refusal), ("retain", retain))}
    separations = {layer: 1 - _centred_cosine(*(seen[name][layer][:, -1] for name in ("forget", "refusal", "retain")))
                   for layer in candidates}
    if plan.layers:
        return sorted(set(plan.layers)), separations
    ranked = sorted(candidates, key=lambda layer: separations[layer], reverse=True)
    return sorted(ranked[:plan.layer_count]), separations


@torch.no_grad()
def apply_edit(model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", plan: StampPlan,
               preserved_prompts: Sequence[str] = (), progress: bool = True) -> StampResult:
    """Edit the model's down-projections in place; each layer takes its share of the redirection."""
    started = time.perf_counter()
    projections = down_projections(model)
    forget = [prompt for concept in plan.concepts for prompt in concept.prompts]
    refusal = read_lines(REFUSAL_REFERENCE)
    corpus = read_lines(RETAIN_CORPUS)
    retain, held_out = corpus[:RETAIN_BUFFER], corpus[RETAIN_BUFFER:RETAIN_BUFFER + HELD_OUT]
    with tqdm(total=3, desc="choosing layers", disable=not progress) as bar:
        layers, separations = choose_layers(model, tokenizer, plan, forget[::max(1, len(forget) // CHOICE_PROMPTS)], refusal,
                                           retain[:CHOICE_PROMPTS])
        bar.update(3)
    # One pass per prompt group collects every chosen layer (the targets are the unedited model's): a pass per
    # layer, so that later keys see earlier edits, cost as many passes as layers for no measurable gain.
    groups = {name: collect(model, tokenizer, prompts, layers) for name, prompts in
              (("forget", forget), ("refusal", refusal), ("retain", retain), ("held_out", held_out),
               ("preserved", preserved_prompts)) if prompts}
    edits: list[LayerEdit] = []
    counts = {"forget": 0, "retain": 0, "preserved": 0}
    for layer in tqdm(layers, desc=f"{plan.method} edit", unit="layer", disable=not progress):
        keys = {name: group.keys[layer].T for name, group in groups.items()}  # columns
        tail = groups["forget"].from_end < TAIL
        forget_keys = keys["forget"][:, tail]
        refusal_mean = groups["refusal"].last_hidden[layer].mean(0)  # [TAIL, d], per position from the end
        forget_hidden = groups["forget"].last_hidden[layer]  # [prompts, TAIL, d]; keys come in the same order
        shift = (plan.strength / len(layers)) * (refusal_mean[None] - forget_hidden).reshape(-1, refusal_mean.shape[1]).T
        empty = torch.zeros(forget_keys.shape[0], 0, dtype=torch.float64)
        retain_keys = keys["retain"]
        preserved_keys = keys["preserved"][:, groups["preserved"].from_end < TAIL] if "preserved" in keys else empty
        if plan.method == "stamp":
            update = stamp_update(shift, forget_keys, retain_keys, preserved_keys, plan.retain_weight, plan.ridge)
        elif plan.method == "stamp-lr":
            update = stamp_lowrank_update(shift, forget_keys, retain_keys, preserved_keys, plan.retain_weight,
                                          plan.ridge, plan.rank)
        else:
            update = alphaedit_update(shift, forget_keys, retain_keys, preserved_keys, plan.ridge, plan.preserve_energy)
        linear = projections[layer]
        weight = linear.weight.detach().to("cpu", torch.float64)
        linear.weight.copy_((weight + update).to(linear.weight.device, linear.weight.dtype))
        change = float(update.norm())
        edits.append(LayerEdit(
            layer=layer, name=f"model.layers.{layer}.mlp.down_proj", change_norm=change,
            relative_change=change / float(weight.norm()),
            target_reached=1 - float((update @ forget_keys - shift).norm() / shift.norm()),
            retain_drift=float((update @ keys["held_out"]).norm() / (weight @ keys["held_out"]).norm()),
            separation=separations[layer]))
        counts["forget"] += forget_keys.shape[1]
        counts["retain"] += retain_keys.shape[1]
        counts["preserved"] += preserved_keys.shape[1]
    return StampResult(plan=plan, layers=tuple(edits), separations=separations, forget_keys=counts["forget"],
                       retain_keys=counts["retain"], preserved_keys=counts["preserved"],
                       edit_seconds=time.perf_counter() - started)


def named_rate(answers: Sequence[tuple[str, str]], plan: StampPlan) -> float:
    """Share of (concept id, answer) pairs whose answer names its concept (obfuscation-aware alias matcher)."""
    detectors = {concept.concept_id: AliasDetector({concept.concept_id: list(concept.names)})
                 for concept in plan.concepts}
    if not answers:
        return 0.0
    return sum(bool(detectors[concept_id].detect([text]).flagged) for concept_id, text in answers) / len(answers)
