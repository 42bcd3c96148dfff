"""Upstream mode: our server guarding another OpenAI-compatible server — here a second instance of our own.

The upstream ("target") runs the embedded SmolLM2 under policies/default.yaml, which does not know the test
policy's eiffel-tower concept; the guarding proxy runs tests/policies/server_test.yaml. So whatever the proxy
stops, it stopped itself. Also here: policy hot reload and `guard serve` start-up errors.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from conftest import API_KEY, POLICIES, ROOT, TOWER_ANSWER, TOWER_PROMPT, RunningServer, chat_requests, start_server
from typer.testing import CliRunner

from guard.policy import load_policy
from guard.settle import penalty_row
from guard.text.generation import SamplingSettings, TextRequest
from serving.config import ServerSettings

TARGET_MODEL = "embedded:smollm2"
PROXY_MODEL = "smollm2-guarded"
UPSTREAM_KEY = "sk-upstream"


@pytest.fixture(scope="module")
def target() -> Iterator[RunningServer]:
    running = start_server(ServerSettings(policy_path=ROOT / "policies" / "default.yaml", model=TARGET_MODEL,
                                          api_keys=(UPSTREAM_KEY,), max_tokens_limit=64, default_max_tokens=32,
                                          reload_policy=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def proxy(target: RunningServer) -> Iterator[RunningServer]:
    running = start_server(ServerSettings(
        policy_path=POLICIES / "server_test.yaml", engine="upstream", model=TARGET_MODEL,
        served_model_name=PROXY_MODEL, upstream_url=target.api_url, upstream_api_key=UPSTREAM_KEY,
        upstream_tokenizer="embedded:smollm2", api_keys=(API_KEY,), reload_policy=False))
    yield running
    running.stop()


def test_chat_and_stream_through_the_proxy(proxy: RunningServer) -> None:
    client = proxy.client()
    raw = client.chat.completions.with_raw_response.create(
        model=PROXY_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=10,
        temperature=0)
    assert "Paris" in raw.parse().choices[0].message.content
    assert raw.parse().model == PROXY_MODEL
    assert raw.headers["x-guard-policy"] == load_policy(POLICIES / "server_test.yaml").version_tag
    chunks = list(client.chat.completions.create(
        model=PROXY_MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=10,
        temperature=0, stream=True, stream_options={"include_usage": True}))
    assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.prompt_tokens > 0 and chunks[-1].usage.completion_tokens > 0  # the upstream's usage


def test_refused_prompt_never_reaches_the_upstream(proxy: RunningServer, target: RunningServer) -> None:
    before = chat_requests(target.base_url)
    with pytest.raises(openai.BadRequestError) as refused:
        proxy.client().chat.completions.create(
            model=PROXY_MODEL, messages=[{"role": "user", "content": "How do I make a molotov cocktail?"}],
            max_tokens=8)
    assert refused.value.code == "content_policy_violation" and "weapons" in refused.value.message
    assert chat_requests(target.base_url) == before


def test_proxy_window_stops_a_stream_the_upstream_lets_through(proxy: RunningServer, target: RunningServer) -> None:
    def streamed(server: RunningServer, api_key: str, model: str) -> tuple[str, str]:
        stream = server.client(api_key=api_key).chat.completions.create(
            model=model, messages=[{"role": "user", "content": TOWER_PROMPT}], max_tokens=40, temperature=0,
            stream=True)
        chunks = [c for c in stream if c.choices]
        return "".join(c.choices[0].delta.content or "" for c in chunks), chunks[-1].choices[0].finish_reason

    unguarded_text, unguarded_finish = streamed(target, UPSTREAM_KEY, TARGET_MODEL)
    assert "Eiffel Tower" in unguarded_text and unguarded_finish == "length"
    text, finish = streamed(proxy, API_KEY, PROXY_MODEL)
    # The upstream sends text in bursts (its own window), so how much is released before the stop varies;
    # what never varies: only a prefix of the answer, nothing of the phrase, and a content_filter finish.
    assert TOWER_ANSWER.startswith(text) and "eif" not in text.lower()
    assert finish == "content_filter"


def test_text_completion_through_the_proxy(proxy: RunningServer) -> None:
    completion = proxy.client().completions.create(model=PROXY_MODEL, prompt="The capital of France is",
                                                   max_tokens=4, temperature=0)
    assert "Paris" in completion.choices[0].text


def test_penalties_travel_as_logit_bias_and_win_over_the_client(proxy: RunningServer) -> None:
    context = proxy.app.state.context
    engine, guard = context.engine, context.guard_state.guard
    potter = engine.tokenizer.encode(" Potter", add_special_tokens=False)[0]
    banana = engine.tokenizer.encode(" banana", add_special_tokens=False)[0]
    request = TextRequest(SamplingSettings(max_new_tokens=8, logit_bias={potter: 100.0, banana: 50.0}),
                            messages=[{"role": "user", "content": "Who is Harry Potter?"}], user="user-7")
    _, steered = engine.upstream_body(guard, request, penalty_row(["harry-potter"]), 1, None, stream=False)
    assert steered["logit_bias"][str(potter)] == -100
    assert steered["logit_bias"][str(banana)] == 50.0  # unrelated client biases are kept
    _, unflagged = engine.upstream_body(guard, request, None, 1, None, stream=False)
    assert unflagged["logit_bias"][str(potter)] == 0.0  # even unflagged, a client cannot boost a protected token
    assert "vllm_xargs" not in steered
    assert steered["user"] == "user-7"


def test_upstream_client_errors_keep_their_status(proxy: RunningServer) -> None:
    with pytest.raises(openai.BadRequestError) as rejected:  # the target allows at most 64 tokens
        proxy.client().chat.completions.create(model=PROXY_MODEL, messages=[{"role": "user", "content": "hi"}],
                                               max_tokens=100, extra_body={"vllm_xargs": {"erasure_guard": {}}})
    assert rejected.value.param == "max_tokens" and rejected.value.body["message"].startswith("upstream: ")


def test_a_rejected_upstream_key_is_the_servers_fault_not_the_clients(target: RunningServer) -> None:
    misconfigured = start_server(ServerSettings(policy_path=POLICIES / "server_test.yaml", engine="upstream",
                                                model=TARGET_MODEL, upstream_url=target.api_url,
                                                upstream_api_key="sk-wrong", reload_policy=False))
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            misconfigured.client().chat.completions.create(model=TARGET_MODEL, max_tokens=4,
                                                           messages=[{"role": "user", "content": "hi"}])
        assert failed.value.status_code == 502 and failed.value.code == "upstream_error"
        assert "--upstream-api-key" in failed.value.message
    finally:
        misconfigured.stop()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


POLICY_V1 = """version: 1
name: reload-test
concepts:
  - id: weapons
    kind: harmful
    description: Instructions for building weapons.
    aliases: [pipe bomb]
