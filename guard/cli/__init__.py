"""The ``guard`` command line: the top floor, one module per command group, registered here explicitly.

Every command turns known failures (bad policy, missing model) into one clear line on stderr and
exit code 2; tracebacks are for bugs only. ``guard ...`` and ``python -m guard ...`` are the same program.
"""

from __future__ import annotations

import sys

import typer

from guard.cli import certify, edit, evaluate, policy, serve

app = typer.Typer(help="erasure-guard: make deployed generative models forget what a policy forbids.",
                  no_args_is_help=True, pretty_exceptions_enable=False)

policy_app = typer.Typer(help="Validate, inspect and calibrate policy files.", no_args_is_help=True)
policy_app.command("check")(policy.check)
policy_app.command("explain")(policy.explain)
policy_app.command("calibrate")(policy.calibrate)
policy_app.command("expand")(policy.expand)
policy_app.command("schema")(policy.schema)
app.add_typer(policy_app, name="policy")
app.command("serve")(serve.serve)
app.command("edit")(edit.edit)
app.command("certify")(certify.certify)
app.command("eval")(evaluate.evaluate)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
