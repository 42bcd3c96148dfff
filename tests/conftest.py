"""Shared fixtures: real guard servers (uvicorn on a free loopback port, in a background thread) and clients.

Servers are started once per test session: the embedded SmolLM2 weights are loaded once per process and
shared by every in-process engine, so a second embedded server costs only its guard.
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
POLICIES = Path(__file__).resolve().parent / "policies"
API_KEY = "sk-local"  # the key of the README examples
ADMIN_KEY = "sk-admin"  # an --admin-api-key of the embedded server (inline policies in /v1/guard/checks)
STARTUP_TIMEOUT_S = 600
# SmolLM2 answers this (greedy) with "The tallest tower in Paris is not a physical entity, but rather a
# historical landmark named the Eiffel Tower. ..." — the test policy's steer concept has no token penalty,
# so the model really writes the phrase and only the output check can stop it.
TOWER_PROMPT = "What is the tallest tower in Paris?"
TOWER_ANSWER = "The tallest tower in Paris is not a physical entity, but rather a historical landmark named the "


@dataclass
class RunningServer:
    """A guard server listening on 127.0.0.1 in this process."""

    base_url: str  # e.g. http://127.0.0.1:54321
    app: object
    server: object
    thread: threading.Thread

    @property
    def api_url(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, api_key: str = API_KEY, **options: object):  # noqa: ANN201 - openai.OpenAI
        from openai import OpenAI

        return OpenAI(base_url=self.api_url, api_key=api_key, max_retries=0, timeout=300, **options)

    def stop(self) -> None:
        self.server.should_exit = True  # type: ignore[attr-defined]
        self.thread.join(timeout=60)


def chat_requests(base_url: str, outcome: str | None = None) -> float:
    """How many chat requests the server at ``base_url`` has counted (with ``outcome``, or any), from /metrics."""
    import httpx

    label = re.escape(outcome) if outcome is not None else "[^\"]*"
    metrics = httpx.get(f"{base_url}/metrics").text
    return sum(float(v) for v in re.findall(rf'^guard_requests_total\{{endpoint="chat",outcome="{label}"\}} (\S+)$',
                                            metrics, re.M))


def start_server(settings: "object") -> RunningServer:
    """Build the app for ``settings`` and serve it on an OS-chosen loopback port until it is ready."""
    from guard.policy import load_policy
    from serving.app import build_app

    app = build_app(settings, load_policy(settings.policy_path))  # type: ignore[arg-type, attr-defined]
    return serve_app(app, startup_error=lambda: app.state.startup_error)


def serve_app(app: object, startup_error: "Callable[[], object]" = lambda: None) -> RunningServer:
    """Serve any ASGI ``app`` with uvicorn on an OS-chosen loopback port, in a thread, until it is ready."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="guard-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError(f"test server did not start: {startup_error()}")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError("test server did not start in time")
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    return RunningServer(f"http://127.0.0.1:{port}", app, server, thread)


@pytest.fixture(scope="session")
def embedded_server() -> Iterator[RunningServer]:
    """The in-process SmolLM2 engine guarded by tests/policies/server_test.yaml, with the README's API key."""
    from serving.config import ServerSettings

    running = start_server(ServerSettings(policy_path=POLICIES / "server_test.yaml", model="embedded:smollm2",
                                          api_keys=(API_KEY,), admin_api_keys=(ADMIN_KEY,), max_request_bytes=100_000,
                                          default_max_tokens=32, reload_policy=False))
    yield running
    running.stop()
