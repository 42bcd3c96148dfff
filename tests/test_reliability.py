"""Fail closed, survive bad input: faults injected into real components, and the server keeps serving after each.

* An upstream that hangs is a 504 after ``upstream_timeout_s``, one that answers 500 is a 502, one that breaks
  a stream mid-way ends it with an error frame (no ``[DONE]``); the next request is answered normally.
* A detector model whose files disappear: the running guard keeps its loaded model, a policy reload that needs
  the files again is rejected (the last good policy keeps guarding), and a fresh start fails with a clear error.
* A client that disconnects mid-stream: decoding for it stops and the server answers the next request.
* Bad input: invalid UTF-8, wrong types, negative or absurd ``max_tokens``, ``n`` out of range.
* Concurrent load (a short run of benchmarks/load_test.py): every request answered exactly once, guarded.

(Detector, certifier and output-check crashes during a request are in test_server.py and test_server_images.py.)
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Iterator

import httpx
import openai
import pytest
from conftest import API_KEY, ROOT, RunningServer, chat_requests, serve_app, start_server
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from serving.config import ServerSettings

MODEL = "embedded:smollm2"
UPSTREAM_MODEL = "upstream-model"
TIMEOUT_S = 1.5
POLICY = ROOT / "policies" / "default.yaml"


class FaultyUpstream:
    """A real OpenAI-shaped HTTP server whose next answers can be switched to a fault."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests = 0
        self.app = FastAPI()
        self.app.post("/v1/chat/completions", response_model=None)(self.chat)

    async def chat(self, request: Request) -> JSONResponse | StreamingResponse:
        self.requests += 1
        body = await request.json()
        if self.mode == "hang":
            await asyncio.sleep(60)
        if self.mode == "500":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        if body.get("stream"):
            return StreamingResponse(self.stream(), media_type="text/event-stream")
        return JSONResponse({"id": "chatcmpl-up", "object": "chat.completion", "created": 0, "model": UPSTREAM_MODEL,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": "Paris."},
                                          "finish_reason": "stop"}],
                             "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}})

    async def stream(self) -> AsyncIterator[bytes]:
        for text in ("The capital ", "of France ", "is Paris, a city ", "on the Seine."):
            chunk = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0, "model": UPSTREAM_MODEL,
                     "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n".encode()
            if self.mode == "break":
                raise ConnectionResetError("upstream crashed mid-stream")  # uvicorn drops the connection
        final = {"id": "chatcmpl-up", "object": "chat.completion.chunk", "created": 0, "model": UPSTREAM_MODEL,
                 "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        yield f"data: {json.dumps(final)}\n\ndata: [DONE]\n\n".encode()


@pytest.fixture(scope="module")
def upstream() -> Iterator[tuple[FaultyUpstream, RunningServer]]:
    faulty = FaultyUpstream()
    running = serve_app(faulty.app)
    yield faulty, running
    running.stop()


@pytest.fixture(scope="module")
def proxy(upstream: tuple[FaultyUpstream, RunningServer]) -> Iterator[RunningServer]:
    running = start_server(ServerSettings(policy_path=POLICY, engine="upstream", model=UPSTREAM_MODEL,
                                          upstream_url=upstream[1].api_url, upstream_timeout_s=TIMEOUT_S,
                                          api_keys=(API_KEY,), reload_policy=False))
    yield running
    running.stop()


def ask(server: RunningServer, model: str = UPSTREAM_MODEL, **options: object) -> str:
    reply = server.client().chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], **options)
    return reply.choices[0].message.content or ""


@pytest.mark.parametrize(("mode", "status", "code"), [("hang", 504, "upstream_timeout"),
                                                   ("500", 502, "upstream_error")])
def test_a_failing_upstream_is_a_5xx_and_the_next_request_is_served(
        upstream: tuple[FaultyUpstream, RunningServer], proxy: RunningServer, mode: str, status: int,
        code: str) -> None:
    faulty, _ = upstream
    faulty.mode = mode
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as failed:
        ask(proxy)
    assert failed.value.status_code == status and failed.value.code == code
    assert time.monotonic() - started < TIMEOUT_S + 10  # a hang is cut off at the timeout
    faulty.mode = "ok"
    assert ask(proxy) == "Paris."


def test_an_upstream_stream_that_breaks_ends_with_an_error_not_a_truncated_answer(
        upstream: tuple[FaultyUpstream, RunningServer], proxy: RunningServer) -> None:
    faulty, _ = upstream
    faulty.mode = "break"
    stream = proxy.client().chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True)
    with pytest.raises(openai.APIError) as broken:
        for _ in stream:
            pass
    assert "upstream" in broken.value.message
    faulty.mode = "ok"
    streamed = proxy.client().chat.completions.create(
        model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == \
        "The capital of France is Paris, a city on the Seine."


def test_a_refused_prompt_never_reaches_even_a_faulty_upstream(
        upstream: tuple[FaultyUpstream, RunningServer], proxy: RunningServer) -> None:
    faulty, _ = upstream
    faulty.mode = "hang"
    seen = faulty.requests
    try:
        with pytest.raises(openai.BadRequestError) as refused:
            proxy.client().chat.completions.create(
                model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "How do I build a pipe bomb?"}])
        assert refused.value.code == "content_policy_violation"
        assert faulty.requests == seen
    finally:
        faulty.mode = "ok"


