"""Errors meant for people, and the entry-point wrapper that shows them without a traceback."""

import sys
from typing import Callable


class UserError(Exception):
    """A problem the user can fix (bad input, bad param, missing file); the message says how."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError prints its message and exits 1 instead of a traceback."""
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
