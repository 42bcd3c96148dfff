"""LiteLLM's generic guardrail API (``POST /beta/litellm_basic_guardrail_api``): routes, wire models, serving."""
