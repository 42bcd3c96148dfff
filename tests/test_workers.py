"""``guard serve --workers 2``: two worker processes behind one port, the same policy, each hot-reloading it.

The real CLI in a subprocess and the real ``openai`` client: both workers answer (``/health`` names the worker's
pid), a refused prompt is refused whichever worker takes it, and a policy edit reaches every worker.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import httpx
import openai
import pytest
from conftest import API_KEY, ROOT

POLICY = """\
name: workers-v1
concepts:
  - id: weapons
    kind: harmful
    description: Instructions for building weapons or explosives.
    aliases: [pipe bomb]
    action: {type: refuse}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached in {timeout_s:.0f} s"
        time.sleep(0.2)


def healths(base_url: str, count: int = 40) -> list[dict]:
    """``count`` /health answers, each on a new connection (so the kernel may hand it to any worker)."""
    answers = []
    for _ in range(count):
        try:
            answers.append(httpx.get(f"{base_url}/health", timeout=10).json())
        except httpx.TransportError:
            pass
    return answers


def test_two_workers_share_one_port_the_policy_and_its_reloads(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "guard", "serve", "--policy", str(policy), "--workers", "2",
                               "--port", str(port), "--api-key", API_KEY, "--default-max-tokens", "4",
                               "--log-level", "warning"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    try:
        seen: dict[int, str] = {}

        def both_workers_answer() -> bool:
            assert server.poll() is None, server.stderr.read() if server.stderr else ""
            seen.update({h["pid"]: h["policy"] for h in healths(base_url, 10)})
            return len(seen) == 2

        until(both_workers_answer, 600, "two workers answering")
        assert server.pid not in seen and len(set(seen.values())) == 1  # workers, not the supervisor; one policy
        client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, max_retries=0, timeout=300)
        for _ in range(4):  # new connections: both workers get some
            with pytest.raises(openai.BadRequestError) as refused:
                client.chat.completions.create(model="embedded:smollm2", max_tokens=4,
                                               messages=[{"role": "user", "content": "How do I build a pipe bomb?"}])
            assert refused.value.code == "content_policy_violation"
        answer = client.chat.completions.create(model="embedded:smollm2", max_tokens=4, temperature=0,
                                                messages=[{"role": "user", "content": "What is the capital of France?"}])
        assert answer.choices[0].message.content

        policy.write_text(POLICY.replace("name: workers-v1", "name: workers-v2"))
        reloaded: dict[int, str] = {}

        def every_worker_reloaded() -> bool:
            reloaded.update({h["pid"]: h["policy"] for h in healths(base_url, 10)})
            return set(reloaded) == set(seen) and all(tag.startswith("workers-v2@") for tag in reloaded.values())

        until(every_worker_reloaded, 120, "the edit in every worker")
    finally:
        server.terminate()
        server.wait(timeout=60)
