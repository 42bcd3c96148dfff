"""AdaVD (Wang et al., CVPR 2025): concept erasure in the value space of cross-attention.

Why value space: the attention map still decides *where* the prompt's tokens act, but what a token contributes is
its value vector; projecting the concept's value direction out of it removes the concept while the orthogonal
rest (everything else the token means) is kept. It needs no training and no extra UNet pass.

For every cross-attention layer with value projection W_v, a target concept gives the value direction
t = W_v e, where e is the concept's *last subject token* embedding (CLIP is causal, so that token has read the
whole concept phrase). AdaVD spreads e over every non-SOT position; since W_v acts token-wise, the spread target's
value is t at every one of those positions, so t is computed directly from e. For each prompt token j ≥ 1 with
value v_j (the SOT token is never edited):

* coordinates   w_j = the coordinates of v_j's projection onto span{t_1..t_n}, in the basis t_1..t_n
* shift         s_ij = c / (1 + exp(−a (cos(v_j, t_i) − b)))   (s ≡ 1 when ``adaptive`` is false)
* erased value  v'_j = v_j − Σ_i s_ij w_ij t_i

The defaults are the paper's a = 100, b = 0.93, c = 2: tokens whose value is closer to the concept's than b lose
up to twice their component, tokens well below b keep it (cos 0.90 → s ≈ 0.1). b is where a text encoder's
concept tokens part from its other tokens, so it is calibrated per model. The paper code's timestep gate is kept
(``decomp_timestep``: a target is erased only at scheduler timesteps above it); the UNet's timestep is read by a
forward pre-hook.

With s ≡ 1 this is the exact projection onto the orthogonal complement of the targets' span, for any number of
targets (the coordinates come from the pseudo-inverse, i.e. an orthogonalisation of the targets, not from the
original code's Gram–Schmidt shortcut that is exact only for two). Values are edited on the conditional
classifier-free-guidance branch only; the unconditional branch stays untouched.

:class:`AdaVDProcessor` wraps whatever processor a cross-attention layer already has (SDPA, xformers, IP-Adapter,
LoRA-patched projections): it edits the output of ``attn.to_v`` through a forward hook while the wrapped processor
runs, so the attention math itself stays the wrapped processor's.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from guard.errors import AdaVDError
from guard.policy import AdaVDSettings


def last_subject_embedding(sequence: torch.Tensor, input_ids: list[int], end_token_id: int) -> torch.Tensor:
    """The embedding of the token before the first end-of-text token (the concept phrase's last token)."""
    if end_token_id not in input_ids:
        raise AdaVDError("the target text has no end-of-text token; cannot find its last subject token")
    end = input_ids.index(end_token_id)
    if end < 2:
        raise AdaVDError("the target text encodes to no tokens")
    return sequence[end - 1]


@dataclass(frozen=True)
class ValueErasure:
    """One request's AdaVD targets and how the UNet batch is laid out."""

    embeddings: torch.Tensor  # (targets, text dim): last-subject-token embedding of each target
    a: torch.Tensor  # (targets,) shift steepness
    b: torch.Tensor  # (targets,) shift centre
    c: torch.Tensor  # (targets,) shift scale
    adaptive: torch.Tensor  # (targets,) bool: false = project the full component out
    decomp_timestep: tuple[int, ...]  # per target: erased only at UNet timesteps above this
    classifier_free_guidance: bool  # the batch is [unconditional; conditional]
    labels: tuple[str, ...] = ()

    @classmethod
    def build(cls, embeddings: list[torch.Tensor], settings: list[AdaVDSettings], classifier_free_guidance: bool,
              labels: tuple[str, ...] = ()) -> "ValueErasure":
        if len(embeddings) != len(settings) or not embeddings:
            raise ValueError("one AdaVD setting per target embedding, and at least one target")
        return cls(torch.stack(embeddings), *(torch.tensor([getattr(s, name) for s in settings])
                                              for name in ("a", "b", "c", "adaptive")),
                   decomp_timestep=tuple(s.decomp_timestep for s in settings),
                   classifier_free_guidance=classifier_free_guidance, labels=labels)

    def active(self, timestep: float | None) -> tuple[int, ...]:
        """The targets erased at ``timestep`` (all of them when no gate is set)."""
        if timestep is None:
            if any(self.decomp_timestep):
                raise AdaVDError("the UNet's timestep is unknown, so AdaVD's timestep gate cannot be applied")
            return tuple(range(len(self.decomp_timestep)))
        return tuple(i for i, gate in enumerate(self.decomp_timestep) if timestep > gate)

    def conditional_rows(self, batch: int) -> slice:
        if not self.classifier_free_guidance:
            return slice(None)
        if batch % 2:
            raise AdaVDError(f"classifier-free guidance needs an even UNet batch, got {batch}")
        return slice(batch // 2, None)


@dataclass(frozen=True)
class LayerTargets:
    """One layer's target value directions, on the layer's device, with everything the edit needs."""

    directions: torch.Tensor  # (n, d), float32
    coordinates: torch.Tensor  # (d, n): v @ coordinates = coordinates of v's projection onto span(directions)
    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    adaptive: torch.Tensor

    @classmethod
    def of(cls, values: torch.Tensor, erasure: ValueErasure, rows: tuple[int, ...] | None = None) -> "LayerTargets":
        """The targets ``rows`` (default: all) of ``erasure``, from their value directions ``values``."""
        index = torch.tensor(rows if rows is not None else range(len(values)), dtype=torch.long)
        directions = values.float()[index.to(values.device)]
        a, b, c, adaptive = (x[index].to(directions.device) for x in (erasure.a, erasure.b, erasure.c,
                                                                      erasure.adaptive))
        return cls(directions, torch.linalg.pinv(directions), a, b, c, adaptive)


def erase_value_components(values: torch.Tensor, targets: LayerTargets) -> torch.Tensor:
    """Remove the (shifted) components along the targets from ``values`` (..., tokens, d), the SOT token excepted."""
    work = values.float()
    coordinates = work @ targets.coordinates  # (..., tokens, n)
    cos = F.cosine_similarity(work.unsqueeze(-2), targets.directions, dim=-1)  # (..., tokens, n)
    shift = torch.where(targets.adaptive, targets.c * torch.sigmoid(targets.a * (cos - targets.b)),
                        torch.ones_like(cos))
    erased = work - (shift * coordinates) @ targets.directions
    erased[..., 0, :] = work[..., 0, :]
    return erased.to(values.dtype)


class _Session:
    """State shared by one installation's processors: is a guarded call running, and what does it erase."""

    def __init__(self) -> None:
        self.running = False
        self.erasure: ValueErasure | None = None
        self.timestep: float | None = None  # of the UNet call in progress


class AdaVDProcessor:
    """Cross-attention processor that edits the values the wrapped processor computes."""

    def __init__(self, inner: Any, session: _Session, layer: str):
        self.inner = inner
        self.layer = layer
        self.session = session
        parameters = inspect.signature(inner.__call__).parameters.values()
        self._inner_accepts = {p.name for p in parameters}
        self._inner_accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)
        self._cached: tuple[ValueErasure, dict[tuple[int, ...], LayerTargets]] | None = None

    def __call__(self, attn: torch.nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, scale: float | None = None,
                 ip_adapter_masks: torch.Tensor | None = None) -> torch.Tensor:
        # diffusers passes on only the cross_attention_kwargs named in this signature; the two optional ones are
        # those the SD-family processors (IP-Adapter) accept, forwarded when given.
        extra = {name: value for name, value in (("temb", temb), ("scale", scale),
                                                 ("ip_adapter_masks", ip_adapter_masks)) if value is not None}
        unknown = [name for name in extra if name not in self._inner_accepts and not self._inner_accepts_any]
        if unknown:
            raise AdaVDError(f"{type(self.inner).__name__} at {self.layer} does not accept {unknown}")
        session = self.session
        if not session.running:
            raise AdaVDError("this pipeline is guarded: call it through the guard (GuardedPipeline), or remove() the "
                             "guard first")

        def call_inner() -> torch.Tensor:
            return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **extra)

        erasure = session.erasure
        if erasure is None:
            return call_inner()
        if encoder_hidden_states is None:
            raise AdaVDError(f"{self.layer} was called without text conditioning; it is not a cross-attention layer")
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        active = erasure.active(session.timestep)
        if not active:  # gated off at this timestep
            return call_inner()
        targets = self._layer_targets(attn, erasure, text, active)
        edits = 0

        def edit_values(module: torch.nn.Module, inputs: tuple[Any, ...], values: torch.Tensor) -> torch.Tensor:
            nonlocal edits
            edits += 1
            rows = erasure.conditional_rows(values.shape[0])
            edited = values.clone()
            edited[rows] = erase_value_components(values[rows], targets)
            return edited

        handle = attn.to_v.register_forward_hook(edit_values)
        try:
            output = call_inner()
        finally:
            handle.remove()
        if edits == 0:
            raise AdaVDError(f"{type(self.inner).__name__} at {self.layer} does not compute values with attn.to_v "
                             "(fused projections?); AdaVD cannot edit them")
        return output

    def _layer_targets(self, attn: torch.nn.Module, erasure: ValueErasure, text: torch.Tensor,
                       active: tuple[int, ...]) -> LayerTargets:
        """t = W_v e for this layer's ``active`` targets, computed once per request and set of targets (values do
        not depend on the timestep)."""
        cached = self._cached
        if cached is None or cached[0] is not erasure:
            cached = (erasure, {})
            self._cached = cached
        by_rows = cached[1]
        if active not in by_rows:
            if getattr(attn, "norm_cross", None):
                raise AdaVDError(f"{self.layer} normalises the text before W_v; AdaVD targets are not defined there")
            with torch.no_grad():
                values = attn.to_v(erasure.embeddings.to(device=text.device, dtype=text.dtype))
            by_rows[active] = LayerTargets.of(values, erasure, active)
        return by_rows[active]