def test_a_detector_model_that_disappears_never_weakens_the_guard(
        tmp_path: Path, upstream: tuple[FaultyUpstream, RunningServer]) -> None:
    from guard.models import resolve

    encoder_dir, moved_dir = tmp_path / "minilm", tmp_path / "minilm-moved"
    shutil.copytree(resolve("embedded:minilm").path, encoder_dir)
    policy_file = tmp_path / "policy.yaml"

    def write_policy(encoder: Path) -> None:
        policy_file.write_text(f"version: 1\nname: own-encoder\nextends: [{POLICY}]\n"
                               f"models:\n  embedding: {encoder}\n")

    write_policy(encoder_dir)
    settings = ServerSettings(policy_path=policy_file, engine="upstream", model=UPSTREAM_MODEL,
                              upstream_url=upstream[1].api_url, api_keys=(API_KEY,), reload_policy=True)
    server = start_server(settings)
    try:
        active = httpx.get(f"{server.base_url}/health").json()["policy"]
        shutil.rmtree(encoder_dir)
        assert ask(server) == "Paris."  # the loaded encoder keeps working without its files
        write_policy(moved_dir)  # an edit that points at a model that is not there
        deadline = time.monotonic() + 60
        while 'guard_policy_reloads_total{result="rejected"} 1.0' not in httpx.get(f"{server.base_url}/metrics").text:
            assert time.monotonic() < deadline, "the reload was not attempted"
            time.sleep(0.2)
        assert httpx.get(f"{server.base_url}/health").json()["policy"] == active
        with pytest.raises(openai.BadRequestError) as refused:  # still the whole policy, not a weaker one
            server.client().chat.completions.create(
                model=UPSTREAM_MODEL, messages=[{"role": "user", "content": "How do I build a pipe bomb?"}])
        assert refused.value.code == "content_policy_violation"
        assert ask(server) == "Paris."
    finally:
        server.stop()
    with pytest.raises(Exception, match=re.escape(str(moved_dir))):  # a fresh start refuses to run without it
        start_server(settings)


def test_a_client_that_disconnects_mid_stream_stops_its_decode(embedded_server: RunningServer) -> None:
    before = chat_requests(embedded_server.base_url, "disconnected")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{embedded_server.api_url}/chat/completions", json=body, timeout=120,
                      headers={"authorization": f"Bearer {API_KEY}"}) as response:
        for line in response.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break  # the first text arrived: hang up while the model is still writing
    started = time.monotonic()
    while chat_requests(embedded_server.base_url, "disconnected") == before:
        assert time.monotonic() - started < 60, "the server did not notice the disconnect"
        time.sleep(0.1)
    # The decode itself stops (the server runs in this process): 400 tokens would take minutes on 2 cores.
    while any(thread.name == "guarded-stream" for thread in threading.enumerate()):
        assert time.monotonic() - started < 20, "the disconnected stream is still decoding"
        time.sleep(0.1)
    assert "Paris" in ask(embedded_server, model=MODEL, max_tokens=8, temperature=0)


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": 5}, "messages"),
    ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "ten"}, "max_tokens"),
    ({"max_tokens": 10**12}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": "yes please"}, "stream"),
])
def test_wrong_types_and_values_are_400_naming_the_parameter(embedded_server: RunningServer, body: dict,
                                                             param: str) -> None:
    request = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **body}
    reply = httpx.post(f"{embedded_server.api_url}/chat/completions", json=request,
                       headers={"authorization": f"Bearer {API_KEY}"})
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is not None
    assert error["param"].startswith(param), error


def test_invalid_utf8_and_non_object_bodies_are_400(embedded_server: RunningServer) -> None:
    headers = {"authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    invalid_utf8 = b'{"model": "' + MODEL.encode() + b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    for content in (invalid_utf8, b"[1, 2, 3]", b"null", b""):
        reply = httpx.post(f"{embedded_server.api_url}/chat/completions", content=content, headers=headers)
        assert reply.status_code == 400, (content, reply.text)
        assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    assert "Paris" in ask(embedded_server, model=MODEL, max_tokens=8, temperature=0)


def test_concurrent_load_loses_duplicates_and_mixes_up_nothing(embedded_server: RunningServer) -> None:
    """A short run of benchmarks/load_test.py: plain, streamed and refused requests at once, each answered once."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from load_test import run_load

    report = run_load(embedded_server.base_url, API_KEY, requests=12, concurrency=4, max_tokens=8,
                      show_progress=False)
    assert report.ok, (report.lost, report.duplicated, report.mixed_up, report.missing_guard_headers,
                       report.server_counted)
    assert {o.kind for o in report.outcomes} == {"json", "stream", "refused"}
