"""The text request path: one request type and guarded generation for in-process transformers models."""
