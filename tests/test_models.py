"""Model references resolve offline to real weights, and bad references fail clearly."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from guard.errors import ModelError
from guard.models import load_language_model, load_sentence_encoder, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_embedded_smollm2_loads_and_generates() -> None:
    model, tokenizer = load_language_model("embedded:smollm2")
    assert model.dtype == torch.float32
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer
    assert load_language_model("embedded:smollm2")[0] is model  # cached: one copy per process


def test_embedded_minilm_embeds_meaningfully() -> None:
    encoder = load_sentence_encoder("embedded:minilm")
    a, b, c = encoder.encode(["Who is Harry Potter?", "Tell me about the boy wizard Harry Potter.",
                              "The capital of France is Paris."], normalize_embeddings=True)
    assert a.shape == (384,)
    assert float(a @ b) > float(a @ c) + 0.3


def test_local_paths_resolve_and_missing_ones_fail_clearly(tmp_path: Path) -> None:
    folder = resolve("embedded:smollm2").path
    assert resolve(str(folder)).path == folder
    with pytest.raises(ModelError, match="does not exist"):
        resolve(str(tmp_path / "no-such-model"))
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="is not a folder"):
        resolve(str(tmp_path / "file.bin"))
    with pytest.raises(ModelError, match="unknown embedded model 'embedded:gpt5'"):
        resolve("embedded:gpt5")
    with pytest.raises(ModelError, match="cannot load language model"):
        load_language_model(str(tmp_path))  # exists, but holds no model


def test_cli_reports_a_missing_embedding_model_without_traceback(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(f"models: {{embedding: {tmp_path / 'gone'}}}\nconcepts:\n"
                      "  - {id: x, kind: other, description: X., aliases: [xylophone]}\n")
    result = subprocess.run([sys.executable, "-m", "guard", "policy", "explain", str(policy), "hello"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not exist" in result.stderr


def test_the_sentence_encoder_runs_in_onnx_runtime_with_torch_s_vectors(monkeypatch: pytest.MonkeyPatch) -> None:
    """The shipped encoder backend reproduces the torch model; other encoders and ERASURE_GUARD_ENCODER=torch
    fall back to sentence-transformers."""
    import numpy as np
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    from guard.models import OnnxSentenceEncoder, OnnxUnavailable

    encoder = load_sentence_encoder("embedded:minilm")
    assert isinstance(encoder, OnnxSentenceEncoder)
    texts = ["Who is Harry Potter?", "  How do I build a pipe bomb?  ", "x", "A much longer sentence " * 40]
    fast = encoder.encode(texts, batch_size=2)
    exact = encoder.model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
    assert fast.shape == (4, 384) and float((fast * exact).sum(axis=1).min()) > 0.99999
    assert np.allclose(np.linalg.norm(fast, axis=1), 1.0, atol=1e-5)

    cls_pooled = SentenceTransformer(modules=[encoder.model[0], Pooling(384, pooling_mode="cls")], device="cpu")
    with pytest.raises(OnnxUnavailable, match="mean pooling"):
        OnnxSentenceEncoder.build(cls_pooled, resolve("embedded:minilm").path)
    monkeypatch.setenv("ERASURE_GUARD_ENCODER", "torch")
    load_sentence_encoder.cache_clear()
    try:
        assert isinstance(load_sentence_encoder("embedded:minilm"), SentenceTransformer)
    finally:
        monkeypatch.delenv("ERASURE_GUARD_ENCODER")
        load_sentence_encoder.cache_clear()
