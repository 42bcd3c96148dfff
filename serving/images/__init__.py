"""``POST /v1/images/generations``: routes (api_router), wire models (protocol) and guarded serving logic (serving)."""
