"""Errors meant for people, and the entry-point wrapper that shows them without a traceback."""

import os
import sys
from typing import Callable

WINDOWS_MESSAGE = ("native Windows is not supported (training relies on POSIX file locks, signals and folder "
                   "fsync); run it in WSL 2 (https://learn.microsoft.com/windows/wsl/install), in a Linux or macOS "
                   "machine, or in a Linux notebook such as Colab or Kaggle")


class UserError(Exception):
    """A problem the user can fix (bad input, bad param, missing file); the message says how."""


def run_stage(main: Callable[[], None]) -> None:
    """Run a stage's main(); a UserError prints its message and exits 1 instead of a traceback."""
    if os.name == "nt":
        print(f"error: {WINDOWS_MESSAGE}", file=sys.stderr)
        sys.exit(1)
    try:
        main()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
