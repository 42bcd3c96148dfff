"""``POST /v1/completions``: routes (api_router), wire models (protocol) and guarded serving logic (serving)."""
