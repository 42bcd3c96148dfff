"""Every error the guard raises on purpose, in one ground-floor module that imports nothing of ours.

The guard fails closed: each of these means "do not answer unguarded". Callers catch them by kind — a bad
policy or model is a start-up error (one line, exit 2), :class:`GuardUnavailable` refuses the request (503),
:class:`ConceptRefused` is the policy saying no (400) — and ``str(err)`` is always the one-line message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


class PolicyError(Exception):
    """A policy file cannot be used; ``str(err)`` is the one-line message shown to users."""

    def __init__(self, file: str | Path, message: str, line: int | None = None, field: str | None = None):
        self.file = str(file)
        self.line = line
        self.field = field
        self.message = message
        where = self.file if line is None else f"{self.file}:{line}"
        super().__init__(f"{where} {field}: {message}" if field else f"{where}: {message}")


class ModelError(Exception):
    """A model reference cannot be resolved or loaded."""


class DetectorError(RuntimeError):
    """A detector could not run; the guard must refuse rather than answer unguarded."""


class TokenPenaltyError(RuntimeError):
    """The penalty tables cannot be built for this tokenizer; the guard must not decode unprotected."""


class CertifyError(Exception):
    """Certification cannot run with these settings or this filter; ``str(err)`` is a one-line message."""


class WeightEditError(Exception):
    """The edit cannot be planned or applied; ``str(err)`` is the one-line message for users."""


class GuardUnavailable(Exception):
    """The guard itself could not run (detector, model or policy failure): refuse, never pass through."""


class AdaVDError(GuardUnavailable):
    """AdaVD cannot edit this model or this call; the guard refuses rather than run unguarded."""


class ConceptRefused(Exception):
    """The policy says no: answered as HTTP 400 ``content_policy_violation``, never retried."""

    def __init__(self, concept_ids: Sequence[str], message: str, ms: float = 0.0):
        self.concept_ids = list(concept_ids)
        self.message = message
        self.ms = ms  # how long the check that refused took (the decision log reports every stage's time)
        super().__init__(message)
