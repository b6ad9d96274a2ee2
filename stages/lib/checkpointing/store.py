"""Where resume checkpoints are kept: the latest in `train.checkpoint_dir`, a recovery copy beside it outside
DVC's reach, and which one a session resumes (what a checkpoint holds is stages/lib/checkpointing/parts.py).

Saving: a checkpoint is written into `.tmp-step-...` in `train.checkpoint_dir`, fsynced and renamed into place
(stages/lib/base/files.py), so a crash leaves either the whole folder or none of it. Then it is hardlinked into the
recovery folder, and only then are older checkpoints removed from both, except the one saved where a wsd decay
began (`extension_point`), which a longer budget continues from. Only a checkpoint that was read and is
superseded is ever removed (and this code's own `.tmp-` leftovers): a folder that cannot be read stops the session
with its name and the reason (stages/lib/checkpointing/parts.py Unreadable) and stays where it is.

The recovery copy, `.checkpoint-recovery/` at the repository root (git-ignored, not a DVC output): `dvc exp run`
first checks out the checkpoint recorded in dvc.lock, which would replace a newer one left by a session that was
killed or crashed before DVC recorded it. A session that ends normally under DVC leaves a note (`recorded.json`)
naming its last checkpoint, which DVC then records. So when the recovery copy is newer than the checkpoint in
`train.checkpoint_dir`:
- it wins when no such note names it: its session never ended normally under DVC (a crash, a kill, a preemption,
  a session run by hand), so DVC's older checkpoint is only what `dvc exp run` restored; a note DVC's cache does not
  confirm counts as none (a kill after the stage's end, while DVC hashed its outputs:
  stages/lib/checkpointing/dvc_record.py);
- the checkpoint in `train.checkpoint_dir` wins when the note names the recovery copy: DVC recorded that newer
  checkpoint, so an older one in its place was restored on purpose (`git checkout` + `dvc checkout`,
  `dvc exp apply`).

One writer at a time: a session holds `.checkpoint-recovery.lock` while it may write checkpoints; a second session
fails at once, naming the process that holds it. Both live at the project's top folder
(stages/lib/base/project_root.py), so a `dvc exp run --temp` or `--queue` run, in a copy of the project DVC deletes
afterwards, recovers like a run in the workspace.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from stages.lib.base.files import exclusive_lock, fresh_folder, publish_folder, write_atomically
from stages.lib.base.project_root import at_root
from stages.lib.checkpointing.dvc_record import dvc_cache, recorded_in_cache
from stages.lib.checkpointing.parts import Checkpoint, Unreadable, capture, read_state, write

if TYPE_CHECKING:
    from stages.lib.checkpointing.parts import Trainee

RECOVERY_DIR = Path(".checkpoint-recovery")
PREFIX = "step-"
TMP_PREFIX = ".tmp-"
RECORDED_FILE = "recorded.json"  # in the recovery folder: the last checkpoint of a session that ended under DVC


@dataclass
class Found:
    """What a session finds before it decides: complete checkpoints, newest first, and what DVC recorded."""

    checkpoints: list[Checkpoint] = field(default_factory=list)
    recorded: dict | None = None  # {"step", "fingerprint"} of the checkpoint a session left to DVC, if any

    def recorded_by_dvc(self, checkpoint: Checkpoint) -> bool:
        """Whether `checkpoint` is the one the last session that ended under DVC left for DVC to record."""
        return self.recorded == {"step": checkpoint.step, "fingerprint": checkpoint.state["fingerprint"]}


def default_recovery_dir() -> Path:
    """The recovery folder at the project's top folder (see the module docstring)."""
    return at_root(RECOVERY_DIR)


def folder_name(step: int) -> str:
    """`step-00000600` for step 600 (zero-padded so folders sort by step)."""
    return f"{PREFIX}{step:08d}"


