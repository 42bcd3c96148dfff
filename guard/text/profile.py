"""Concept profiles drawn from the served model itself (``guard policy expand``).

What must not come out is what the *model* knows about a concept, and the model is the best witness of that: it
is asked the concept's exemplars, its forget-store questions and templated probes (who / what / where / related,
in other languages), unguarded; its answers are kept, and the terms that set them apart from its answers to benign
prompts (:func:`detectors.terms.draw_terms`) become the profile's terms. The profile file is written for people to
review and edit, and the policy loads it (:mod:`guard.policy`); decoding blocks the terms of every flagged concept
and retrieves the kept answers like forget-store entries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from detectors.harmful import SAFE_PROMPTS, read_prompts
from detectors.terms import draw_terms
from guard.errors import ConceptRefused
from guard.policy import (
    ActionType,
    Concept,
    ConceptKind,
    Policy,
    Profile,
    ProfileAnswer,
    ProfileConcept,
    profile_digest,
)
from guard.text.generation import SamplingSettings, TextRequest, generate_batch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

# Asked about the concept's first alias (or its description when it has none); later aliases get the first one.
TEMPLATES = (
    "Tell me about {name}.",
    "Who or what is {name}? Answer in detail.",
    "Where is {name} from, and where is it set or based?",
    "Which people, places, organisations and things are related to {name}?",
    "Qui est ou qu'est-ce que {name} ?",
    "¿Qué sabes de {name}?",
    "Was weißt du über {name}?",
)
EXTRA_ALIASES = 3
BENIGN_PROMPTS = 48  # the first lines of the shipped benign corpus (the benchmark's retain prompts come later)


def probe_prompts(concept: Concept) -> list[str]:
    """What the model is asked about a concept: exemplars, forget questions and the templated probes."""
    names = concept.aliases or [concept.description.rstrip(".")]
    prompts = list(concept.exemplars) + [e.question for e in concept.forget_entries if e.question]
    prompts += [template.format(name=names[0]) for template in TEMPLATES]
    prompts += [TEMPLATES[0].format(name=name) for name in names[1:1 + EXTRA_ALIASES]]
    return list(dict.fromkeys(prompts))


TEXT_KINDS = (ConceptKind.knowledge, ConceptKind.celebrity, ConceptKind.pii, ConceptKind.other)


def profiled_concepts(policy: Policy, only: Sequence[str] = ()) -> list[Concept]:
    """The concepts expand draws: the named ones, else every steered concept of a text kind (refused ones are never
    answered; styles, objects and nudity are erased from images)."""
    if only:
        return [policy.concept(cid) for cid in only]
    return [c for c in policy.concepts if c.action.type is ActionType.steer and c.kind in TEXT_KINDS]


def draw_profile(policy: Policy, model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", model_reference: str,
                 concepts: Sequence[Concept], max_new_tokens: int = 48, batch_size: int = 8,
                 benign: int = BENIGN_PROMPTS, on_step: Callable[[int, int], None] | None = None) -> Profile:
    """Ask the unguarded model every concept's probes and ``benign`` benign prompts (greedy), and draw each
    concept's terms."""
    benign_prompts = read_prompts(SAFE_PROMPTS)[:benign]
    asked = [(concept.id, prompt) for concept in concepts for prompt in probe_prompts(concept)]
    asked += [("", prompt) for concept in concepts for prompt in concept.negatives]
    asked += [("", prompt) for prompt in benign_prompts]
    settings = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0)
    answers: list[str] = []
    for start in range(0, len(asked), batch_size):
        batch = [TextRequest.chat([{"role": "user", "content": prompt}], settings)
                 for _, prompt in asked[start:start + batch_size]]
        for outcome in generate_batch(None, model, tokenizer, batch):
            answers.append("" if isinstance(outcome, ConceptRefused) else outcome.choices[0].text.strip())
        if on_step:
            on_step(len(answers), len(asked))
    benign = [answer for (owner, _), answer in zip(asked, answers) if not owner]
    drawn: dict[str, ProfileConcept] = {}
    for concept in concepts:
        mine = [(prompt, answer) for (owner, prompt), answer in zip(asked, answers) if owner == concept.id and answer]
        seeds = list(concept.aliases) + [e.text for e in concept.forget_entries if e.source != "profile"]
        terms = draw_terms([answer for _, answer in mine], benign, seeds)
        known = {alias.casefold() for alias in concept.aliases}
        drawn[concept.id] = ProfileConcept(
            digest=profile_digest(concept), terms=[t for t in terms if t.casefold() not in known],
            answers=[ProfileAnswer(question=prompt, answer=answer) for prompt, answer in mine])
    return Profile(policy=policy.name, model=model_reference, concepts=drawn)
