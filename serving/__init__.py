"""The OpenAI-compatible guard server (``guard serve``): per-endpoint packages on shared engine and guard state."""
