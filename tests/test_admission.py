"""Admission control (``--max-queue``): past the bound, 429 with Retry-After, which the official openai client retries.

The server admits one request at a time (``max_queue=1``). A request whose body is still being uploaded is inside
the server, so the test holds the one place for exactly as long as it wants: it sends a body that stops half-way
until the test releases it. The endpoint is ``/v1/moderations`` (no model needed; the engine is a dead upstream).
"""

from __future__ import annotations

import re
import threading
from typing import Iterator

import httpx
import openai
import pytest
from conftest import API_KEY, RunningServer, start_server
from readme_examples import python_examples, run_example
from test_key_policies import OPEN
from test_upstream import _free_port
from test_upstream import _wait_for as wait_for

from serving.config import ServerSettings


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    policy = tmp_path_factory.mktemp("admission") / "policy.yaml"
    policy.write_text(OPEN)
    running = start_server(ServerSettings(policy_path=policy, engine="upstream", model="m",
                                          upstream_url=f"http://127.0.0.1:{_free_port()}/v1", api_keys=(API_KEY,),
                                          max_queue=1, reload_policy=False))
    yield running
    running.stop()


def metric(server: RunningServer, pattern: str) -> float:
    found = re.search(rf"^{pattern} (\S+)$", httpx.get(f"{server.base_url}/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


class HeldRequest:
    """A moderation request whose body stops half-way until ``release()``: it holds a place in the server."""

    def __init__(self, server: RunningServer):
        self.released = threading.Event()
        self.status: int | None = None

        def body() -> Iterator[bytes]:
            yield b'{"input": "What is the capital'
            self.released.wait(60)
            yield b' of France?"}'

        def send() -> None:
            self.status = httpx.post(f"{server.api_url}/moderations", content=body(), timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}",
                                              "Content-Type": "application/json"}).status_code

        self.thread = threading.Thread(target=send, daemon=True)
        self.thread.start()
        wait_for(lambda: metric(server, "guard_admitted_requests") == 1)

    def release(self) -> None:
        self.released.set()
        self.thread.join(60)


def test_a_full_queue_answers_429_with_retry_after_and_the_sdk_retries_it(server: RunningServer) -> None:
    rejected = 'guard_rejected_requests_total\\{reason="queue_full"\\}'
    held = HeldRequest(server)
    try:
        with pytest.raises(openai.RateLimitError) as full:  # max_retries=0: the client sees the 429 itself
            server.client().moderations.create(input="hello")
        assert full.value.status_code == 429 and full.value.code == "rate_limit_exceeded"
        assert 1 <= int(full.value.response.headers["retry-after"]) <= 60 and "--max-queue 1" in full.value.message
        assert full.value.body["type"] == "requests" and full.value.param is None  # OpenAI's rate-limit shape
        assert metric(server, rejected) == 1
        # GET routes and probes are never queued.
        assert server.client().models.list().data and httpx.get(f"{server.base_url}/health").status_code == 200

        results: list[openai.types.ModerationCreateResponse] = []
        default_client = openai.OpenAI(base_url=server.api_url, api_key=API_KEY, timeout=60)  # default retries
        retrying = threading.Thread(target=lambda: results.append(default_client.moderations.create(input="hello")))
        retrying.start()
        wait_for(lambda: metric(server, rejected) == 2)  # its first try was turned away ...
    finally:
        held.release()
    retrying.join(60)
    assert held.status == 200
    assert len(results) == 1 and results[0].results[0].flagged is False  # ... and a retry after 1 s was answered
    assert metric(server, "guard_admitted_requests") == 0


def test_unauthenticated_requests_take_no_place(server: RunningServer) -> None:
    held = HeldRequest(server)
    try:
        with pytest.raises(openai.AuthenticationError):  # the key is checked first: 401, not 429
            server.client(api_key="sk-wrong").moderations.create(input="hello")
    finally:
        held.release()


def test_readme_example_runs(server: RunningServer) -> None:
    """The README's example, run while the server's one place is held and freed a second later."""
    (snippet,) = python_examples("### Admission control")
    held = HeldRequest(server)
    threading.Timer(1.0, held.release).start()
    printed, expected = run_example(snippet, server.base_url)
    assert printed[0].startswith("429 rate_limit_exceeded retry after ")
    assert printed[1:] == expected[1:]
