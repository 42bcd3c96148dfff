"""Policy files: schema, loading, composition and error reporting.

A policy is the contract between a safety team and the guard, so this module is the only place that
knows its shape. Loading either returns a fully validated, fully resolved :class:`Policy` (defaults
merged into every concept, included files composed) or raises :class:`PolicyError` whose message
names file, line and field — a bad policy must never become a silently weaker guard. A policy may reference a
calibration file (written by ``guard policy calibrate``) whose per-concept thresholds are applied at load time,
and only while they still match the concepts and the embedding model they were measured for.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from guard.errors import PolicyError


def _between_0_and_1(value: float) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


def _non_negative(value: float) -> float:
    if value < 0:
        raise ValueError("must be 0 or greater")
    return value


Fraction = Annotated[float, AfterValidator(_between_0_and_1), Field(json_schema_extra={"minimum": 0, "maximum": 1})]
NonNegative = Annotated[float, AfterValidator(_non_negative), Field(json_schema_extra={"minimum": 0})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ConceptKind(str, Enum):
    knowledge = "knowledge"
    style = "style"
    object = "object"
    nsfw = "nsfw"
    harmful = "harmful"
    pii = "pii"
    celebrity = "celebrity"
    other = "other"


class ActionType(str, Enum):
    refuse = "refuse"  # block the request/response with the policy message
    steer = "steer"  # apply erasure (penalties, surgery) and answer anyway
    log = "log"  # only record the match


class Action(_Strict):
    type: ActionType = ActionType.refuse
    message: str = "This request touches content that the deployment policy does not allow ({concepts})."
    fallback: str | None = Field(
        None, description="steer only: the answer sent (finish_reason 'stop') when the output still names the "
                          "concept after its regenerations, instead of blocking it with content_filter.")

    @model_validator(mode="after")
    def _fallback_steers(self) -> "Action":
        """A fallback replaces a steered answer; on refuse or log it would silently do nothing, so it is an error."""
        if self.fallback is not None and self.type is not ActionType.steer:
            raise ValueError("action.fallback is only allowed with action.type 'steer'")
        if self.fallback is not None and not self.fallback.strip():
            raise ValueError("action.fallback must not be empty")
        return self


class DetectionSettings(_Strict):
    """How the request classifier decides a concept is touched."""

    semantic_threshold: Fraction = Field(0.55, description="Cosine similarity to an exemplar that flags the concept.")
    negative_margin: NonNegative = Field(
        0.0, description="A match is suppressed when a negative exemplar is closer by more than this margin.")
    aliases: bool = Field(True, description="Match aliases with obfuscation-aware normalisation.")


class TokenPenaltySettings(_Strict):
    """GUARD-style decoding penalties for language models."""

    enabled: bool = True
    apply: Literal["flagged", "always"] = Field(
        "flagged", description="'flagged': only when the classifier flags the request (adaptive); 'always': every request.")
    soft_penalty: NonNegative = Field(4.0, description="Logit penalty scaled by a token's similarity to the concept.")
    semantic_threshold: Fraction = Field(
        0.6, description="Vocabulary tokens at least this similar to a concept word get the soft penalty.")
    hard_block: bool = Field(True, description="Forbid completing any alias token sequence.")
    block_ratio: Annotated[float, Field(gt=0, le=1)] = Field(
        0.75, description="Block a token once the text would hold this fraction of an alias (GUARD's beta; never "
                          "fewer than 6 characters); 1 blocks only the token that completes it.")
    max_regenerations: int = Field(1, ge=0, le=5, description="Regenerations with stronger penalties after an output leak.")
    forget_top_k: int = Field(2, ge=0, le=20, description="Forget-store entries retrieved per flagged request (closest "
                                                          "to it); their distinctive n-grams are blocked like aliases.")
    semantic_block: Fraction = Field(
        0.8, description="On a flagged request, vocabulary words at least this similar (sentence encoder) to one of "
                         "its forbidden words are blocked too (GUARD's delta); less similar ones keep the soft penalty.")


class VisualFeedbackSettings(_Strict):
    """Semantic Surgery's visual feedback (step D): an image detector watches the generated images for the concept."""

    enabled: bool = Field(False, description="Watch this concept's images with ``detector``: a flagged image is "
                                             "regenerated with the concept erased (steer), refuses the request "
                                             "(refuse) or is reported (log).")
    detector: str = Field("nsfw", min_length=1, description="Name of the image detector ('nsfw': Open-NSFW, on with "
                                                            "guard serve --image-nsfw-threshold).")
    strength: NonNegative = Field(1.0, description="lambda_vis: the erasure strength of a concept seen only in the "
                                                   "image (detections are binarised as in the paper: 1 at or above "
                                                   "the detector's threshold, else 0).")


class SemanticSurgerySettings(_Strict):
    """Semantic Surgery for diffusion prompt embeddings (threshold t on mean token cosine, sigmoid scale gamma)."""

    enabled: bool = True
    threshold: Fraction = 0.12
    gamma: Annotated[float, Field(gt=0)] = 0.02
    activation: Fraction = Field(0.5, description="Presence score at or above which the concept is erased (tau).")
    visual_feedback: VisualFeedbackSettings = Field(default_factory=VisualFeedbackSettings)


class AdaVDSettings(_Strict):
    """AdaVD value-space projection; shift s = c / (1 + exp(-a (cos - b))). Defaults are the paper's (SD 1.4)."""

    enabled: bool = True
    a: float = Field(100.0, description="Steepness of the shift (the paper's p).")
    b: float = Field(0.93, description="Centre of the shift (the paper's epsilon): the cosine between a token's value "
                                       "and the concept's at which the token loses exactly its component. It depends "
                                       "on the text encoder: `guard policy calibrate --image-model` measures it.")
    c: NonNegative = Field(2.0, description="Largest shift (the paper's s): tokens far above b lose up to c times "
                                            "their component.")
    adaptive: bool = Field(True, description="Use the adaptive shift; false projects out the full component.")
    decomp_timestep: int = Field(
        0, ge=0, description="Erase only at scheduler timesteps above this (the paper code's decomp_timestep; 0 "
                             "erases at every step of the usual schedulers, 500 only in the first, noisier half).")
    targets: Literal["matched", "all"] = Field(
        "matched", description="Whose value directions are projected out: 'matched' the concept's aliases found in "
                               "the prompt (all of them for a concept seen only in an image), 'all' every alias of "
                               "every erased concept (a wider subspace: more erased, less kept).")