def find(checkpoint_dir: Path, recovery_dir: Path) -> Found:
    """Every checkpoint in the checkpoint folder and the recovery copy; Unreadable for the first that cannot be read.

    Two copies of the same run's step (same fingerprint) count once, the checkpoint folder's; the same step of two
    different runs (another seed, say) are both kept, so the caller can pick the one of its run.
    """
    found: dict[tuple[int, str], Checkpoint] = {}
    for folder in (Path(checkpoint_dir), Path(recovery_dir)):
        for path in sorted(folder.glob(f"{PREFIX}*")) if folder.is_dir() else []:
            if path.is_dir():
                state = read_state(path)
                found.setdefault((state["step"], state["fingerprint"]), Checkpoint(path, state))
    checkpoints = sorted(found.values(), key=lambda c: c.step, reverse=True)
    return Found(checkpoints, _confirmed(_read_recorded(Path(recovery_dir)), checkpoints, Path(checkpoint_dir)))


def _confirmed(recorded: dict | None, checkpoints: list[Checkpoint], checkpoint_dir: Path) -> dict | None:
    """The note that DVC recorded a checkpoint, when DVC's cache confirms it (or there is no cache to ask).

    The note only matters for a checkpoint found in the recovery folder alone (Found.recorded_by_dvc is asked of a
    recovery copy newer than the checkpoint in place), so DVC's cache is searched only then: after a session that
    ended normally the named checkpoint is in the checkpoint folder, and nothing is read."""
    named = [c for c in checkpoints
             if recorded == {"step": c.step, "fingerprint": c.state["fingerprint"]} and c.path.parent != checkpoint_dir]
    cache = dvc_cache() if named else None
    if cache is None:
        return recorded
    return recorded if any(recorded_in_cache(c.path, cache) for c in named) else None


class States:
    """The state.json of each checkpoint folder one piece of work looks at (a save, bringing a copy back), read and
    checked once: a save looks at the same folders several times (is it there, mirror it, prune around it, find the
    extension point), and each read parses state.json and every safetensors header of the folder."""

    def __init__(self, known: dict[Path, dict] | None = None):
        self._read = {Path(path): state for path, state in (known or {}).items()}

    def __call__(self, folder: Path) -> dict:
        folder = Path(folder)
        if folder not in self._read:
            self._read[folder] = read_state(folder)
        return self._read[folder]

    def forget(self, folder: Path) -> None:
        """`folder` was replaced or removed: read it again if asked."""
        self._read.pop(Path(folder), None)


def save(checkpoint_dir: Path, recovery_dir: Path, trainee: Trainee, state: dict) -> dict | None:
    """Save a checkpoint of every part, mirror it into the recovery folder, then drop older ones in both.
    Every process calls it; returns rank 0's captured parts (None on the others)."""
    captured = capture(trainee)
    if trainee.world.is_main:
        _publish(Path(checkpoint_dir), Path(recovery_dir), captured, state)
    trainee.world.barrier()  # the checkpoint is whole before any process goes on, or leaves
    return captured


def _publish(checkpoint_dir: Path, recovery_dir: Path, captured: dict, state: dict) -> Path:
    name = folder_name(state["step"])
    final = checkpoint_dir / name
    states = States()
    if not _holds(final, state, states):  # the same step of the same run saved twice holds the same state: keep it
        if final.exists():
            states(final)  # another run's checkpoint of this step is replaced; an unreadable one stops here
        tmp = fresh_folder(checkpoint_dir / f"{TMP_PREFIX}{name}")
        write(tmp, captured, state)
        _before_publish(tmp)
        publish_folder(tmp, final)
        states.forget(final)
    mirror(final, recovery_dir, states)
    for folder in (checkpoint_dir, recovery_dir):
        prune(folder, keep=name, also_keep=extension_point(folder, state, states), states=states)
    return final


def _holds(path: Path, state: dict, states: States) -> bool:
    """Whether `path` is a readable checkpoint of the same step of the same run as `state`.

    The same folder name can hold another run's checkpoint (DVC restores the committed run's step 2 while a new run
    saves its own step 2), which is then replaced, not kept.
    """
    if not path.exists():
        return False
    try:
        found = states(path)
    except Unreadable:
        return False
    return (found["step"], found["fingerprint"]) == (state["step"], state["fingerprint"])


