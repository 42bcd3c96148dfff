"""Server settings: everything ``guard serve`` can be told, validated once at start-up."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

EngineKind = Literal["transformers", "upstream", "vllm"]


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which and why."""


@dataclass(frozen=True)
class ServerSettings:
    policy_path: Path
    model: str = "embedded:smollm2"
    engine: EngineKind = "transformers"
    served_model_name: str | None = None  # the name clients use; defaults to ``model``
    upstream_url: str | None = None  # base URL of an OpenAI-compatible server, e.g. http://host:8000/v1
    upstream_api_key: str | None = None
    upstream_tokenizer: str | None = None  # model reference whose tokenizer the upstream uses (for logit_bias)
    upstream_timeout_s: float = 600.0
    api_keys: tuple[str, ...] = ()  # empty (and no admin keys): no authentication
    admin_api_keys: tuple[str, ...] = ()  # keys that may also send an inline policy to /v1/guard/checks
    max_request_bytes: int = 1_000_000
    max_checked_chars: int = 32_000  # longer input (all messages, or one prompt) gets 400, never a partial check
    max_tokens_limit: int = 4096  # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # chat requests without max_tokens
    max_n: int = 8
    batch_wait_ms: float = 5.0  # how long the transformers worker waits to batch concurrent requests
    max_batch_size: int = 8
    reload_policy: bool = True
    vllm_options: dict[str, object] = field(default_factory=dict)  # extra vllm AsyncEngineArgs
    image_model: str | None = None  # a local Stable Diffusion folder: serves /v1/images/generations
    image_nsfw_threshold: float | None = None  # Open-NSFW check of generated images (None: off)
    policy_map: Path | None = None  # YAML: API key or key id -> policy file (other keys get policy_path)
    decision_log: str | None = None  # a file to append one JSON line per request to, or "-" for stdout
    max_queue: int = 64  # POST /v1 requests in the server at once; more get 429 with Retry-After

    def __post_init__(self) -> None:
        if self.engine == "upstream" and not self.upstream_url:
            raise SettingsError("the upstream engine needs --upstream URL")
        if self.engine != "upstream" and (self.upstream_url or self.upstream_tokenizer or self.upstream_api_key):
            raise SettingsError("--upstream, --upstream-tokenizer and --upstream-api-key only apply to the "
                                "upstream engine")
        for name in ("max_request_bytes", "max_checked_chars", "max_tokens_limit", "default_max_tokens", "max_n",
                     "max_batch_size", "max_queue"):
            if getattr(self, name) < 1:
                raise SettingsError(f"{name} must be at least 1")
        if self.upstream_timeout_s <= 0:
            raise SettingsError("upstream_timeout_s must be positive")
        if self.default_max_tokens > self.max_tokens_limit:
            raise SettingsError("default_max_tokens cannot exceed max_tokens_limit")
        if self.vllm_options and self.engine != "vllm":
            raise SettingsError("--vllm-option only applies to the vllm engine")
        if self.batch_wait_ms < 0:
            raise SettingsError("batch_wait_ms cannot be negative")
        if self.image_nsfw_threshold is not None and self.image_model is None:
            raise SettingsError("--image-nsfw-threshold only applies with --image-model")
        if self.image_nsfw_threshold is not None and not 0.0 <= self.image_nsfw_threshold <= 1.0:
            raise SettingsError("--image-nsfw-threshold must be between 0 and 1")

    @property
    def model_id(self) -> str:
        return self.served_model_name or self.model

    def to_environment(self) -> None:
        """Hand these settings to worker processes (``guard serve --workers``), which read them back with
        :meth:`from_environment`: each worker builds its own engine and guard from the same settings."""
        os.environ[SETTINGS_ENV] = json.dumps({**dataclasses.asdict(self), "policy_path": str(self.policy_path),
                                               "policy_map": None if self.policy_map is None else str(self.policy_map)})

    @classmethod
    def from_environment(cls) -> "ServerSettings":
        data = json.loads(os.environ[SETTINGS_ENV])
        data["policy_path"] = Path(data["policy_path"])
        data["policy_map"] = None if data["policy_map"] is None else Path(data["policy_map"])
        for name in ("api_keys", "admin_api_keys"):
            data[name] = tuple(data[name])
        return cls(**data)


SETTINGS_ENV = "ERASURE_GUARD_SERVER_SETTINGS"  # the settings of `guard serve --workers N`, as JSON
