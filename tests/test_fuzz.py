"""Fuzzing the live server with its own OpenAPI document (schemathesis): no 5xx, no answer outside the spec.

Schemathesis reads ``/openapi.json`` from a real guard server on loopback and sends generated requests over HTTP —
valid ones and deliberately invalid ones (wrong types, missing fields, odd strings) — to every operation. Each
response must be a documented status with the documented content type and body shape, and never a server error.
The server runs the embedded SmolLM2 with a tiny token limit, so the requests that do reach the model stay cheap.
"""

from __future__ import annotations

from collections import Counter
from typing import Iterator

import pytest
import schemathesis
from conftest import API_KEY, ROOT, RunningServer, start_server
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import APIOperation, GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.config import SchemathesisConfig

from serving.config import ServerSettings

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance, negative_data_rejection]
EXAMPLES_PER_OPERATION = 40
# What an invalid request may get: 400, 404 for a model the server does not serve, 413 for a body over the limit.
REJECTIONS = (400, 404, 413)
MODEL = "embedded:smollm2"


@pytest.fixture(scope="module")
def fuzzed_server() -> Iterator[RunningServer]:
    running = start_server(ServerSettings(policy_path=ROOT / "policies" / "default.yaml", model=MODEL,
                                          api_keys=(API_KEY,), max_request_bytes=20_000, max_tokens_limit=4,
                                          default_max_tokens=2, reload_policy=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def openapi_schema(fuzzed_server: RunningServer) -> schemathesis.BaseSchema:
    config = SchemathesisConfig.from_dict(
        {"checks": {"negative_data_rejection": {"expected-statuses": [str(status) for status in REJECTIONS]}}})
    return schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/openapi.json", config=config)


def deeper(case: schemathesis.Case, variant: str, text: str) -> schemathesis.Case:
    """Random model names are a plain 404 and random message lists rarely pass validation. So a third of the
    cases name the served model, and another third are one fuzzed prompt in a minimal body, which takes them
    through the guard's detectors, the certifier and the model."""
    if variant == "as generated":
        return case
    if isinstance(case.body, dict) and "model" in case.body:
        case.body["model"] = MODEL
    if case.path_parameters and "model" in case.path_parameters:
        case.path_parameters["model"] = MODEL
    if variant == "fuzzed prompt" and isinstance(case.body, dict):  # only what every request has, and stream
        prompt = {"messages": [{"role": "user", "content": text}]} if "messages" in case.body else {"prompt": text}
        case.body = {"model": MODEL, **prompt, "max_tokens": 2, "stream": case.body.get("stream") is True}
    return case


def fuzz(operation: APIOperation, mode: GenerationMode, statuses: Counter[tuple[str, int]]) -> str | None:
    """Run generated requests against one operation; the first failure's description, or None."""
    # Invalid cases stay as generated: naming the served model could make them valid.
    variants = ("as generated", "served model", "fuzzed prompt")
    if mode is GenerationMode.NEGATIVE:
        variants = variants[:1]
    cases = st.builds(deeper, operation.as_strategy(generation_mode=mode), st.sampled_from(variants), st.text())

    @given(case=cases)
    @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
              derandomize=True, database=None)
    def requests_within_spec(case: schemathesis.Case) -> None:
        response = case.call_and_validate(headers={"authorization": f"Bearer {API_KEY}"}, checks=CHECKS,
                                          timeout=120)
        statuses[operation.label, response.status_code] += 1

    try:
        requests_within_spec()
    except Unsatisfiable:  # an operation without parameters or body has no invalid form to send
        assert mode is GenerationMode.NEGATIVE
    except Exception as failure:  # noqa: BLE001 - schemathesis reports check failures as exception groups
        return f"{operation.label} ({mode.value}): {failure}"
    return None


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda mode: mode.value)
def test_every_operation_answers_within_its_spec(openapi_schema: schemathesis.BaseSchema,
                                                 mode: GenerationMode) -> None:
    operations = [result.ok() for result in openapi_schema.get_all_operations()]
    assert {op.label for op in operations} >= {"POST /v1/chat/completions", "POST /v1/completions",
                                               "POST /v1/images/generations", "GET /v1/models"}
    statuses: Counter[tuple[str, int]] = Counter()
    failures = [failure for op in operations if (failure := fuzz(op, mode, statuses)) is not None]
    assert not failures, "\n\n".join(failures)
    assert sum(statuses.values()) >= EXAMPLES_PER_OPERATION  # requests really went out
    if mode is GenerationMode.NEGATIVE:
        assert {status for _, status in statuses} <= set(REJECTIONS), statuses
    else:  # some generated requests were valid all the way through the guard and the model
        assert statuses["POST /v1/chat/completions", 200] and statuses["POST /v1/completions", 200], statuses
