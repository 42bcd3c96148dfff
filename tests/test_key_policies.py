"""Per-key policies (``--policy-map``): the API key alone picks the policy, each hot-reloaded on its own.

The server guards a dead upstream (nothing listens): the check-only endpoints need no model, and a chat request the
guard lets through fails with 502 — so a 400 proves the guard refused it before anything was sent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from conftest import ROOT, RunningServer, start_server
from readme_examples import python_examples, run_example
from test_upstream import _free_port
from test_upstream import _wait_for as wait_for
from typer.testing import CliRunner

from guard.policy import load_policy
from serving.auth import key_id
from serving.config import ServerSettings

OPEN_KEY, KIDS_KEY = "sk-open", "sk-kids"
OPEN = """version: 1
name: open
concepts:
  - id: weapons
    kind: harmful
    description: Instructions for building weapons.
    aliases: [pipe bomb]
  - id: harry-potter
    kind: knowledge
    description: The Harry Potter franchise.
    aliases: [Harry Potter, Hogwarts]
    action: {type: steer}
"""
KIDS = OPEN.replace("name: open", "name: kids").replace("action: {type: steer}", "action: {type: refuse}")
WIZARD = "Tell me about Harry Potter."


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("key-policies")
    (folder / "open.yaml").write_text(OPEN)
    (folder / "kids.yaml").write_text(KIDS)
    # One entry by key (the map then holds a secret), one by key id (it need not).
    (folder / "keys.yaml").write_text(f"{KIDS_KEY}: kids.yaml\n{key_id(OPEN_KEY)}: open.yaml\n")
    return folder


@pytest.fixture(scope="module")
def server(folder: Path) -> Iterator[RunningServer]:
    running = start_server(ServerSettings(policy_path=folder / "open.yaml", policy_map=folder / "keys.yaml",
                                          engine="upstream", model="m", upstream_url=f"http://127.0.0.1:{_free_port()}/v1",
                                          api_keys=(OPEN_KEY,), reload_policy=True))
    yield running
    running.stop()


def moderate(server: RunningServer, key: str, **options: object) -> tuple[str, str]:
    """(x-guard-policy, the guard's action) for WIZARD under ``key``."""
    raw = server.client(api_key=key).moderations.with_raw_response.create(input=WIZARD, **options)
    return raw.headers["x-guard-policy"], raw.parse().results[0].model_extra["guard"]["action"]


def test_each_key_is_guarded_by_its_own_policy(server: RunningServer, folder: Path) -> None:
    open_tag, kids_tag = (load_policy(folder / name).version_tag for name in ("open.yaml", "kids.yaml"))
    assert moderate(server, OPEN_KEY) == (open_tag, "steer")
    assert moderate(server, KIDS_KEY) == (kids_tag, "refuse")
    with pytest.raises(openai.BadRequestError) as refused:  # the kids policy refuses before any upstream call
        server.client(api_key=KIDS_KEY).chat.completions.create(model="m", messages=[{"role": "user",
                                                                                      "content": WIZARD}])
    assert refused.value.code == "content_policy_violation"
    assert refused.value.response.headers["x-guard-policy"] == kids_tag
    with pytest.raises(openai.InternalServerError) as passed:  # the open policy steers: the guard lets it through
        server.client(api_key=OPEN_KEY).chat.completions.create(model="m", messages=[{"role": "user",
                                                                                      "content": WIZARD}])
    assert passed.value.code == "upstream_error"
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="sk-unknown").moderations.create(input=WIZARD)


def test_a_client_cannot_pick_another_keys_policy(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as other:  # naming the weaker policy is refused, not obeyed
        moderate(server, KIDS_KEY, model="open")
    assert other.value.code == "model_not_found" and "kids@" in other.value.message
    health = httpx.get(f"{server.base_url}/health").json()
    assert set(health["key_policies"]) == {key_id(KIDS_KEY), key_id(OPEN_KEY)}
    assert KIDS_KEY not in str(health) and health["key_policies"][key_id(KIDS_KEY)].startswith("kids@")


def test_each_policy_reloads_on_its_own(server: RunningServer, folder: Path) -> None:
    open_tag, kids_tag = moderate(server, OPEN_KEY)[0], moderate(server, KIDS_KEY)[0]
    edited = KIDS + """  - id: dragons
    kind: other
    description: Dragons.
    aliases: [dragon]
"""
    (folder / "kids.yaml").write_text(edited)
    wait_for(lambda: moderate(server, KIDS_KEY)[0] != kids_tag)
    assert moderate(server, KIDS_KEY)[0] == load_policy(folder / "kids.yaml").version_tag
    assert moderate(server, OPEN_KEY)[0] == open_tag  # the other policy is untouched
    new_kids = moderate(server, KIDS_KEY)[0]
    (folder / "kids.yaml").write_text(edited + "  - id: [broken\n")
    wait_for(lambda: 'guard_policy_reloads_total{result="rejected"}' in httpx.get(f"{server.base_url}/metrics").text)
    assert moderate(server, KIDS_KEY) == (new_kids, "refuse")  # the last good kids policy still guards


@pytest.mark.parametrize(("map_text", "api_keys", "message"), [
    ("sk-kids: kids.yaml\nsk-other: missing.yaml\n", [], "keys.yaml:2: policy file not found: missing.yaml"),
    ("sk-kids: kids.yaml\nkey-0123456789ab: open.yaml\n", [], "keys.yaml:2: key-0123456789ab is not the key id of "
                                                           "any --api-key key"),
    (f"sk-open: kids.yaml\n{key_id(OPEN_KEY)}: open.yaml\n", [], "keys.yaml:2: binds the same key as line 1"),
    ("sk-kids:\n  - kids.yaml\n", [], "keys.yaml:1: the entry must name a policy file"),
    ("- kids.yaml\n", [], "keys.yaml:1: a policy map must be a mapping"),
])
def test_a_bad_policy_map_is_one_line_naming_file_and_line(tmp_path: Path, map_text: str, api_keys: list[str],
                                                           message: str) -> None:
    from guard.cli import app

    (tmp_path / "open.yaml").write_text(OPEN)
    (tmp_path / "kids.yaml").write_text(KIDS)
    (tmp_path / "keys.yaml").write_text(map_text)
    result = CliRunner().invoke(app, ["serve", "--policy", str(tmp_path / "open.yaml"), "--policy-map",
                                      str(tmp_path / "keys.yaml"), "--upstream", "http://127.0.0.1:9/v1",
                                      "--model", "m", "--api-key", OPEN_KEY])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert "sk-kids" not in result.output and len(result.output.strip().splitlines()) == 1


def test_readme_example_runs() -> None:
    """The shipped map (policies/keys.yaml: key ids of sk-local and sk-kids) with the README's serve options."""
    policies = ROOT / "policies"
    running = start_server(ServerSettings(policy_path=policies / "default.yaml", policy_map=policies / "keys.yaml",
                                          engine="upstream", model="m", upstream_url=f"http://127.0.0.1:{_free_port()}/v1",
                                          api_keys=("sk-local", "sk-kids"), reload_policy=False))
    try:
        (snippet,) = python_examples("### Per-key policies")
        printed, expected = run_example(snippet, running.base_url)
        assert printed == expected
    finally:
        running.stop()
