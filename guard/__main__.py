"""``python -m guard``: the same program as the ``guard`` command."""

from guard.cli import main

main()
