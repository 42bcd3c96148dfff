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
