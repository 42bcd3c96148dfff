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


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", ROOT.joinpath("README.md").read_text(), flags=re.S)


def test_readme_python_examples_parse_and_import_what_exists() -> None:
    """Every README example is valid Python and every project name it imports exists where it says."""
    import ast
    import importlib

    blocks = python_blocks()
    assert blocks
    for block in blocks:
        tree = ast.parse(block)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in (
                    "guard", "detectors", "serving"):
                module = importlib.import_module(node.module)
                for alias in node.names:
                    assert hasattr(module, alias.name), f"README imports {alias.name} from {node.module}"