def mirror(checkpoint: Path, folder: Path, states: States | None = None) -> Path:
    """Put a copy of `checkpoint` into `folder` (hardlinks where possible), atomically; return its path there."""
    states = states or States()
    target = Path(folder) / checkpoint.name
    if _holds(target, states(checkpoint), states):
        return target
    tmp = Path(folder) / f"{TMP_PREFIX}{checkpoint.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    copy_tree(checkpoint, tmp)
    if target.exists():
        states(target)  # an unreadable folder of the same name stops here rather than being replaced
    publish_folder(tmp, target)
    states.forget(target)
    return target


def bring_back(checkpoint: Checkpoint, checkpoint_dir: Path) -> Checkpoint:
    """The recovery copy `checkpoint` put back where DVC records it, the older checkpoint there removed."""
    states = States({checkpoint.path: checkpoint.state})
    restored = Checkpoint(mirror(checkpoint.path, checkpoint_dir, states), checkpoint.state)
    prune(checkpoint_dir, keep=restored.path.name, also_keep=extension_point(checkpoint_dir, checkpoint.state, states),
          states=states)
    return restored


def prune(folder: Path, keep: str, also_keep: str | None = None, states: States | None = None) -> None:
    """Remove from `folder` every readable checkpoint but `keep` (and `also_keep`), and this code's leftovers.

    A folder that cannot be read is never removed (its state may be the only copy of someone's work): it raises.
    A checkpoint is first renamed to a temporary name, then deleted, so a kill halfway through the deletion
    leaves a leftover that the next save clears, never a checkpoint with files missing.
    """
    if not Path(folder).is_dir():
        return
    for path in sorted(Path(folder).iterdir()):
        if path.name in (keep, also_keep) or not path.is_dir():
            continue
        if path.name.startswith(PREFIX):
            (states or read_state)(path)
            doomed = path.with_name(f"{TMP_PREFIX}old-{path.name}")
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(path, doomed)
            path = doomed
        elif not path.name.startswith(TMP_PREFIX):
            continue
        shutil.rmtree(path, ignore_errors=True)


def extension_point(folder: Path, state: dict, states: States | None = None) -> str | None:
    """The folder name of the newest checkpoint in `folder` saved where its run's learning-rate decay began (state
    `pre_decay`, see stages/lib/training/schedule.py) of the same run as `state`, no newer than it: a longer budget
    continues the run exactly from there (stages/lib/training/decision.py), so pruning keeps it beside the latest."""
    for path in sorted(Path(folder).glob(f"{PREFIX}*"), reverse=True) if Path(folder).is_dir() else []:
        found = (states or read_state)(path)
        if found.get("pre_decay") and found.get("run") == state.get("run") and found["step"] <= state["step"]:
            return path.name
    return None


def note_recorded(recovery_dir: Path, state: dict) -> None:
    """After a session that ended normally: under DVC, note that DVC records its last checkpoint (see above)."""
    if os.environ.get("DVC_STAGE"):  # set by DVC for the commands of its stages
        write_atomically(Path(recovery_dir) / RECORDED_FILE,
                         json.dumps({"step": state["step"], "fingerprint": state["fingerprint"]}) + "\n")


def _read_recorded(recovery_dir: Path) -> dict | None:
    try:
        recorded = json.loads((recovery_dir / RECORDED_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # none yet, or damaged: no claim that DVC recorded anything
        return None
    return recorded if isinstance(recorded, dict) else None


@contextlib.contextmanager
def session_lock(recovery_dir: Path) -> Iterator[None]:
    """Hold the workspace's checkpoint lock for a session (see the module docstring)."""
    path = Path(recovery_dir).with_name(f"{Path(recovery_dir).name}.lock")
    with exclusive_lock(path, "a training session of this workspace (it writes the checkpoint folder and "
                              f"{recovery_dir}/)"):
        yield


def _before_publish(tmp: Path) -> None:
    """Called with the written, not yet renamed folder; tests replace it to kill a process mid-save."""


def copy_tree(source: Path, target: Path) -> None:
    """Copy a checkpoint folder, hardlinking its files where the filesystem allows (no extra space)."""
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(source: str, target: str) -> None:
    try:
        Path(target).hardlink_to(source)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(source, target)