class UCESettings(_Strict):
    """Closed-form cross-attention edit (UCE) with optional RECE rounds."""

    preserve: list[str] = Field(default_factory=list, description="Concepts whose mapping must stay fixed.")
    preserve_scale: NonNegative = 1.0
    lambda_: NonNegative = Field(0.5, alias="lambda", description="Regulariser keeping the edit close to the original.")
    rece_rounds: int = Field(0, ge=0, le=20)
    rece_regularizer: Annotated[float, Field(gt=0)] = Field(
        0.1, description="RECE ridge weight on the reviving embedding (0.1 nudity, 1e-3 styles and hard objects).")
    null_space_tolerance: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.01, description="`guard edit --method null-space`: directions along which the preserved keys' Gram matrix "
                          "has at most this fraction of its largest eigenvalue count as their null space, the only "
                          "directions the edit may change.")


class StampSettings(_Strict):
    """Closed-form MLP down-projection edit for language models (STAMP, its low-rank variant, AlphaEdit)."""

    method: Literal["stamp", "stamp-lr", "alphaedit"] = Field(
        "stamp", description="'stamp': regularised least squares with a retain buffer; 'stamp-lr': the same "
                             "restricted to the forget keys' top singular subspace; 'alphaedit': null-space "
                             "projection that leaves the retain keys' principal subspace untouched.")
    layers: list[Annotated[int, Field(ge=0)]] = Field(
        default_factory=list, description="Decoder layers to edit; empty chooses by forget/refusal separation.")
    layer_count: int = Field(2, ge=1, le=8, description="How many layers the automatic choice edits.")
    strength: NonNegative = Field(1.5, description="How far the forget prompts' last tokens move toward the refusal "
                                                   "reference (1 = all the way; spread over the edited layers).")
    retain_weight: NonNegative = Field(10.0, description="Weight of the retain-buffer keys against the forget keys.")
    ridge: Annotated[float, Field(gt=0)] = Field(
        0.1, description="Ridge weight keeping the edit small, relative to the mean squared forget-key norm.")
    rank: int = Field(64, ge=1, description="stamp-lr: rank of the update.")
    preserve_energy: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.9, description="alphaedit: share of the retain keys' energy whose subspace the edit must not touch.")


class MethodSettings(_Strict):
    token_penalty: TokenPenaltySettings = Field(default_factory=TokenPenaltySettings)
    semantic_surgery: SemanticSurgerySettings = Field(default_factory=SemanticSurgerySettings)
    adavd: AdaVDSettings = Field(default_factory=AdaVDSettings)
    uce: UCESettings = Field(default_factory=UCESettings)
    stamp: StampSettings = Field(default_factory=StampSettings)


class CertifySettings(_Strict):
    """erase-and-check certification of the request classifier (Kumar et al.)."""

    mode: Literal["suffix", "insertion", "infusion"] = "suffix"
    max_erase: int = Field(10, ge=0, le=100, description="Largest adversarial token count d that is certified.")
    max_insertions: int = Field(1, ge=1, le=5, description="Inserted blocks k for insertion mode.")
    variant: Literal["exact", "randomized", "greedy"] = "exact"
    sample_fraction: Fraction = Field(0.2, description="Fraction of erased subsequences checked by the randomized variant.")
    filter: Literal["policy", "harmful_classifier", "both"] = "both"
    scope: Literal["all_messages", "last_user_message"] = Field(
        "all_messages", description="What a chat request certifies: every message joined (suffix attacks on any turn "
                                    "land at its end), or only the last user message (cheaper for insertion/infusion;"
                                    " earlier turns get the ordinary checks).")


class LanguageSettings(_Strict):
    """What happens to requests in languages the policy's detectors do not read (detectors/language.py)."""

    covered: list[Annotated[str, Field(pattern=r"^[a-z]{2,3}$")]] = Field(
        default_factory=lambda: ["en"], min_length=1,
        description="ISO 639 codes of the languages the detectors read (the shipped all-MiniLM-L6-v2 encoder and "
                    "harmful head: English only).")
    uncovered: Literal["refuse", "flag", "allow"] = Field(
        "flag", description="A request with a sentence in another language: 'refuse' it (400), 'flag' it (answered "
                            "after the usual checks, named in the x-guard-language header and the decision log), "
                            "or 'allow' it (the header still names the language).")
    min_confidence: Fraction = Field(
        0.8, description="How sure the language detector must be before a sentence counts as written in a language.")


class Defaults(_Strict):
    """Policy-wide settings; every concept inherits them and may override any part."""

    action: Action = Field(default_factory=Action)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    methods: MethodSettings = Field(default_factory=MethodSettings)


class ForgetPair(_Strict):
    """A question and the answer that must not come out (GUARD retrieves the answer closest to the prompt)."""

    question: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class ForgetFile(_Strict):
    """A text file of forget passages, relative to the policy file that names it; blank lines separate passages."""

    file: str = Field(min_length=1)


def _forget_kind(item: Any) -> str:
    """Which forget item a YAML value means, so a mistake is reported against that shape only."""
    if isinstance(item, (dict, ForgetFile, ForgetPair)):
        return "forget-file" if isinstance(item, ForgetFile) or (isinstance(item, dict) and "file" in item) \
            else "forget-pair"
    return "forget-passage"


