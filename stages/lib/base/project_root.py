"""The project's top folder, where state that must outlive a run's working copy lives: the checkpoint recovery copy
and its lock (stages/lib/checkpointing/store.py), and the content-hash cache (stages/lib/checkpointing/hashing.py).

`dvc exp run --temp` and `--queue` run a stage in a copy of the project under `.dvc/tmp/exps/`, a git repository of
its own that DVC deletes afterwards: state kept relative to the working folder, or to `git rev-parse --show-toplevel`,
would die with it. DVC tells every stage command the real project's folder in `DVC_ROOT` (the workspace itself for
`dvc repro` and `dvc exp run`), so that comes first; then the nearest folder above holding `.dvc/` (DVC's own root)
or `.git`; then the working folder.
"""

import os
from pathlib import Path

DVC_ROOT_ENV = "DVC_ROOT"  # set by DVC for the commands of its stages


def project_root(start: Path | None = None, env: dict | None = None) -> Path:
    """The project's top folder as the module docstring finds it (`start`: the working folder by default)."""
    env = os.environ if env is None else env
    if env.get(DVC_ROOT_ENV) and Path(env[DVC_ROOT_ENV]).is_dir():
        return Path(env[DVC_ROOT_ENV])
    here = Path.cwd() if start is None else Path(start).absolute()
    for marker in (".dvc", ".git"):
        for folder in (here, *here.parents):
            if (folder / marker).exists():
                return folder
    return here


def at_root(path: str | Path) -> Path:
    """A relative path taken from the project's top folder (an absolute one as it is); still relative, so messages
    stay short, when that folder is the working one."""
    root = project_root()
    if Path(path).is_absolute() or root.resolve() == Path.cwd().resolve():
        return Path(path)
    return root / path
