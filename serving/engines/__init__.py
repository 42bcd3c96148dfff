"""Engines behind the one protocol of :mod:`serving.engines.base`: transformers, upstream HTTP, vLLM."""