ForgetItem = Annotated[Annotated[Annotated[str, Field(min_length=1)], Tag("forget-passage")]
                       | Annotated[ForgetPair, Tag("forget-pair")] | Annotated[ForgetFile, Tag("forget-file")],
                       Discriminator(_forget_kind)]


@dataclass(frozen=True)
class ForgetEntry:
    """One resolved forget-store entry: the answer or passage, and the question it answers (if given)."""

    text: str
    question: str | None = None
    source: str = "policy"  # policy | file | profile (the served model's own answer, from `guard policy expand`)


class Concept(_Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    kind: ConceptKind
    description: str = Field(min_length=1)
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    alias_exceptions: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Phrases in which an alias does not name the concept ('naked eye' for the "
                                          "alias 'naked'); each must contain one of the concept's aliases.")
    exemplars: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    negatives: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    anchor: str = Field("", description="Replacement concept for diffusion edits ('' = the empty prompt).")
    action: Action = Field(default_factory=Action)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    methods: MethodSettings = Field(default_factory=MethodSettings)
    forget: list[ForgetItem] = Field(
        default_factory=list, description="The concept's forget store: passages, {question, answer} pairs, or "
                                          "{file: path} (text files relative to this policy file, passages split at "
                                          "blank lines). Decoding blocks the distinctive n-grams of the entries "
                                          "closest to each flagged request.")
    _forget_entries: list[ForgetEntry] = PrivateAttr(default_factory=list)
    _profile: "ProfileConcept | None" = PrivateAttr(None)

    @model_validator(mode="after")
    def _detectable(self) -> "Concept":
        if not self.exemplars and not self.aliases:
            raise ValueError("needs at least one exemplar or alias, otherwise nothing can detect it")
        return self

    @field_validator("alias_exceptions")
    @classmethod
    def _exceptions_name_an_alias(cls, phrases: list[str], info: ValidationInfo) -> list[str]:
        """An exception without an alias in it could never apply: a typo, which must not pass silently."""
        aliases = info.data.get("aliases") or []
        for phrase in phrases:
            if not any(re.search(rf"(?<!\w){re.escape(alias)}(?!\w)", phrase, re.IGNORECASE) for alias in aliases):
                raise ValueError(f"'{phrase}' contains none of the concept's aliases, so it can never apply")
        return phrases

    @property
    def surface_forms(self) -> list[str]:
        """Strings whose appearance in text means the concept is named outright."""
        return list(dict.fromkeys(self.aliases))

    @property
    def forget_entries(self) -> list[ForgetEntry]:
        """The resolved forget store: the policy's passages and pairs, files read at load, and the profile's answers."""
        profile = [ForgetEntry(a.answer, a.question, "profile") for a in self._profile.answers] if self._profile else []
        return self._forget_entries + profile

    @property
    def profile_terms(self) -> list[str]:
        """Distinctive terms of the concept's profile (`guard policy expand`, reviewed and editable)."""
        return list(self._profile.terms) if self._profile else []


class Models(_Strict):
    embedding: str = Field("embedded:minilm", description="Sentence encoder used by the semantic detector.")


def profile_digest(concept: Concept) -> str:
    """Hash of what a profile is drawn from (the concept's texts and its forget store), so an edit is noticed."""
    drawn_from = {"id": concept.id, "description": concept.description, "aliases": concept.aliases,
                  "exemplars": concept.exemplars, "forget": [[e.question, e.text] for e in concept._forget_entries]}
    return hashlib.sha256(json.dumps(drawn_from, sort_keys=True).encode()).hexdigest()[:16]


def concept_digest(concept: Concept) -> str:
    """Hash of what a calibration measured (the texts the detectors read), so an edited concept is noticed."""
    measured = {"id": concept.id, "description": concept.description, "aliases": concept.aliases,
                "exemplars": concept.exemplars, "negatives": concept.negatives}
    return hashlib.sha256(json.dumps(measured, sort_keys=True).encode()).hexdigest()[:16]


class CalibratedConcept(_Strict):
    """One concept's calibrated semantic threshold and what it measured at that threshold."""

    digest: str = Field(description="concept_digest of the concept when it was calibrated.")
    semantic_threshold: Fraction
    recall: Fraction | None = Field(description="Share of held-out exemplars flagged (leave-one-out); "
                                                "null for a concept without exemplars.")
    fpr: Fraction = Field(description="Share of the benign corpus scoring at or above the threshold.")
    n_positives: int = Field(ge=0, description="Held-out exemplars scored.")
    n_benign: int = Field(ge=1, description="Benign prompts scored (shipped corpus plus the concept's negatives).")


class Calibration(_Strict):
    """A calibration file: semantic thresholds set to a target false-positive rate on a benign corpus."""

    version: Literal[1] = 1
    policy: str = Field(description="Name of the calibrated policy (for people; the digests are what is checked).")
    embedding: str = Field(description="Sentence encoder the scores came from; must equal the policy's.")
    target_fpr: Annotated[float, Field(gt=0, lt=1)]
    min_threshold: Fraction = Field(description="Floor below which no threshold was set.")
    benign_corpus: str = Field(description="Which benign prompts were scored.")
    concepts: dict[str, CalibratedConcept]


class ImageCalibratedConcept(_Strict):
    """One concept's Semantic Surgery presence threshold and AdaVD shift centre, measured on one image model."""

    digest: str = Field(description="concept_digest of the concept when it was calibrated.")
    presence_threshold: Fraction = Field(description="methods.semantic_surgery.threshold: the benign prompts' "
                                                     "conformal (1 - target FPR) quantile of the presence alpha.")
    presence_recall: Fraction = Field(description="Share of the concept's exemplars and aliases found at it.")
    presence_exemplar_recall: Fraction | None = Field(
        description="The same for the exemplars alone (never probes); null without exemplars.")
    presence_fpr: Fraction = Field(description="Share of the benign prompts found at it.")
    adavd_b: float = Field(description="methods.adavd.b: the benign prompts' conformal quantile of the best token's "
                                       "value cosine to the concept's target values (mean over layers).")
    adavd_recall: Fraction = Field(description="Share of the exemplars and aliases with a token at or above b.")
    adavd_fpr: Fraction = Field(description="Share of the benign prompts with a token at or above b.")
    n_positives: int = Field(ge=1, description="Exemplars and aliases scored.")
    n_benign: int = Field(ge=1, description="Benign prompts scored (the shipped list plus the concept's negatives).")


class ImageModelCalibration(_Strict):
    """The calibration of every policy concept on one image model's text encoder and cross-attention values."""

    model: str = Field(description="Where the model was read from (for people; the fingerprint is what is checked).")
    pipeline: str
    target_fpr: Annotated[float, Field(gt=0, lt=1)]
    benign_corpus: str
    concepts: dict[str, ImageCalibratedConcept]


class ImageCalibration(_Strict):
    """An image calibration file (``guard policy calibrate --image-model``): one entry per model fingerprint."""

    version: Literal[1] = 1
    policy: str = Field(description="Name of the calibrated policy (for people; the digests are what is checked).")
    models: dict[str, ImageModelCalibration] = Field(description="By image model fingerprint "
                                                                 "(guard.images.pipeline.model_fingerprint).")


ImageAction = Literal["refuse", "blur", "black", "flag"]


class ProfileAnswer(_Strict):
    question: str
    answer: str


class ProfileConcept(_Strict):
    """One concept's profile: what the served model itself answered about it, and the distinctive terms drawn from
    those answers (names, name parts, related entities, coined vocabulary) that decoding blocks when it is flagged."""

    digest: str = Field(description="profile_digest of the concept it was drawn from.")
    terms: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, description="Blocked like aliases on flagged requests; review and edit freely.")
    answers: list[ProfileAnswer] = Field(default_factory=list, description="The model's answers (forget store).")


