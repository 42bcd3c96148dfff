"""Persistent removal for diffusion models: UCE closed-form cross-attention edits, hardened by RECE rounds.

The inference-time guard protects only deployments that run it; a weight edit travels with the model file.
UCE (Gandikota et al., WACV 2024) re-solves every cross-attention key/value projection in closed form so that
the concept's token embeddings produce what the anchor's embedding produced, while preserved prompts and (via
the ridge weight lambda) everything else stay where they were. RECE (Gong et al., ECCV 2024) then derives, also
in closed form, the embedding that makes the edited model reproduce the concept's original keys and values,
erases that embedding as well, and repeats.

Choices made here (ALGORITHMS.md §5 lists the published variants):

* Keys are the **last subject token** of each alias as written, as in the 2025 UCE script without its optional
  prompt expansion: on the tiny test pipeline the expansion templates ("painting by X", ...) spread the edit onto
  the template words and more than doubled the drift of unrelated prompts. The target of a key is the original
  output for the anchor's last subject token (the start token for the empty anchor, as in UCE). Erase scale is 1.
* Each anchor is preserved along with the policy's ``preserve`` prompts: the concept is meant to look like the
  anchor, so the anchor must keep looking like itself.
* Targets are always the **original** model's outputs, so later rounds cannot pull preserved prompts towards an
  already edited mapping. This also makes every layer's UCE solution W_l T for one d x d map T of text
  embeddings (:func:`uce_transform`), so one solve edits all layers. It shows why RECE exists: where T is
  invertible, the embedding T^-1 c gives concept c back exactly; :func:`revivability` measures how close an
  embedding of bounded norm gets.
* All selected concepts are solved jointly, so lambda and the RECE settings must agree between them.
* RECE rounds keep the UCE keys in the solve (without them a round undid the UCE edit on the tiny pipeline) and
  regularise towards the current edit, as RECE does.
* Reviving embeddings cover a name's rows from its last subject token to the end of the sequence, aligned with
  the anchor's rows from its last subject token (:meth:`EncodedPrompts.aligned`). Earlier rows hold partial
  names ("van" of "van Gogh") that mean something else on their own.
* ``--method null-space`` (as AlphaEdit and SPEED) restricts the update to the null space of the preserved keys:
  T = I + Δ with Δ p = 0 for every preserved key p, so preserved prompts keep their keys and values exactly
  instead of being traded off against the erasure. The preserved keys are the anchors, the ``preserve`` prompts
  and, as AlphaEdit's general-knowledge prior, every token (start to end-of-text) of the shipped benign image
  prompts; their null space is approximate (``null_space_tolerance``), since a large prior spans every direction.
* Round selection: RECE keeps the epoch with the lowest image-detector rate; without an image judge the edit
  keeps the round with the lowest worst-case :func:`revivability` over the edited concepts (round 0 = UCE only).
  RECE rounds do not always help (they raised revivability on an SD1.5-shaped random-weight pipeline), and then
  the UCE edit is what is kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from detectors.calibration import benign_image_prompts
from guard.errors import WeightEditError
from guard.methods.registry import concepts_to_edit
from guard.policy import Concept, ConceptKind, Policy

if TYPE_CHECKING:
    from diffusers import StableDiffusionPipeline

DIFFUSION_KINDS = (ConceptKind.style, ConceptKind.object, ConceptKind.nsfw, ConceptKind.celebrity)
ROUND_CRITERION = "lowest worst-case revivability over the edited concepts; round 0 is UCE alone"
_ENCODE_BATCH = 64
_SINGULAR = 1e-12  # smallest eigenvalue of the UCE normal matrix, relative to the largest, still counted as solvable
Solver = Literal["uce", "null-space"]
SOLVERS: tuple[Solver, ...] = ("uce", "null-space")


@dataclass(frozen=True)
class ConceptEdit:
    """One concept as UCE sees it: the names to erase, what they become, and what must not move."""

    concept_id: str
    kind: ConceptKind
    names: tuple[str, ...]
    anchor: str
    preserve: tuple[str, ...]
    preserve_scale: float


@dataclass(frozen=True)
class EditPlan:
    """What one ``guard edit`` run will solve; every field comes from the policy."""

    concepts: tuple[ConceptEdit, ...]
    lambda_: float
    rece_rounds: int
    rece_regularizer: float
    solver: Solver = "uce"
    null_space_tolerance: float = 0.01

    @property
    def method(self) -> str:
        base = "uce" if self.solver == "uce" else "uce-null-space"
        return f"{base}+rece" if self.rece_rounds else base


def plan_from_policy(policy: Policy, concept_ids: Sequence[str] = (), solver: Solver = "uce") -> EditPlan:
    """Select concepts (the named ids, else every style/object/nsfw/celebrity concept) and check they can be solved;
    ``solver`` is plain UCE or the null-space-preserving solve."""
    if solver not in SOLVERS:
        raise WeightEditError(f"unknown method '{solver}' (known: {', '.join(SOLVERS)})")
    chosen = concepts_to_edit(policy, concept_ids, DIFFUSION_KINDS)
    for concept in chosen:
        if not concept.aliases:
            raise WeightEditError(f"concept '{concept.id}' has no aliases: UCE edits the token embeddings of the "
                                  "concept's names, so add its names under 'aliases'")
    _check_shared_settings(chosen)
    _check_conflicts(chosen)
    settings = chosen[0].methods.uce
    edits = tuple(ConceptEdit(concept_id=c.id, kind=c.kind, names=tuple(c.aliases), anchor=c.anchor,
                              preserve=tuple(c.methods.uce.preserve), preserve_scale=c.methods.uce.preserve_scale)
                  for c in chosen)
    return EditPlan(concepts=edits, lambda_=settings.lambda_, rece_rounds=settings.rece_rounds,
                    rece_regularizer=settings.rece_regularizer, solver=solver,
                    null_space_tolerance=settings.null_space_tolerance)


def _check_shared_settings(concepts: Sequence[Concept]) -> None:
    for field in ("lambda_", "rece_rounds", "rece_regularizer", "null_space_tolerance"):
        values = {concept.id: getattr(concept.methods.uce, field) for concept in concepts}
        if len(set(values.values())) > 1:
            listed = ", ".join(f"{concept_id}={value}" for concept_id, value in values.items())
            raise WeightEditError(f"methods.uce.{field.rstrip('_')} differs between the selected concepts "
                                  f"({listed}); one joint solve needs one value: set it under defaults or edit "
                                  "them in separate runs")


def _check_conflicts(concepts: Sequence[Concept]) -> None:
    erased = {name.casefold(): concept.id for concept in concepts for name in concept.aliases}
    for concept in concepts:
        for kept in concept.methods.uce.preserve:
            if kept.casefold() in erased:
                raise WeightEditError(f"concept '{concept.id}' preserves '{kept}', which concept "
                                      f"'{erased[kept.casefold()]}' erases")
        if concept.anchor.casefold() in erased:
            raise WeightEditError(f"the anchor '{concept.anchor}' of concept '{concept.id}' is itself erased "
                                  f"(alias of '{erased[concept.anchor.casefold()]}')")


# ---------------------------------------------------------------------------------------------------------------
# Closed forms


def uce_transform(reference: Tensor, keys: Tensor, sources: Tensor, preserve_keys: Tensor, preserve_weights: Tensor,
                  lambda_: float) -> Tensor:
    """UCE eq. 7, solved once in embedding space: T = argmin lambda|T - ref|^2 + sum |T k - s|^2 + sum w |T p - p|^2.

    UCE solves, for every projection W_l, argmin_W lambda|W - W_l ref|^2 + sum |W k - W_l s|^2 + sum w |W p - W_l p|^2:
    each key k must give what the original layer gives for its source embedding s, each preserved embedding p
    what it gave before. All of these problems share the normal matrix lambda I + K^T K + P^T S P and differ only
    by the factor W_l on the left, so layer l's solution is exactly W_l T. Keys, sources and preserve keys are rows.
    """
    weighted = preserve_keys * preserve_weights[:, None]
    normal = lambda_ * torch.eye(keys.shape[1], dtype=keys.dtype) + keys.T @ keys + preserve_keys.T @ weighted
    spectrum = torch.linalg.eigvalsh(normal)
    if spectrum[0] <= _SINGULAR * spectrum[-1]:  # a near-singular solve returns garbage instead of failing
        raise WeightEditError(f"the UCE system is singular with lambda={lambda_} (fewer keys than embedding "
                              "dimensions); use lambda > 0")
    numerator = lambda_ * reference + sources.T @ keys + preserve_keys.T @ weighted
    return torch.linalg.solve(normal, numerator.T).T  # the normal matrix is symmetric


def null_space_projector(preserved: Tensor, prior: Tensor, tolerance: float) -> Tensor:
    """P onto the directions the edit may change: orthogonal to every ``preserved`` key (exactly), and within that,
    the approximate null space of the ``prior`` keys (rows): the eigenvectors of their Gram matrix whose eigenvalue
    is at most ``tolerance`` times the largest (AlphaEdit's construction). The explicitly preserved keys are taken
    out first, so a large prior cannot outvote them."""
    dim = preserved.shape[1]
    left, singular, _ = torch.linalg.svd(preserved.T, full_matrices=True)
    rank = int((singular > singular.max() * 1e-10).sum()) if len(singular) else 0
    basis = left[:, rank:] if rank else torch.eye(dim, dtype=preserved.dtype)  # the preserved keys' complement
    projected = prior @ basis
    values, vectors = torch.linalg.eigh(projected.T @ projected)
    null = basis @ vectors[:, values <= tolerance * values[-1]]
    return null @ null.T


def null_space_transform(reference: Tensor, keys: Tensor, sources: Tensor, projector: Tensor,
                         lambda_: float) -> Tensor:
    """T = ref + Δ P minimising lambda|Δ P|^2 + sum |T k - s|^2 (AlphaEdit's objective in embedding space).

    The closed form is Δ P = R Kᵀ P (K Kᵀ P + lambda I)^-1 with R = S - ref K (keys and sources as columns); it
    maps every preserved key p (P p = 0) to ref p, because (K Kᵀ P + lambda I) p = lambda p. As for UCE, layer l's
    solution of the same problem for W_l is W_l T, so one solve edits every layer. Keys and sources are rows.
    """
    if lambda_ <= 0:
        raise WeightEditError("the null-space solve needs lambda > 0")
    residual = sources.T - reference @ keys.T  # (d, n)
    spread = keys.T @ keys @ projector + lambda_ * torch.eye(keys.shape[1], dtype=keys.dtype)
    return reference + torch.linalg.solve(spread.T, (residual @ keys @ projector).T).T


def reviving_map(transform: Tensor, gram: Tensor, regularizer: float) -> Tensor:
    """RECE 'regzero' closed form: M with c' = M c minimising sum_l |W_l T c' - W_l c|^2 + reg |c'|^2.

    The edited layers are W_l T, so with G = sum_l W_l^T W_l the solution is (T^T G T + reg I)^-1 T^T G.
    """
    identity = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(transform.T @ gram @ transform + regularizer * identity, transform.T @ gram)


def revivability(transform: Tensor, gram: Tensor, concept_rows: Tensor, anchor_rows: Tensor,
                 reviving: Tensor) -> float:
    """How much of a concept the best reviving embedding restores: 1 - |W T c' - W c|^2 / |W a - W c|^2.

    Norms are summed over layers (through G = sum_l W_l^T W_l) and token rows. 1 means an embedding gives back
    the concept's original keys and values exactly; 0 or less means the best one gets no closer than the anchor.
    """
    rows = concept_rows.reshape(-1, concept_rows.shape[-1])
    miss = rows @ reviving.T @ transform.T - rows
    offset = anchor_rows.expand_as(concept_rows).reshape(-1, concept_rows.shape[-1]) - rows
    gap = ((offset @ gram) * offset).sum()
    if gap == 0:
        raise WeightEditError("a concept encodes exactly like its anchor; there is nothing to erase")
    return float(1 - ((miss @ gram) * miss).sum() / gap)


# ---------------------------------------------------------------------------------------------------------------
# Applying a plan to a pipeline


@dataclass(frozen=True)
class LayerChange:
    name: str
    change_norm: float  # Frobenius norm of W' - W
    relative_change: float  # change_norm / |W|


@dataclass(frozen=True)
class RoundMetrics:
    """Quality of the weights after one round (0 = UCE, r = after RECE round r)."""

    round: int
    revivability: dict[str, float]
    erase_residual: dict[str, float]  # max over names and matrices of |W' k - W a| / |W k - W a| (0: now the anchor)
    preserve_drift: float  # max over preserved prompts (anchors included) and matrices of |W' k - W k| / |W k|


@dataclass(frozen=True)
class EditResult:
    plan: EditPlan
    layers: tuple[LayerChange, ...]
    rounds: tuple[RoundMetrics, ...]
    best_round: int

    @property
    def best(self) -> RoundMetrics:
        return self.rounds[self.best_round]

    def to_json(self) -> dict[str, Any]:
        return {
            "best_round": self.best_round,
            "round_criterion": ROUND_CRITERION,
            "rounds": [vars(metrics) for metrics in self.rounds],
            "layers": [vars(layer) for layer in self.layers],
        }


def cross_attention_projections(unet: nn.Module) -> dict[str, nn.Linear]:
    """Every cross-attention (attn2) key and value projection, by module name."""
    from diffusers.models.attention_processor import Attention

    found: dict[str, nn.Linear] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            for part in ("to_k", "to_v"):
                linear = getattr(module, part)
                if not isinstance(linear, nn.Linear) or linear.bias is not None:
                    raise WeightEditError(f"{name}.{part} is not a bias-free linear projection; UCE supports "
                                          "Stable Diffusion 1.x/2.x style UNets")
                found[f"{name}.{part}"] = linear
    if not found:
        raise WeightEditError("the UNet has no cross-attention layers to edit")
    return found


@dataclass(frozen=True)
class EncodedPrompts:
    """Prompt embeddings exactly as the pipeline computes them (float64, CPU), with each last subject index."""

    rows: dict[str, Tensor]  # prompt -> [sequence length, d]
    subject: dict[str, int]  # prompt -> index of its last token before end-of-text (0, the start token, for '')

    @classmethod
    @torch.no_grad()
    def of(cls, pipe: "StableDiffusionPipeline", prompts: Sequence[str]) -> "EncodedPrompts":
        unique = list(dict.fromkeys(prompts))
        rows: dict[str, Tensor] = {}
        subject: dict[str, int] = {}
        for start in range(0, len(unique), _ENCODE_BATCH):
            batch = unique[start:start + _ENCODE_BATCH]
            tokens = pipe.tokenizer(batch, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
            embeds, _ = pipe.encode_prompt(batch, device=pipe.device, num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
            for prompt, embedding, count in zip(batch, embeds.to("cpu", torch.float64), tokens.attention_mask.sum(1)):
                rows[prompt], subject[prompt] = embedding, int(count) - 2
        return cls(rows=rows, subject=subject)

    def content_rows(self) -> Tensor:
        """Every prompt's rows from the start token to its end-of-text token, stacked: all the keys it feeds."""
        return torch.cat([self.rows[prompt][:self.subject[prompt] + 2] for prompt in self.rows])

    def keys(self, prompts: Sequence[str]) -> Tensor:
        """The last subject token's embedding of each prompt ([n, d]), UCE's keys."""
        return torch.stack([self.rows[prompt][self.subject[prompt]] for prompt in prompts])

    def aligned(self, names: Sequence[str], anchor: str) -> tuple[Tensor, Tensor]:
        """Rows from each name's last subject token to the end ([n, L, d]) and the anchor's rows aligned to them.

        This is the 2023 UCE alignment: the name's last token meets the anchor's last token, end-of-text meets
        end-of-text. Pairing by absolute position instead (as RECE does towards the empty prompt) sends a name's
        token to whatever word of the anchor happens to sit there, which fights the UCE keys.
        """
        prompts = (*names, anchor)
        starts = [self.subject[prompt] for prompt in prompts]
        length = self.rows[anchor].shape[0] - max(starts)
        rows = torch.stack([self.rows[prompt][start:start + length] for prompt, start in zip(prompts, starts)])
        return rows[:-1], rows[-1]


@torch.no_grad()
def apply_edit(pipe: "StableDiffusionPipeline", plan: EditPlan, progress: bool = True,
               prior_prompts: Sequence[str] | None = None) -> EditResult:
    """Edit ``pipe.unet`` in place: UCE, then ``plan.rece_rounds`` RECE rounds; keep the best round's weights.

    ``prior_prompts`` are the null-space solve's prior (default: the shipped benign image prompts).
    """
    projections = cross_attention_projections(pipe.unet)
    hidden = pipe.text_encoder.config.hidden_size
    mismatched = [name for name, linear in projections.items() if linear.in_features != hidden]
    if mismatched:
        raise WeightEditError(f"{mismatched[0]} reads {projections[mismatched[0]].in_features}-dim embeddings but the "
                              f"text encoder gives {hidden}; only single-encoder pipelines are supported")
    original = {name: linear.weight.detach().to("cpu", torch.float64).clone() for name, linear in projections.items()}
    gram = sum(weight.T @ weight for weight in original.values())

    names = [name for concept in plan.concepts for name in concept.names]
    owners = torch.tensor([index for index, concept in enumerate(plan.concepts) for _ in concept.names])
    anchors = [concept.anchor for concept in plan.concepts]
    preserve_scales: dict[str, float] = {}
    for concept in plan.concepts:
        for prompt in (*concept.preserve, concept.anchor):
            preserve_scales[prompt] = max(preserve_scales.get(prompt, 0.0), concept.preserve_scale)
    encoded = EncodedPrompts.of(pipe, [*names, *anchors, *preserve_scales])
    erase_keys = encoded.keys(names)
    erase_sources = encoded.keys(anchors)[owners]  # each key's target: the original output for its anchor
    preserve_keys = encoded.keys(list(preserve_scales))
    preserve_weights = torch.tensor(list(preserve_scales.values()), dtype=torch.float64)
    name_rows, anchor_rows = zip(*(encoded.aligned(concept.names, concept.anchor) for concept in plan.concepts))

    def measure(transform: Tensor, round_index: int) -> tuple[RoundMetrics, Tensor]:
        reviving = reviving_map(transform, gram, plan.rece_regularizer)
        revivable = {concept.concept_id: revivability(transform, gram, rows, anchor_rows[index], reviving)
                     for index, (concept, rows) in enumerate(zip(plan.concepts, name_rows))}
        left, start = erase_keys @ transform.T - erase_sources, erase_keys - erase_sources
        shift = preserve_keys @ transform.T - preserve_keys
        residual = torch.zeros(len(erase_keys), dtype=torch.float64)
        drift = torch.zeros(len(preserve_keys), dtype=torch.float64)
        tiny = torch.finfo(torch.float64).tiny  # zero gaps (an all-zero key) have zero numerators as well
        for weight in original.values():
            gap = (start @ weight.T).norm(dim=1).clamp_min(tiny)
            residual = torch.maximum(residual, (left @ weight.T).norm(dim=1) / gap)
            drift = torch.maximum(drift, (shift @ weight.T).norm(dim=1)
                                  / (preserve_keys @ weight.T).norm(dim=1).clamp_min(tiny))
        erase_residual = {concept.concept_id: float(residual[owners == index].max())
                          for index, concept in enumerate(plan.concepts)}
        metrics = RoundMetrics(round=round_index, revivability=revivable, erase_residual=erase_residual,
                               preserve_drift=float(drift.max()))
        return metrics, reviving

    if plan.solver == "null-space":
        prior = EncodedPrompts.of(pipe, benign_image_prompts() if prior_prompts is None else prior_prompts)
        projector = null_space_projector(preserve_keys, prior.content_rows(), plan.null_space_tolerance)

        def solve(reference: Tensor, keys: Tensor, sources: Tensor) -> Tensor:
            return null_space_transform(reference, keys, sources, projector, plan.lambda_)
    else:
        def solve(reference: Tensor, keys: Tensor, sources: Tensor) -> Tensor:
            return uce_transform(reference, keys, sources, preserve_keys, preserve_weights, plan.lambda_)

    transform = solve(torch.eye(hidden, dtype=torch.float64), erase_keys, erase_sources)
    metrics, reviving = measure(transform, 0)
    transforms, rounds = [transform], [metrics]
    for round_index in tqdm(range(1, plan.rece_rounds + 1), desc="RECE rounds", disable=not progress):
        revived_keys = torch.cat([(rows @ reviving.T).reshape(-1, hidden) for rows in name_rows])
        revived_sources = torch.cat([anchor_rows[index].expand_as(rows).reshape(-1, hidden)
                                     for index, rows in enumerate(name_rows)])
        transform = solve(transform, torch.cat([erase_keys, revived_keys]), torch.cat([erase_sources, revived_sources]))
        metrics, reviving = measure(transform, round_index)
        transforms.append(transform)
        rounds.append(metrics)

    best_round = min(range(len(rounds)), key=lambda index: max(rounds[index].revivability.values()))
    layers = []
    for name, linear in tqdm(projections.items(), desc="writing layers", unit="matrix", disable=not progress):
        edited = original[name] @ transforms[best_round]
        linear.weight.copy_(edited.to(linear.weight.device, linear.weight.dtype))
        change = float((edited - original[name]).norm())
        relative = change / float(original[name].norm())
        layers.append(LayerChange(name=name, change_norm=change, relative_change=relative))
    return EditResult(plan=plan, layers=tuple(layers), rounds=tuple(rounds), best_round=best_round)
