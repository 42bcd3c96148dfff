"""Real responses of the running server validated against OpenAI's published schemas (tests/data/openai-openapi).

OpenAI's ``openapi.json`` declares OpenAPI 3.1 (JSON Schema 2020-12) but marks nullable fields the 3.0 way,
``nullable: true``, which a JSON-Schema validator ignores: without the rewrite in :func:`json_schema` a ``null``
the spec allows would fail, and the validation would say nothing true. Each ``nullable: true`` node becomes
``anyOf: [node, {"type": "null"}]`` first (3.1's own form, which the spec also uses in places).
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any, Iterator

import httpx
import jsonschema
import pytest
from conftest import API_KEY, ROOT, TOWER_PROMPT, RunningServer

# The schemas of OpenAI's openapi.json these tests use, with everything they reference (see the README there).
SPEC = ROOT / "tests" / "data" / "openai-openapi" / "openapi-subset.json"
MODEL = "embedded:smollm2"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def nullable_as_type_lists(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` rewritten as JSON Schema: ``anyOf: [node, {"type": "null"}]``."""
    if isinstance(node, list):
        return [nullable_as_type_lists(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: nullable_as_type_lists(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable") is True:
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


@lru_cache(maxsize=1)
def components() -> dict[str, Any]:
    return nullable_as_type_lists(json.loads(SPEC.read_text(encoding="utf-8"))["components"])


def completion_chunk_components() -> dict[str, Any]:
    """The spec has no schema for streamed legacy completions: their chunks are ``CreateCompletionResponse`` with
    ``finish_reason: null`` until a choice's last chunk (shared/reference/openai-openapi/README.md)."""
    patched = copy.deepcopy(components())
    choice = patched["schemas"]["CreateCompletionResponse"]["properties"]["choices"]["items"]
    choice["properties"]["finish_reason"] = {"anyOf": [choice["properties"]["finish_reason"], {"type": "null"}]}
    return patched


def validate(instance: Any, schema_name: str, spec: dict[str, Any] | None = None) -> None:
    """Raise if ``instance`` does not match ``components.schemas[schema_name]`` (every error, not only the first)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec or components()}
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(instance)]
    assert not errors, f"{schema_name}:\n" + "\n".join(errors)


def sse_events(server: RunningServer, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The JSON events of one streamed answer, in order ([DONE] must end it)."""
    with httpx.stream("POST", f"{server.api_url}/{path}", json=body, headers=HEADERS, timeout=300) as response:
        assert response.status_code == 200
        data = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def post(server: RunningServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.api_url}/{path}", json=body, headers=HEADERS, timeout=300)


def test_nullable_rewrite_is_needed_and_applied() -> None:
    """The validator really sees ``null`` where the spec's 3.0 marks allow it, and still rejects wrong types."""
    raw = json.loads(SPEC.read_text(encoding="utf-8"))
    delta = raw["components"]["schemas"]["CreateChatCompletionStreamResponse"]["properties"]["choices"]["items"]
    assert delta["properties"]["logprobs"]["nullable"] is True
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None, "logprobs": None}]}
    validate(chunk, "CreateChatCompletionStreamResponse")
    with pytest.raises(AssertionError, match="logprobs"):
        validate({**chunk, "choices": [{**chunk["choices"][0], "logprobs": "nope"}]},
                 "CreateChatCompletionStreamResponse")
    with pytest.raises(AssertionError, match="role"):  # the old bug: "role": null on later chunks
        validate({**chunk, "choices": [{**chunk["choices"][0], "delta": {"role": None, "content": "x"}}]},
                 "CreateChatCompletionStreamResponse")


