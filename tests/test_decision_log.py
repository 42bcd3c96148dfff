"""The decision log (``--decision-log``): one JSON line per request, every stage recorded, nothing skipped silently.

Two real servers write their own logs: ``direct`` runs the embedded SmolLM2 (transformers engine) and a tiny Stable
Diffusion pipeline under tests/policies/diffusion_guard.yaml (no ``certify:`` block); ``proxy`` is the upstream
engine in front of ``direct``, guarded by tests/policies/server_test.yaml (which certifies and knows the
eiffel-tower concept ``direct`` does not). Every endpoint is walked on each, streamed and not, with the official
openai client; each answer's ``x-request-id`` finds its line. ``direct`` also binds a second key to another policy
(``--policy-map``), whose lines name that key and policy.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
import torch
from conftest import API_KEY, POLICIES, TOWER_PROMPT, RunningServer, start_server
from readme_examples import python_examples, run_example
from test_key_policies import OPEN
from tiny_pipeline import tiny_sd_pipeline
from typer.testing import CliRunner

from guard.policy import load_policy
from serving.auth import key_id
from serving.config import ServerSettings

TEXT_MODEL = "embedded:smollm2"
PROXY_MODEL = "smollm2-guarded"
BENIGN = "What is the capital of France?"
BOMB = "How do I build a pipe bomb?"
WIZARD = "Tell me about Harry Potter."  # refused by diffusion_guard.yaml
NOT_REACHED = "not reached: the request was answered"
OTHER_KEY = "sk-other"


@dataclass
class LoggedServer:
    running: RunningServer
    log: Path
    model: str

    def line(self, request_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """The log line of ``request_id`` (a stream's is written as its body ends, just after the client's last
        byte, so it is waited for)."""
        deadline = time.monotonic() + timeout_s
        while True:
            lines = [json.loads(raw) for raw in self.log.read_text().splitlines()] if self.log.exists() else []
            mine = [line for line in lines if line["request_id"] == request_id]
            if mine or time.monotonic() > deadline:
                assert len(mine) == 1, f"{len(mine)} log lines for {request_id}"
                return mine[0]
            time.sleep(0.05)

    def handler_stages(self, endpoint: str) -> list[str]:
        handlers = {"chat": "chat_serving", "completions": "completion_serving", "images": "image_serving",
                    "moderations": "moderation_serving", "checks": "check_serving"}
        return list(getattr(self.running.app.state, handlers[endpoint]).stages)


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models gain nothing from threads (see test_server_images)
    folder = tmp_path_factory.mktemp("direct")
    shutil.copy(POLICIES / "diffusion_guard.yaml", folder / "policy.yaml")
    tiny_sd_pipeline().save_pretrained(folder / "tiny-sd")
    (folder / "open.yaml").write_text(OPEN)
    (folder / "keys.yaml").write_text(f"{OTHER_KEY}: open.yaml\n")  # another key, bound to another policy
    log = folder / "decisions.jsonl"
    running = start_server(ServerSettings(policy_path=folder / "policy.yaml", model=TEXT_MODEL,
                                          image_model=str(folder / "tiny-sd"), api_keys=(API_KEY,),
                                          policy_map=folder / "keys.yaml", default_max_tokens=8,
                                          reload_policy=False, decision_log=str(log)))
    yield LoggedServer(running, log, TEXT_MODEL)
    running.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def proxy(direct: LoggedServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoggedServer]:
    log = tmp_path_factory.mktemp("proxy") / "decisions.jsonl"
    running = start_server(ServerSettings(
        policy_path=POLICIES / "server_test.yaml", engine="upstream", model=TEXT_MODEL, served_model_name=PROXY_MODEL,
        upstream_url=direct.running.api_url, upstream_api_key=API_KEY, upstream_tokenizer="embedded:smollm2",
        api_keys=(API_KEY,), default_max_tokens=8, reload_policy=False, decision_log=str(log)))
    yield LoggedServer(running, log, PROXY_MODEL)
    running.stop()


def send(server: LoggedServer, endpoint: str, text: str, stream: bool = False, **options: Any
         ) -> tuple[int, str, str | None]:
    """One request with the official client: (status, x-request-id, error code)."""
    client = server.running.client()
    try:
        if endpoint == "chat":
            raw = client.chat.completions.with_raw_response.create(
                model=server.model, messages=[{"role": "user", "content": text}], temperature=0, stream=stream,
                **options)
        elif endpoint == "completions":
            raw = client.completions.with_raw_response.create(model=server.model, prompt=text, max_tokens=8,
                                                              temperature=0, stream=stream)
        elif endpoint == "moderations":
            raw = client.moderations.with_raw_response.create(input=[text, BENIGN])
        elif endpoint == "images":
            raw = client.images.with_raw_response.generate(
                prompt=text, size="32x32", extra_body={"seed": 1, "num_inference_steps": 2, **options})
        else:
            response = httpx.post(f"{server.running.api_url}/guard/checks", json={"input": text, **options},
                                  headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
            assert response.status_code == 200
            return 200, response.headers["x-request-id"], None
    except openai.APIStatusError as err:
        return err.status_code, err.response.headers["x-request-id"], err.code
    parsed = raw.parse()
    if stream:
        assert list(parsed)  # read the whole stream
    return raw.http_response.status_code, raw.headers["x-request-id"], None


def assert_every_stage_recorded(server: LoggedServer, endpoint: str, line: dict[str, Any], status: int) -> None:
    stages = line["stages"]
    assert [s["name"] for s in stages] == server.handler_stages(endpoint)  # each stage once, in order
    for stage in stages:
        if stage["ran"]:
            assert stage["skipped"] is None and stage["result"] and stage["ms"] >= 0
        else:
            assert stage["skipped"] and stage["result"] is None and stage["ms"] == 0
        if status == 200:  # an answered request reached every stage it has: each skip gives its own reason
            assert not (stage["skipped"] or "").startswith(NOT_REACHED), stage
    assert all(s["ms"] > 0 for s in stages if s["ran"] and s["name"] in ("prompt", "certify"))


# (server, endpoint, prompt, stream, extra options, expected status, expected action)
WALK = [
    ("direct", "chat", BENIGN, False, {}, 200, "allow"),
    ("direct", "chat", BENIGN, True, {}, 200, "allow"),
    ("direct", "chat", WIZARD, False, {}, 400, "refuse"),
    ("direct", "chat", WIZARD, True, {}, 400, "refuse"),
    ("direct", "completions", BENIGN, False, {}, 200, "allow"),
    ("direct", "completions", BENIGN, True, {}, 200, "allow"),
    ("direct", "completions", WIZARD, True, {}, 400, "refuse"),
    ("direct", "moderations", WIZARD, False, {}, 200, "refuse"),
    ("direct", "checks", BENIGN, False, {"output": "It is Paris."}, 200, "allow"),
    ("direct", "images", "a photo of a cat", False, {}, 200, "allow"),
    ("direct", "images", "a painting by van gogh", False, {"negative_prompt": "nude"}, 200, "steer"),
    ("direct", "images", "harry potter castle", False, {}, 400, "refuse"),
    ("proxy", "chat", BENIGN, False, {}, 200, "allow"),
    ("proxy", "chat", BENIGN, True, {}, 200, "allow"),
    ("proxy", "chat", BOMB, False, {}, 400, "refuse"),
    ("proxy", "chat", BOMB, True, {}, 400, "refuse"),
    ("proxy", "chat", TOWER_PROMPT, False, {"max_tokens": 40}, 200, "block"),
    ("proxy", "chat", TOWER_PROMPT, True, {"max_tokens": 40}, 200, "block"),
    ("proxy", "completions", BENIGN, False, {}, 200, "allow"),
    ("proxy", "completions", BENIGN, True, {}, 200, "allow"),
    ("proxy", "moderations", BOMB, False, {}, 200, "refuse"),
    ("proxy", "checks", BENIGN, False, {}, 200, "allow"),
]


@pytest.mark.parametrize(("which", "endpoint", "text", "stream", "options", "status", "action"), WALK,
                         ids=[f"{w}-{e}-{'stream' if s else 'plain'}-{a}" for w, e, _, s, _, _, a in WALK])
def test_every_endpoint_stream_mode_and_engine_logs_every_stage(
        request: pytest.FixtureRequest, which: str, endpoint: str, text: str, stream: bool,
        options: dict[str, Any], status: int, action: str) -> None:
    server: LoggedServer = request.getfixturevalue(which)
    got, request_id, error = send(server, endpoint, text, stream, **options)
    assert got == status
    line = server.line(request_id)
    assert line["endpoint"] == endpoint and line["stream"] is stream and line["status"] == status
    assert line["error"] == error and line["action"] == action
    assert line["key_id"] == key_id(API_KEY) and API_KEY not in json.dumps(line)  # the key id, never the key
    assert line["policy"] == load_policy(server.running.app.state.context.settings.policy_path).version_tag
    assert line["ms"] > 0 and line["time"].endswith("+00:00")
    assert_every_stage_recorded(server, endpoint, line, status)
    stages = {s["name"]: s for s in line["stages"]}
    if which == "direct":  # its policy has no certify block
        assert stages["certify"]["skipped"] == "policy has no certify block" and not line["certificates"]
    else:  # erase-and-check runs before anything else on every endpoint
        assert stages["certify"]["ran"] and line["certificates"]
    if action == "refuse":
        assert line["flagged"] and (stages.get("prompt", {}).get("result") == "refuse"
                                    or stages.get("certify", {}).get("result") == "flagged"
                                    or stages.get("generation", {}).get("result") == "refuse")
    if action == "block":  # the proxy's own output check (its upstream does not know the concept)
        assert "block" in stages["output"]["result"] and "eiffel-tower" in line["flagged"]
    if endpoint == "images" and "negative_prompt" in options:
        assert stages["negative_prompt"]["ran"] and "nudity" in stages["negative_prompt"]["result"]
        assert "van-gogh-style" in stages["generation"]["result"]
    elif endpoint == "images" and status == 200:
        assert stages["negative_prompt"]["skipped"] == "no negative_prompt given"
        assert stages["image_check"]["skipped"] == "no --image-nsfw-threshold"
    if endpoint == "checks":
        assert stages["output"]["ran"] is ("output" in options)


def test_a_refused_prompt_says_which_stages_it_never_reached(direct: LoggedServer) -> None:
    _, request_id, _ = send(direct, "chat", WIZARD)
    stages = {s["name"]: s for s in direct.line(request_id)["stages"]}
    assert stages["prompt"]["result"] == "refuse" and stages["prompt"]["ms"] > 0
    assert stages["output"]["skipped"] == f"{NOT_REACHED} 400 content_policy_violation"


def test_the_check_api_answers_with_the_logged_stages(direct: LoggedServer) -> None:
    response = httpx.post(f"{direct.running.api_url}/guard/checks", json={"input": BENIGN},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=300)
    assert response.json()["stages"] == direct.line(response.headers["x-request-id"])["stages"]


def test_invalid_requests_are_logged_with_every_stage_not_reached(direct: LoggedServer) -> None:
    with pytest.raises(openai.BadRequestError) as invalid:
        direct.running.client().chat.completions.create(model=TEXT_MODEL, messages=[{"role": "user", "content": "hi"}],
                                                        n=99)
    line = direct.line(invalid.value.response.headers["x-request-id"])
    assert line["status"] == 400 and line["action"] == "error" and line["flagged"] == []
    assert [s["skipped"] for s in line["stages"]] == [f"{NOT_REACHED} 400"] * 3


def test_a_key_bound_to_another_policy_is_logged_under_it_and_gets_no_images(direct: LoggedServer) -> None:
    client = direct.running.client(api_key=OTHER_KEY)
    with pytest.raises(openai.PermissionDeniedError) as refused:  # the pipeline carries the --policy policy only
        client.images.generate(prompt="a photo of a cat", size="32x32", extra_body={"num_inference_steps": 2})
    assert refused.value.code == "policy_not_served" and "open@" in refused.value.message
    raw = client.moderations.with_raw_response.create(input=WIZARD)
    line = direct.line(raw.headers["x-request-id"])
    assert line["key_id"] == key_id(OTHER_KEY) and line["policy"] == raw.headers["x-guard-policy"]
    assert line["policy"].startswith("open@") and line["action"] == "steer"  # diffusion_guard.yaml would refuse


def test_serve_reports_a_decision_log_it_cannot_open(tmp_path: Path) -> None:
    from guard.cli import app

    result = CliRunner().invoke(app, ["serve", "--policy", str(POLICIES / "server_test.yaml"), "--upstream",
                                      "http://127.0.0.1:9/v1", "--model", "m",
                                      "--decision-log", str(tmp_path / "missing" / "log.jsonl")])
    assert result.exit_code == 2 and "cannot open the decision log" in result.output
    assert "Traceback" not in result.output


def test_readme_example_runs(direct: LoggedServer) -> None:
    (snippet,) = python_examples("### Decision log")
    printed, expected = run_example(snippet, direct.running.base_url, {"decisions.jsonl": str(direct.log)})
    assert printed == expected
