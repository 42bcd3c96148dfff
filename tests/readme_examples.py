"""Run a README section's Python examples as written, against a live test server."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
ADDRESS = "http://localhost:8000"


def section(heading: str) -> str:
    """The README text under ``heading`` up to the next heading of any level."""
    return re.split(r"\n#{2,3} ", README.read_text(encoding="utf-8").split(heading, 1)[1], maxsplit=1)[0]


def python_examples(heading: str) -> list[str]:
    return re.findall(r"```python\n(.+?)\n```", section(heading), re.S)


def run_example(snippet: str, base_url: str, replacements: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """(what ``snippet`` printed, what its ``# `` comment lines say it prints), run against ``base_url``."""
    code = snippet.replace(ADDRESS, base_url)
    for old, new in (replacements or {}).items():
        code = code.replace(old, new)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})  # noqa: S102 - the README's own example
    expected = [line.removeprefix("# ") for line in snippet.splitlines() if line.startswith("# ")]
    return out.getvalue().splitlines(), expected
