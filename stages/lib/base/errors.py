"""Errors meant for people, and the entry-point wrapper that shows them without a traceback."""

import errno
import os
import sys
from typing import Callable

WINDOWS_MESSAGE = ("native Windows is not supported (training relies on POSIX file locks, signals and folder "
                   "fsync); run it in WSL 2 (https://learn.microsoft.com/windows/wsl/install), in a Linux or macOS "
                   "machine, or in a Linux notebook such as Colab or Kaggle")


OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)  # a full disk, a full quota


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
    except OSError as err:
        if err.errno not in OUT_OF_SPACE:
            raise
        print(f"error: {out_of_space_message(err)}", file=sys.stderr)
        sys.exit(1)


def out_of_space_message(err: OSError) -> str:
    """What a full disk (or quota) means for the user's files, and what to do: a notebook's disk fills up with
    DVC's cache and checkpoints sooner or later."""
    where = f" while writing {err.filename}" if err.filename else ""
    return (f"no space left on the device{where} ({err.strerror}). What was being written was not put in place "
            "(outputs and checkpoints are written under a temporary name first), so the last complete checkpoint "
            "and outputs are as they were. Free space (`df -h .` shows what is left; `dvc gc --workspace` removes "
            "cache entries the workspace no longer uses; old experiments: `dvc exp remove`) and run the same "
            "command again: training resumes from the last checkpoint.")