class AdaVD:
    """AdaVD installed on every cross-attention layer of a UNet; :meth:`remove` puts the original processors back."""

    def __init__(self, unet: torch.nn.Module):
        self._unet = unet
        self._session = _Session()
        processors = dict(unet.attn_processors)
        if any(isinstance(p, AdaVDProcessor) for p in processors.values()):
            raise AdaVDError("this UNet already has AdaVD installed")
        self.original = dict(processors)
        self.layers: list[str] = []
        for name, processor in processors.items():
            module = unet.get_submodule(name.removesuffix(".processor"))
            if getattr(module, "is_cross_attention", False):
                processors[name] = AdaVDProcessor(processor, self._session, name)
                self.layers.append(name)
        if not self.layers:
            raise AdaVDError("the UNet has no cross-attention layers to guard")
        unet.set_attn_processor(processors)
        self._timestep_hook = unet.register_forward_pre_hook(self._record_timestep, with_kwargs=True)

    def _record_timestep(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The timestep of each UNet call (its second argument), for the timestep gate."""
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        self._session.timestep = None if timestep is None else float(torch.as_tensor(timestep).flatten()[0])

    @contextmanager
    def erasing(self, erasure: ValueErasure | None) -> Iterator[None]:
        """Run guarded UNet calls; ``None`` lets every layer pass through unchanged (no concept to erase)."""
        if self._session.running:
            raise AdaVDError("a guarded call is already running on this pipeline; calls must not overlap")
        current = self._unet.attn_processors
        replaced = [name for name in self.layers
                    if not (isinstance(current[name], AdaVDProcessor) and current[name].session is self._session)]
        if replaced:
            raise AdaVDError(f"{len(replaced)} guarded attention processors were replaced after the guard was "
                             f"installed (e.g. {replaced[0]}); configure attention (slicing, xformers, LoRA) before "
                             "guarding")
        self._session.running, self._session.erasure = True, erasure
        try:
            yield
        finally:
            self._session.running, self._session.erasure, self._session.timestep = False, None, None

    def remove(self) -> None:
        """Restore the wrapped processors on the layers that still carry this installation's wrappers."""
        self._timestep_hook.remove()
        current = dict(self._unet.attn_processors)
        for name, processor in current.items():
            if isinstance(processor, AdaVDProcessor) and processor.session is self._session:
                current[name] = self.original[name]
        self._unet.set_attn_processor(current)
