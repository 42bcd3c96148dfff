"""``POST /v1/guard/checks``: routes (api_router), wire models (protocol) and check-only serving logic (serving)."""
