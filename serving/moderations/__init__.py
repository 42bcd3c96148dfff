"""``POST /v1/moderations``: routes (api_router), wire models (protocol) and guarded serving logic (serving)."""