class Profile(_Strict):
    """A profile file written by `guard policy expand`, referenced from the policy with ``profile:``."""

    version: Literal[1] = 1
    policy: str = Field(description="Name of the policy it was drawn for (for people; the digests are checked).")
    model: str = Field(description="The unguarded model that answered the probes.")
    concepts: dict[str, ProfileConcept]


class PolicyTests(_Strict):
    """Requests the policy must decide as written, so an edit cannot silently weaken it: run by
    ``guard policy check`` (exit 2 naming file:line of a failing case) and before every hot reload (a reload that
    fails them is rejected). Only the loaded file's own tests run (not those of files it extends)."""

    must_refuse: list[str] = Field(default_factory=list, description="Requests that must be refused (a refuse "
                                                                     "concept flagged by the prompt check).")
    must_allow: list[str] = Field(default_factory=list, description="Requests that must not be refused (steered or "
                                                                    "logged concepts are allowed).")
    must_not_leak: list[str] = Field(default_factory=list, description=(
        "Prompts whose guarded answer (greedy, by the served model; `guard policy check --model`) must name no "
        "concept: no alias however disguised, no near miss, whatever the concept's action."))


class Policy(_Strict):
    """A resolved policy. ``concepts`` already carry the merged defaults."""

    version: Literal[1] = 1
    name: str = "policy"
    description: str = ""
    extends: list[str] = Field(default_factory=list, description="Policy files composed before this one.")
    models: Models = Field(default_factory=Models)
    defaults: Defaults = Field(default_factory=Defaults)
    certify: CertifySettings | None = None
    languages: LanguageSettings = Field(default_factory=LanguageSettings)
    image_action: ImageAction = Field(
        "refuse", description="What happens to a generated image that an image detector still flags once the guard "
                              "has done what the concepts allow (regenerated it with the concept erased, or nothing "
                              "to erase it with): 'refuse' the request (400), 'blur' or 'black' out that image, or "
                              "'flag' it (served, named in x-guard-images-flagged). A concept with action 'refuse' "
                              "seen in an image always refuses; one with action 'log' only reports.")
    calibration: str | None = Field(
        None, description="Calibration file from `guard policy calibrate`, relative to this file. Its thresholds "
                          "replace the defaults of every calibrated concept; a concept's own "
                          "detection.semantic_threshold still wins.")
    image_calibration: str | None = Field(
        None, description="Image calibration file from `guard policy calibrate --image-model`, relative to this "
                          "file. When a calibrated image model is served, its presence thresholds and AdaVD b "
                          "replace the defaults (a concept's own methods.semantic_surgery.threshold or "
                          "methods.adavd.b still wins); serving a model it does not calibrate is an error.")
    profile: str | None = Field(
        None, description="Concept profile file from `guard policy expand`, relative to this file: the served "
                          "model's own answers and the distinctive terms drawn from them.")
    concepts: list[Concept] = Field(default_factory=list)
    tests: PolicyTests = Field(default_factory=PolicyTests)
    _test_lines: dict[tuple[str, int], tuple[Path, int | None]] = PrivateAttr(default_factory=dict)
    _calibration_path: Path | None = PrivateAttr(None)
    _calibration: Calibration | None = PrivateAttr(None)
    _profile_path: Path | None = PrivateAttr(None)
    _forget_files: list[Path] = PrivateAttr(default_factory=list)
    _explicit_thresholds: frozenset[str] = PrivateAttr(frozenset())
    _image_calibration_path: Path | None = PrivateAttr(None)
    _image_calibration: ImageCalibration | None = PrivateAttr(None)
    _explicit_image_settings: dict[str, frozenset[str]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _unique_ids(self) -> "Policy":
        seen: set[str] = set()
        for concept in self.concepts:
            if concept.id in seen:
                raise ValueError(f"concept id '{concept.id}' is defined twice")
            seen.add(concept.id)
        return self

    @property
    def fingerprint(self) -> str:
        """Content hash of the resolved policy; changes whenever behaviour could change."""
        resolved = {c.id: [[e.question, e.text, e.source] for e in c.forget_entries] + c.profile_terms
                    for c in self.concepts}  # forget files and the profile change behaviour too
        canonical = json.dumps([self.model_dump(mode="json", by_alias=True), resolved], sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:12]

    def test_location(self, kind: str, index: int) -> tuple[Path | None, int | None]:
        """File and line of ``tests.<kind>[index]``, for messages that send the author straight to the case."""
        return self._test_lines.get((kind, index), (None, None))

    @property
    def version_tag(self) -> str:
        return f"{self.name}@{self.fingerprint}"

    def concept(self, concept_id: str) -> Concept:
        for concept in self.concepts:
            if concept.id == concept_id:
                return concept
        raise KeyError(concept_id)

    def refusal_message(self, concept_ids: Sequence[str]) -> str:
        """What a refused or blocked request says, on every path (text, stream, images): the first concept's
        ``action.message`` with ``{concepts}`` naming every concept involved. An id that is no concept (an image
        detector that no concept watches) takes the ``defaults`` message."""
        first = next((c for c in self.concepts if c.id == concept_ids[0]), None)
        template = (first.action if first is not None else self.defaults.action).message
        return template.replace("{concepts}", ", ".join(concept_ids))

    @property
    def calibration_path(self) -> Path | None:
        """The referenced calibration file, resolved against the policy file that names it."""
        return self._calibration_path

    def snapshot(self) -> dict[str, Any]:
        """The resolved policy as JSON data, with what loading read from other files (forget files, the profile),
        for processes that must penalise with exactly this policy (the vLLM engine); read by :meth:`from_snapshot`."""
        return {"policy": self.model_dump(mode="json", by_alias=True),
                "forget": {c.id: [[e.text, e.question, e.source] for e in c._forget_entries] for c in self.concepts},
                "profiles": {c.id: c._profile.model_dump(mode="json") for c in self.concepts if c._profile}}

    @classmethod
    def from_snapshot(cls, data: dict[str, Any]) -> "Policy":
        policy = cls.model_validate(data["policy"])
        for concept in policy.concepts:
            concept._forget_entries = [ForgetEntry(*entry) for entry in data["forget"].get(concept.id, [])]
            if concept.id in data["profiles"]:
                concept._profile = ProfileConcept.model_validate(data["profiles"][concept.id])
        return policy

    @property
    def profile_path(self) -> Path | None:
        """The referenced profile file, resolved against the policy file that names it."""
        return self._profile_path

    @property
    def referenced_files(self) -> list[Path]:
        """Files besides the YAML policies whose edits change the policy: calibrations, profile, forget files."""
        return [p for p in (self._calibration_path, self._image_calibration_path, self._profile_path)
                if p is not None] + self._forget_files

    def calibrated(self, concept_id: str) -> CalibratedConcept | None:
        """The applied calibration's entry for a concept (None: uncalibrated, or loaded without calibration)."""
        return self._calibration.concepts.get(concept_id) if self._calibration else None

    @property
    def image_calibration_path(self) -> Path | None:
        return self._image_calibration_path

    @property
    def calibrates_images(self) -> bool:
        """Whether an image calibration was loaded (and must match the served image model)."""
        return self._image_calibration is not None

    def image_concepts(self, fingerprint: str) -> list[Concept]:
        """The concepts as the image model ``fingerprint`` applies them: with its calibrated presence thresholds and
        AdaVD b (unless a concept sets its own). Raises :class:`PolicyError` when the policy's image calibration
        does not calibrate this model: its thresholds were measured on another text encoder."""
        calibration = self._image_calibration
        if calibration is None:
            return list(self.concepts)
        if fingerprint not in calibration.models:
            known = ", ".join(f"{fp} ({entry.model})" for fp, entry in calibration.models.items()) or "none"
            raise PolicyError(self._image_calibration_path, f"no calibration for image model {fingerprint} (it "
                                                            f"calibrates: {known}); run `guard policy calibrate "
                                                            f"POLICY --image-model DIR` for this model",
                              field="models")
        entries = calibration.models[fingerprint].concepts
        concepts = []
        for concept in self.concepts:
            entry = entries.get(concept.id)
            explicit = self._explicit_image_settings.get(concept.id, frozenset())
            if entry is not None:
                concept = concept.model_copy(deep=True)
                if "threshold" not in explicit:
                    concept.methods.semantic_surgery.threshold = entry.presence_threshold
                if "b" not in explicit:
                    concept.methods.adavd.b = entry.adavd_b
            concepts.append(concept)
        return concepts

    def threshold_source(self, concept_id: str) -> Literal["calibration", "policy", "default"]:
        """Where a concept's semantic threshold came from: the calibration file, the concept itself, or defaults."""
        if concept_id in self._explicit_thresholds:
            return "policy"
        return "calibration" if self.calibrated(concept_id) else "default"


# ---------------------------------------------------------------------------------------------------------------
# Loading


class _Source:
    """One parsed YAML file plus a map from data paths to source lines, for error messages."""

    def __init__(self, path: Path, shape: str = "a policy must be a mapping with a 'concepts' list"):
        self.path = path
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(path, "file not found") from None
        except (OSError, UnicodeDecodeError) as err:
            raise PolicyError(path, f"cannot read file ({err})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            self.data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            raise PolicyError(path, f"invalid YAML: {err.problem or err}", line=mark.line + 1 if mark else None) from None
        if self.data is None:
            raise PolicyError(path, "the file is empty")
        if not isinstance(self.data, dict):
            raise PolicyError(path, shape, line=1)
        self.lines: dict[tuple[Any, ...], int] = {}
        self._index(node, ())

    def _index(self, node: yaml.Node, path: tuple[Any, ...]) -> None:
        self.lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                key = key_node.value
                self.lines[path + (key,)] = key_node.start_mark.line + 1
                self._index(value_node, path + (key,))
                self.lines[path + (key,)] = key_node.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self._index(item, path + (i,))

    def line_of(self, path: tuple[Any, ...]) -> int | None:
        for cut in range(len(path), -1, -1):
            if path[:cut] in self.lines:
                return self.lines[path[:cut]]
        return None

    def error(self, path: tuple[Any, ...], message: str) -> PolicyError:
        return PolicyError(self.path, message, line=self.line_of(path), field=_format_path(path) or None)


def _format_path(path: tuple[Any, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _all_field_names() -> set[str]:
    names: set[str] = set()
    for model in (Policy, PolicyTests, Defaults, Concept, Action, DetectionSettings, MethodSettings, TokenPenaltySettings,
                  SemanticSurgerySettings, VisualFeedbackSettings, AdaVDSettings, UCESettings, CertifySettings, Models,
                  Calibration, CalibratedConcept, ImageCalibration, ImageModelCalibration, ImageCalibratedConcept,
                  ForgetPair, ForgetFile, Profile, ProfileConcept, ProfileAnswer):
        for name, info in model.model_fields.items():
            names.add(info.alias or name)
    return names


def _message(error: dict[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        name = str(error["loc"][-1])
        close = difflib.get_close_matches(name, _all_field_names(), n=1)
        return f"unknown field '{name}'" + (f" (did you mean '{close[0]}'?)" if close else "")
    if kind == "missing":
        return "is required"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return message[0].lower() + message[1:] if message else message


def _validation_error(source: _Source, err: ValidationError, base: tuple[Any, ...] = ()) -> PolicyError:
    # An unknown (often misspelled) key explains the other errors of its mapping, so report it first.
    first = min(err.errors(), key=lambda e: e["type"] != "extra_forbidden")
    # Unions and tagged models add their class names to the location; keep only data keys/indices.
    loc = tuple(part for part in first["loc"]
                if isinstance(part, int) or not (str(part)[:1].isupper() or str(part).startswith("forget-")))
    return source.error(base + loc, _message(first))


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


_CONCEPT_INHERITED = ("action", "detection", "methods")
_RawConcept = tuple[dict[str, Any], _Source, int]
_CalibrationRef = tuple[str, _Source]  # the path as written, and the file that wrote it (its base and line)


_REFERENCED = ("calibration", "image_calibration", "profile")  # files a policy names, resolved against the file that names them


def _resolve_file(path: Path, stack: tuple[Path, ...]
                  ) -> tuple[dict[str, Any], list[_RawConcept], dict[str, _CalibrationRef]]:
    """Return (raw top-level data with composed defaults, [(raw concept, its source, its index)], referenced files
    by field: calibration, image calibration and profile, each with the file that names it)."""
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(p.name for p in stack + (path,))
        raise PolicyError(stack[-1], f"'extends' forms a cycle ({chain})")
    source = _Source(path)
    data = source.data
    extends = data.get("extends", [])
    if isinstance(extends, str):
        extends = [extends]
    if not isinstance(extends, list) or not all(isinstance(e, str) for e in extends):
        raise source.error(("extends",), "must be a list of policy file paths")

    defaults: dict[str, Any] = {}
    models: dict[str, Any] = {}
    certify: dict[str, Any] | None = None
    image_action: str | None = None
    references: dict[str, _CalibrationRef] = {}
    concepts: dict[str, _RawConcept] = {}
    for i, include in enumerate(extends):
        include_path = (path.parent / include)
        if not include_path.exists():
            raise source.error(("extends", i), f"included file '{include}' not found")
        parent, parent_concepts, parent_references = _resolve_file(include_path, stack + (path,))
        references.update(parent_references)
        defaults = _deep_merge(defaults, parent.get("defaults", {}))
        models = _deep_merge(models, parent.get("models", {}))
        certify = parent.get("certify", certify)
        image_action = parent.get("image_action", image_action)
        for raw, src, idx in parent_concepts:
            concepts[raw.get("id")] = (raw, src, idx)

    # Validate this file's own top level first so its errors point at its own lines.
    own = {k: v for k, v in data.items() if k != "concepts"}
    try:
        Policy.model_validate(own)
    except ValidationError as err:
        raise _validation_error(source, err) from None
    defaults = _deep_merge(defaults, data.get("defaults") or {})
    models = _deep_merge(models, data.get("models") or {})
    if "certify" in data:
        certify = data["certify"]
    for field in _REFERENCED:
        if data.get(field) is not None:
            references[field] = (data[field], source)

    raw_concepts = data.get("concepts", [])
    if not isinstance(raw_concepts, list):
        raise source.error(("concepts",), "must be a list of concepts")
    own_ids: set[str] = set()
    for i, raw in enumerate(raw_concepts):
        if not isinstance(raw, dict):
            raise source.error(("concepts", i), "each concept must be a mapping with at least 'id' and 'kind'")
        concept_id = raw.get("id")
        if concept_id in own_ids:
            raise source.error(("concepts", i, "id"), f"concept id '{concept_id}' is defined twice in this file")
        own_ids.add(concept_id)
        concepts[concept_id] = (raw, source, i)  # a later file replaces an included concept with the same id
    resolved = {**own, "defaults": defaults, "models": models}
    if certify is not None:
        resolved["certify"] = certify
    if "image_action" not in data and image_action is not None:
        resolved["image_action"] = image_action
    for field, (written, _) in references.items():
        resolved[field] = written
    return resolved, list(concepts.values()), references


def load_policy(path: str | Path, apply_calibration: bool = True, apply_profile: bool = True) -> Policy:
    """Load, compose and validate a policy file; raise :class:`PolicyError` on any problem.

    ``apply_calibration=False`` keeps the policy's own thresholds and skips checking the calibration file
    (``guard policy calibrate`` must be able to replace a stale one); ``apply_profile=False`` likewise skips the
    profile (``guard policy expand`` redraws it).
    """
    path = Path(path)
    top, raw_concepts, references = _resolve_file(path, ())
    source = _Source(path.resolve())
    defaults_raw = top.get("defaults", {})
    concepts: list[Concept] = []
    forget_files: list[Path] = []
    for raw, src, index in raw_concepts:
        merged = dict(raw)
        for key in _CONCEPT_INHERITED:
            if isinstance(raw.get(key, {}), dict):
                merged[key] = _deep_merge(defaults_raw.get(key, {}), raw.get(key, {}))
        try:
            concept = Concept.model_validate(merged)
        except ValidationError as err:
            raise _validation_error(src, err, base=("concepts", index)) from None
        concept._forget_entries = _forget_entries(concept, src, index, forget_files)
        concepts.append(concept)
    top = {**top, "concepts": []}
    try:
        policy = Policy.model_validate(top)
    except ValidationError as err:
        raise _validation_error(source, err) from None
    policy.concepts = concepts
    policy._test_lines = {(kind, i): (source.path, source.line_of(("tests", kind, i)))
                          for kind in ("must_refuse", "must_allow", "must_not_leak")
                          for i in range(len(getattr(policy.tests, kind)))}
    if not policy.concepts:
        raise PolicyError(path, "the policy defines no concepts", line=1, field="concepts")
    policy._explicit_thresholds = frozenset(
        c.id for c, (raw, _, _) in zip(concepts, raw_concepts)
        if isinstance(raw.get("detection"), dict) and "semantic_threshold" in raw["detection"])
    policy._explicit_image_settings = {
        c.id: frozenset(name for method, name in (("semantic_surgery", "threshold"), ("adavd", "b"))
                        if name in ((raw.get("methods") or {}).get(method) or {}))
        for c, (raw, _, _) in zip(concepts, raw_concepts) if isinstance(raw.get("methods"), dict)}
    policy._forget_files = forget_files
    if "calibration" in references:
        written, declared_in = references["calibration"]
        policy._calibration_path = (declared_in.path.parent / written).resolve()
        if apply_calibration:
            _apply_calibration(policy, policy._calibration_path, declared_in, raw_concepts)
    if "image_calibration" in references:
        written, declared_in = references["image_calibration"]
        policy._image_calibration_path = (declared_in.path.parent / written).resolve()
        if apply_calibration:
            _apply_image_calibration(policy, policy._image_calibration_path, declared_in, raw_concepts)
    if "profile" in references:
        written, declared_in = references["profile"]
        policy._profile_path = (declared_in.path.parent / written).resolve()
        if apply_profile:
            _apply_profile(policy, policy._profile_path, declared_in, raw_concepts)
    return policy


def _forget_entries(concept: Concept, source: _Source, index: int, read: list[Path]) -> list[ForgetEntry]:
    """The concept's forget items as entries; ``{file: ...}`` is read now (relative to the file that names it)."""
    entries: list[ForgetEntry] = []
    for j, item in enumerate(concept.forget):
        if isinstance(item, str):
            entries.append(ForgetEntry(" ".join(item.split())))
        elif isinstance(item, ForgetPair):
            entries.append(ForgetEntry(" ".join(item.answer.split()), " ".join(item.question.split())))
        else:
            where = ("concepts", index, "forget", j, "file")
            target = (source.path.parent / item.file).resolve()
            try:
                text = target.read_text(encoding="utf-8")
            except FileNotFoundError:
                raise source.error(where, f"forget file '{item.file}' not found") from None
            except (OSError, UnicodeDecodeError) as err:
                raise source.error(where, f"cannot read forget file '{item.file}' ({err})") from None
            passages = [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]
            if not passages:
                raise source.error(where, f"forget file '{item.file}' holds no text")
            entries.extend(ForgetEntry(passage, None, "file") for passage in passages)
            read.append(target)
    return entries


@dataclass(frozen=True)
class PolicyBinding:
    """One entry of a policy map: an API key (or a key id) and the policy file that guards its requests."""

    key: str
    policy_path: Path
    line: int | None  # where the map names it, for errors about the entry


def load_policy_map(path: str | Path) -> list[PolicyBinding]:
    """Read a ``--policy-map`` file (YAML: API key or key id -> policy file, relative to the map); raise
    :class:`PolicyError` naming the map's file and line for a malformed entry or a policy file that is missing.
    The policies themselves are loaded by the caller (their errors name their own file and line). Messages never
    repeat a key: the line says which entry."""
    path = Path(path)
    source = _Source(path, shape="a policy map must be a mapping of API keys (or key ids) to policy files")
    bindings = []
    for key, target in source.data.items():
        line = source.line_of((key,))
        if not isinstance(key, str) or not key.strip():
            raise PolicyError(path, "an API key or key id must be a non-empty string", line=line)
        if not isinstance(target, str) or not target.strip():
            raise PolicyError(path, "the entry must name a policy file (a path relative to the map)", line=line)
        policy_path = (path.parent / target).resolve()
        if not policy_path.is_file():
            raise PolicyError(path, f"policy file not found: {target}", line=line)
        bindings.append(PolicyBinding(key.strip(), policy_path, line))
    return bindings


def load_inline_policy(text: str) -> Policy:
    """A policy sent as YAML text rather than read from a file (``/v1/guard/checks``' ``policy``).

    It has no folder, so ``extends`` and the files a policy references are refused; errors carry the line within ``text``.
    """
    with tempfile.TemporaryDirectory(prefix="inline-policy-") as folder:
        path = Path(folder) / "policy.yaml"
        path.write_text(text, encoding="utf-8")
        source = _Source(path)
        for key in ("extends", *_REFERENCED):
            if key in source.data:
                raise source.error((key,), "an inline policy has no folder to read other files from")
        return load_policy(path)


_AnyCalibration = TypeVar("_AnyCalibration", Calibration, ImageCalibration)


def _parse_calibration(path: Path, model: type[_AnyCalibration] = Calibration) -> tuple[_AnyCalibration, _Source]:
    source = _Source(path, shape="a calibration file must be a mapping written by `guard policy calibrate`")
    try:
        return model.model_validate(source.data), source
    except ValidationError as err:
        raise _validation_error(source, err) from None


def load_calibration(path: Path, model: type[_AnyCalibration] = Calibration) -> _AnyCalibration:
    """Read and validate a calibration file (text, or ``ImageCalibration``); errors name its file and line."""
    return _parse_calibration(path, model)[0]


def save_calibration(calibration: Calibration | ImageCalibration, path: Path) -> None:
    """Write a calibration file (floats keep full precision, so a threshold reads back exactly)."""
    key = "image_calibration" if isinstance(calibration, ImageCalibration) else "calibration"
    header = f"# Written by `guard policy calibrate`; reference it from the policy with `{key}: <this file>`.\n"
    body = yaml.safe_dump(calibration.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    path.write_text(header + body, encoding="utf-8")


def _apply_calibration(policy: Policy, path: Path, declared_in: _Source, raw_concepts: list[_RawConcept]) -> None:
    """Take each calibrated concept's threshold unless the concept sets its own; refuse anything that no longer
    matches what was calibrated, since a stale threshold could flag far less than the report said."""
    where = ("calibration",)
    rerun = f"run `guard policy calibrate {declared_in.path.name}`"
    if not path.is_file():
        raise declared_in.error(where, f"calibration file '{path}' not found ({rerun})")
    calibration, calibration_source = _parse_calibration(path)
    if calibration.embedding != policy.models.embedding:
        raise declared_in.error(where, f"'{path.name}' was calibrated for embedding model '{calibration.embedding}' "
                                       f"but the policy uses '{policy.models.embedding}' ({rerun})")
    _check_digests(policy, calibration.concepts, ("concepts",), path, calibration_source, raw_concepts, rerun)
    for concept in policy.concepts:
        entry = calibration.concepts.get(concept.id)
        if entry is not None and concept.id not in policy._explicit_thresholds:
            concept.detection.semantic_threshold = entry.semantic_threshold
    policy._calibration = calibration


def _check_digests(policy: Policy, entries: dict[str, Any], where: tuple[Any, ...], path: Path,
                   calibration_source: _Source, raw_concepts: list[_RawConcept], rerun: str) -> None:
    """Every calibrated concept must still be in the policy, unchanged since it was measured."""
    by_id = {concept.id: (concept, raw) for concept, raw in zip(policy.concepts, raw_concepts)}
    for concept_id, entry in entries.items():
        if concept_id not in by_id:
            raise calibration_source.error((*where, concept_id),
                                           f"calibrated concept '{concept_id}' is not in the policy ({rerun})")
        concept, (_, source, index) = by_id[concept_id]
        if entry.digest != concept_digest(concept):
            raise source.error(("concepts", index), f"concept '{concept_id}' changed since it was calibrated in "
                                                    f"'{path.name}' (exemplars, negatives, aliases or description; "
                                                    f"{rerun})")


def _apply_image_calibration(policy: Policy, path: Path, declared_in: _Source,
                             raw_concepts: list[_RawConcept]) -> None:
    """Check an image calibration against the policy now; its values apply per served model
    (:meth:`Policy.image_concepts`)."""
    rerun = f"run `guard policy calibrate {declared_in.path.name} --image-model DIR`"
    if not path.is_file():
        raise declared_in.error(("image_calibration",), f"image calibration file '{path}' not found ({rerun})")
    calibration, source = _parse_calibration(path, ImageCalibration)
    for fingerprint, entry in calibration.models.items():
        _check_digests(policy, entry.concepts, ("models", fingerprint, "concepts"), path, source, raw_concepts,
                       rerun.replace("DIR", entry.model))
    policy._image_calibration = calibration


def load_profile(path: Path) -> Profile:
    """Read and validate a profile file; errors name its file and line like policy errors."""
    return _parse_profile(path)[0]


def _parse_profile(path: Path) -> tuple[Profile, _Source]:
    source = _Source(path, shape="a profile file must be a mapping written by `guard policy expand`")
    try:
        return Profile.model_validate(source.data), source
    except ValidationError as err:
        raise _validation_error(source, err) from None


def save_profile(profile: Profile, path: Path) -> None:
    header = ("# Written by `guard policy expand`: the served model's own answers about each concept and the distinctive\n"
              "# terms drawn from them. Review and edit `terms` freely; the digests say what each entry was drawn from\n"
              "# (a concept edited since fails to load until the profile is redrawn).\n")
    body = yaml.safe_dump(profile.model_dump(mode="json"), sort_keys=False, allow_unicode=True, width=110)
    path.write_text(header + body, encoding="utf-8")


def _apply_profile(policy: Policy, path: Path, declared_in: _Source, raw_concepts: list[_RawConcept]) -> None:
    """Attach each concept's profile; refuse one drawn from a concept that has changed since (stale terms could
    miss what the edited concept now covers)."""
    rerun = f"run `guard policy expand {declared_in.path.name} --model MODEL`"
    if not path.is_file():
        raise declared_in.error(("profile",), f"profile file '{path}' not found ({rerun})")
    profile, source = _parse_profile(path)
    by_id = {concept.id: (concept, raw) for concept, raw in zip(policy.concepts, raw_concepts)}
    for concept_id, entry in profile.concepts.items():
        if concept_id not in by_id:
            raise source.error(("concepts", concept_id), f"profiled concept '{concept_id}' is not in the policy ({rerun})")
        concept, (_, concept_source, index) = by_id[concept_id]
        if entry.digest != profile_digest(concept):
            raise concept_source.error(("concepts", index), f"concept '{concept_id}' changed since its profile was "
                                                            f"drawn in '{path.name}' ({rerun})")
        concept._profile = entry


def policy_json_schema() -> dict[str, Any]:
    """JSON schema of a policy file, for editors (exported to ``policies/schema.json``)."""
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "erasure-guard policy"
    return schema
