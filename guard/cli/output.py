"""Where every command prints: results on stdout, errors as one line on stderr with exit code 2."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.markup import escape

console = Console()
errors = Console(stderr=True)


def fail(message: str) -> "typer.Exit":
    """Print ``message`` as one error line; ``raise fail(...)`` exits with code 2 (tracebacks are for bugs only)."""
    # Escaped: policy paths such as concepts[0].id must not be read as rich markup.
    errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True, soft_wrap=True)
    return typer.Exit(code=2)
