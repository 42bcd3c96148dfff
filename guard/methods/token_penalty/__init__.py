"""GUARD-style decoding penalties: compiled tables plus their transformers, vLLM and logit_bias adapters."""
