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
from collections.abc import Sequence
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

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


class SemanticSurgerySettings(_Strict):
    """Semantic Surgery for diffusion prompt embeddings (threshold t on mean token cosine, sigmoid scale gamma)."""

    enabled: bool = True
    threshold: Fraction = 0.12
    gamma: Annotated[float, Field(gt=0)] = 0.02
    activation: Fraction = Field(0.5, description="Presence score at or above which the concept is erased (tau).")


class AdaVDSettings(_Strict):
    """AdaVD value-space projection; shift s = c / (1 + exp(-a (cos - b)))."""

    enabled: bool = True
    a: float = 10.0
    b: float = 0.2
    c: NonNegative = 1.0
    adaptive: bool = Field(True, description="Use the adaptive shift; false projects out the full component.")


class UCESettings(_Strict):
    """Closed-form cross-attention edit (UCE) with optional RECE rounds."""

    preserve: list[str] = Field(default_factory=list, description="Concepts whose mapping must stay fixed.")
    preserve_scale: NonNegative = 1.0
    lambda_: NonNegative = Field(0.5, alias="lambda", description="Regulariser keeping the edit close to the original.")
    rece_rounds: int = Field(0, ge=0, le=20)
    rece_regularizer: Annotated[float, Field(gt=0)] = Field(
        0.1, description="RECE ridge weight on the reviving embedding (0.1 nudity, 1e-3 styles and hard objects).")


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


class Defaults(_Strict):
    """Policy-wide settings; every concept inherits them and may override any part."""

    action: Action = Field(default_factory=Action)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    methods: MethodSettings = Field(default_factory=MethodSettings)


class Concept(_Strict):
    id: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")]
    kind: ConceptKind
    description: str = Field(min_length=1)
    aliases: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    exemplars: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    negatives: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    anchor: str = Field("", description="Replacement concept for diffusion edits ('' = the empty prompt).")
    action: Action = Field(default_factory=Action)
    detection: DetectionSettings = Field(default_factory=DetectionSettings)
    methods: MethodSettings = Field(default_factory=MethodSettings)

    @model_validator(mode="after")
    def _detectable(self) -> "Concept":
        if not self.exemplars and not self.aliases:
            raise ValueError("needs at least one exemplar or alias, otherwise nothing can detect it")
        return self

    @property
    def surface_forms(self) -> list[str]:
        """Strings whose appearance in text means the concept is named outright."""
        return list(dict.fromkeys(self.aliases))


class Models(_Strict):
    embedding: str = Field("embedded:minilm", description="Sentence encoder used by the semantic detector.")


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


class PolicyTests(_Strict):
    """Requests the policy must decide as written, so an edit cannot silently weaken it: run by
    ``guard policy check`` (exit 2 naming file:line of a failing case) and before every hot reload (a reload that
    fails them is rejected). Only the loaded file's own tests run (not those of files it extends)."""

    must_refuse: list[str] = Field(default_factory=list, description="Requests that must be refused (a refuse "
                                                                     "concept flagged by the prompt check).")
    must_allow: list[str] = Field(default_factory=list, description="Requests that must not be refused (steered or "
                                                                    "logged concepts are allowed).")


class Policy(_Strict):
    """A resolved policy. ``concepts`` already carry the merged defaults."""

    version: Literal[1] = 1
    name: str = "policy"
    description: str = ""
    extends: list[str] = Field(default_factory=list, description="Policy files composed before this one.")
    models: Models = Field(default_factory=Models)
    defaults: Defaults = Field(default_factory=Defaults)
    certify: CertifySettings | None = None
    calibration: str | None = Field(
        None, description="Calibration file from `guard policy calibrate`, relative to this file. Its thresholds "
                          "replace the defaults of every calibrated concept; a concept's own "
                          "detection.semantic_threshold still wins.")
    concepts: list[Concept] = Field(default_factory=list)
    tests: PolicyTests = Field(default_factory=PolicyTests)
    _test_lines: dict[tuple[str, int], tuple[Path, int | None]] = PrivateAttr(default_factory=dict)
    _calibration_path: Path | None = PrivateAttr(None)
    _calibration: Calibration | None = PrivateAttr(None)
    _explicit_thresholds: frozenset[str] = PrivateAttr(frozenset())

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
        canonical = json.dumps(self.model_dump(mode="json", by_alias=True), sort_keys=True)
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
        ``action.message`` with ``{concepts}`` naming every concept involved."""
        template = self.concept(concept_ids[0]).action.message
        return template.replace("{concepts}", ", ".join(concept_ids))

    @property
    def calibration_path(self) -> Path | None:
        """The referenced calibration file, resolved against the policy file that names it."""
        return self._calibration_path

    def calibrated(self, concept_id: str) -> CalibratedConcept | None:
        """The applied calibration's entry for a concept (None: uncalibrated, or loaded without calibration)."""
        return self._calibration.concepts.get(concept_id) if self._calibration else None

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
                  SemanticSurgerySettings, AdaVDSettings, UCESettings, CertifySettings, Models, Calibration,
                  CalibratedConcept):
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
    loc = tuple(part for part in first["loc"] if isinstance(part, int) or not str(part)[:1].isupper())
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


