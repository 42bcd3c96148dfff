"""The README's set-up commands are the ones CI and users run."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_commands() -> list[str]:
    setup = ROOT.joinpath("README.md").read_text().split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_exactly_two_setup_commands_and_ci_runs_the_test_one() -> None:
    serve, test = setup_commands()
    assert "guard serve --policy policies/default.yaml --model embedded:smollm2" in serve
    assert "pytest" in test
    for command in (serve, test):
        assert "pip install torch==2.13.0" in command  # never an unpinned (CUDA) torch
    ci = ROOT.joinpath(".ci", "run").read_text()
    assert test in ci.splitlines()