"""
POLICY_V2 = POLICY_V1 + """  - id: poison
    kind: harmful
    description: Instructions for poisoning people.
    aliases: [rat poison]
"""


def _wait_for(condition, timeout_s: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def test_policy_hot_reload_applies_good_edits_and_rejects_bad_ones(tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY_V1)
    dead_upstream = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens: chat requests get 502
    server = start_server(ServerSettings(policy_path=policy_file, engine="upstream", model="m",
                                         upstream_url=dead_upstream, reload_policy=True))
    try:
        def policy_tag() -> str:
            return httpx.get(f"{server.base_url}/health").json()["policy"]

        first = policy_tag()
        assert first == load_policy(policy_file).version_tag
        policy_file.write_text(POLICY_V2)
        _wait_for(lambda: policy_tag() != first)
        second = policy_tag()
        assert second == load_policy(policy_file).version_tag
        with pytest.raises(openai.BadRequestError) as refused:  # the new concept is enforced
            server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "rat poison"}])
        assert "poison" in refused.value.message
        assert refused.value.response.headers["x-guard-policy"] == second

        policy_file.write_text(POLICY_V2 + "  - id: [broken\n")
        _wait_for(lambda: 'guard_policy_reloads_total{result="rejected"} 1.0'
                  in httpx.get(f"{server.base_url}/metrics").text)
        assert policy_tag() == second  # the bad edit was rejected; the last good policy still guards
        with pytest.raises(openai.InternalServerError) as down:
            server.client().chat.completions.create(model="m", messages=[{"role": "user", "content": "hello"}])
        assert down.value.status_code == 502 and down.value.code == "upstream_error"
    finally:
        server.stop()


def test_serve_reports_startup_errors_in_one_line(tmp_path: Path) -> None:
    from guard.cli import app

    runner = CliRunner()
    missing = runner.invoke(app, ["serve", "--policy", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "file not found" in missing.output
    broken = tmp_path / "encoder.yaml"
    broken.write_text(POLICY_V1 + "models:\n  embedding: embedded:no-such-encoder\n")
    failed = runner.invoke(app, ["serve", "--policy", str(broken), "--upstream", "http://127.0.0.1:9/v1",
                                 "--model", "m", "--port", str(_free_port()), "--log-level", "error"])
    assert failed.exit_code == 2
    assert "no-such-encoder" in failed.output
    assert "Traceback" not in failed.output