def _resolve_file(path: Path, stack: tuple[Path, ...]
                  ) -> tuple[dict[str, Any], list[_RawConcept], _CalibrationRef | None]:
    """Return (raw top-level data with composed defaults, [(raw concept, its source, its index)], calibration)."""
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
    calibration: _CalibrationRef | None = None
    concepts: dict[str, _RawConcept] = {}
    for i, include in enumerate(extends):
        include_path = (path.parent / include)
        if not include_path.exists():
            raise source.error(("extends", i), f"included file '{include}' not found")
        parent, parent_concepts, parent_calibration = _resolve_file(include_path, stack + (path,))
        calibration = parent_calibration or calibration
        defaults = _deep_merge(defaults, parent.get("defaults", {}))
        models = _deep_merge(models, parent.get("models", {}))
        certify = parent.get("certify", certify)
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
    if data.get("calibration") is not None:
        calibration = (data["calibration"], source)

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
    if calibration is not None:
        resolved["calibration"] = calibration[0]
    return resolved, list(concepts.values()), calibration


def load_policy(path: str | Path, apply_calibration: bool = True) -> Policy:
    """Load, compose and validate a policy file; raise :class:`PolicyError` on any problem.

    ``apply_calibration=False`` keeps the policy's own thresholds and skips checking the calibration file
    (``guard policy calibrate`` must be able to replace a stale one).
    """
    path = Path(path)
    top, raw_concepts, calibration = _resolve_file(path, ())
    source = _Source(path.resolve())
    defaults_raw = top.get("defaults", {})
    concepts: list[Concept] = []
    for raw, src, index in raw_concepts:
        merged = dict(raw)
        for key in _CONCEPT_INHERITED:
            if isinstance(raw.get(key, {}), dict):
                merged[key] = _deep_merge(defaults_raw.get(key, {}), raw.get(key, {}))
        try:
            concepts.append(Concept.model_validate(merged))
        except ValidationError as err:
            raise _validation_error(src, err, base=("concepts", index)) from None
    top = {**top, "concepts": []}
    try:
        policy = Policy.model_validate(top)
    except ValidationError as err:
        raise _validation_error(source, err) from None
    policy.concepts = concepts
    policy._test_lines = {(kind, i): (source.path, source.line_of(("tests", kind, i)))
                          for kind in ("must_refuse", "must_allow") for i in range(len(getattr(policy.tests, kind)))}
    if not policy.concepts:
        raise PolicyError(path, "the policy defines no concepts", line=1, field="concepts")
    policy._explicit_thresholds = frozenset(
        c.id for c, (raw, _, _) in zip(concepts, raw_concepts)
        if isinstance(raw.get("detection"), dict) and "semantic_threshold" in raw["detection"])
    if calibration is not None:
        written, declared_in = calibration
        policy._calibration_path = (declared_in.path.parent / written).resolve()
        if apply_calibration:
            _apply_calibration(policy, policy._calibration_path, declared_in, raw_concepts)
    return policy


def _parse_calibration(path: Path) -> tuple[Calibration, _Source]:
    source = _Source(path, shape="a calibration file must be a mapping written by `guard policy calibrate`")
    try:
        return Calibration.model_validate(source.data), source
    except ValidationError as err:
        raise _validation_error(source, err) from None


def load_calibration(path: Path) -> Calibration:
    """Read and validate a calibration file; errors name its file and line like policy errors."""
    return _parse_calibration(path)[0]


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Write a calibration file (floats keep full precision, so a threshold reads back exactly)."""
    header = "# Written by `guard policy calibrate`; reference it from the policy with `calibration: <this file>`.\n"
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
    by_id = {concept.id: (concept, raw) for concept, raw in zip(policy.concepts, raw_concepts)}
    for concept_id, entry in calibration.concepts.items():
        if concept_id not in by_id:
            raise calibration_source.error(("concepts", concept_id),
                                           f"calibrated concept '{concept_id}' is not in the policy ({rerun})")
        concept, (_, source, index) = by_id[concept_id]
        if entry.digest != concept_digest(concept):
            raise source.error(("concepts", index), f"concept '{concept_id}' changed since it was calibrated in "
                                                    f"'{path.name}' (exemplars, negatives, aliases or description; "
                                                    f"{rerun})")
        if concept_id not in policy._explicit_thresholds:
            concept.detection.semantic_threshold = entry.semantic_threshold
    policy._calibration = calibration


def policy_json_schema() -> dict[str, Any]:
    """JSON schema of a policy file, for editors (exported to ``policies/schema.json``)."""
    schema = Policy.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "erasure-guard policy"
    return schema