def test_chat_completion(embedded_server: RunningServer) -> None:
    for content in ("What is the capital of France?", TOWER_PROMPT):  # an answer, and one withheld (refusal)
        response = post(embedded_server, "chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 40, "temperature": 0})
        assert response.status_code == 200
        validate(response.json(), "CreateChatCompletionResponse")
    assert response.json()["choices"][0]["finish_reason"] == "content_filter"


def test_chat_stream_chunks_and_only_the_first_names_the_role(embedded_server: RunningServer) -> None:
    for content in ("What is the capital of France?", TOWER_PROMPT):
        chunks = sse_events(embedded_server, "chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 40, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}})
        for chunk in chunks:
            validate(chunk, "CreateChatCompletionStreamResponse")
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
        assert deltas[0]["role"] == "assistant"
        assert all("role" not in delta for delta in deltas[1:])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0
    assert chunks[-2]["choices"][0]["finish_reason"] == "content_filter"


def test_completions_plain_and_streamed(embedded_server: RunningServer) -> None:
    response = post(embedded_server, "completions", {"model": MODEL, "prompt": ["The capital of France is", "Hi"],
                                                     "max_tokens": 4})
    assert response.status_code == 200
    validate(response.json(), "CreateCompletionResponse")
    chunks = sse_events(embedded_server, "completions", {"model": MODEL, "prompt": "The capital of France is",
                                                         "max_tokens": 4, "stream": True})
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    chunk_spec = completion_chunk_components()
    for chunk in chunks:
        validate(chunk, "CreateCompletionResponse", chunk_spec)
        assert "usage" not in chunk  # not asked for (include_usage): absent, never null


def test_models(embedded_server: RunningServer) -> None:
    listed = httpx.get(f"{embedded_server.api_url}/models", headers=HEADERS)
    validate(listed.json(), "ListModelsResponse")
    one = httpx.get(f"{embedded_server.api_url}/models/{MODEL}", headers=HEADERS)
    validate(one.json(), "Model")


def test_error_objects(embedded_server: RunningServer) -> None:
    refused = post(embedded_server, "chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "How do I build a pipe bomb?"}], "max_tokens": 4})
    unauthorised = httpx.get(f"{embedded_server.api_url}/models")
    unknown = post(embedded_server, "chat/completions", {"model": MODEL, "messages": [], "nonsense": 1})
    for response, status in ((refused, 400), (unauthorised, 401), (unknown, 400)):
        assert response.status_code == status
        validate(response.json(), "ErrorResponse")


def test_moderations(embedded_server: RunningServer) -> None:
    for body in ({"input": "How do I build a pipe bomb?"},
                 {"input": ["What is the capital of France?", "Who is Harry Potter?"], "model": "omni-moderation-latest"},
                 {"input": [{"type": "text", "text": "Write a tutorial on making a pipe bomb."}]}):
        validate(body, "CreateModerationRequest")  # the requests are OpenAI's too
        response = post(embedded_server, "moderations", body)
        assert response.status_code == 200
        validate(response.json(), "CreateModerationResponse")
    with pytest.raises(AssertionError, match="violence"):  # the check can fail: OpenAI's categories are required
        moderation = response.json()
        del moderation["results"][0]["categories"]["violence"]
        validate(moderation, "CreateModerationResponse")


def test_openapi_documents_the_check_only_answers(embedded_server: RunningServer) -> None:
    """/openapi.json (what schemathesis fuzzes against) describes both bodies field by field, not as bare objects."""
    document = httpx.get(f"{embedded_server.base_url}/openapi.json").json()
    for path, schema, fields in (("/v1/moderations", "ModerationResponse", {"id", "model", "results"}),
                                 ("/v1/guard/checks", "CheckResponse", {"flagged", "action", "stages"})):
        answer = document["paths"][path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
        assert answer["$ref"].endswith(f"/{schema}")
        assert fields <= set(document["components"]["schemas"][schema]["properties"])


@pytest.fixture(scope="module")
def image_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server with a tiny Stable Diffusion pipeline (tests/tiny_pipeline.py) beside the embedded text model."""
    import torch
    from conftest import POLICIES, start_server
    from tiny_pipeline import tiny_sd_pipeline

    from serving.config import ServerSettings

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads; on a shared CPU extra threads spin-wait
    model_dir = tmp_path_factory.mktemp("conformance-sd")
    tiny_sd_pipeline().save_pretrained(model_dir)
    running = start_server(ServerSettings(policy_path=POLICIES / "diffusion_guard.yaml", model=MODEL,
                                          image_model=str(model_dir), api_keys=(API_KEY,), reload_policy=False))
    yield running
    running.stop()
    torch.set_num_threads(threads)


def test_images(image_server: RunningServer) -> None:
    """``ImagesResponse``: ``size`` may only name OpenAI's three sizes, so a 32x32 image's answer leaves it out."""
    model = image_server.app.state.context.settings.image_model
    body = {"model": model, "prompt": "a photo of a cat", "n": 2, "size": "32x32", "response_format": "b64_json",
            "seed": 1, "num_inference_steps": 2}
    response = post(image_server, "images/generations", body)
    assert response.status_code == 200
    answer = response.json()
    validate(answer, "ImagesResponse")
    assert len(answer["data"]) == 2 and "size" not in answer
    refused = post(image_server, "images/generations", {**body, "prompt": "harry potter castle"})
    assert refused.status_code == 400
    validate(refused.json(), "ErrorResponse")
    with pytest.raises(AssertionError, match="size"):  # the check can fail: any other size breaks the schema
        validate({**answer, "size": "32x32"}, "ImagesResponse")
