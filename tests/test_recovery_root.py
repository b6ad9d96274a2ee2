"""Where recovery state lives (the project's top folder, also for runs in DVC's temporary copies) and when the note
that DVC recorded a checkpoint counts (only once DVC's cache lists it)."""

import hashlib
import json

from stages.lib.base.project_root import project_root
from stages.lib.checkpointing.dvc_record import dvc_cache, recorded_in_cache


def test_the_project_root_is_dvcs_root_even_from_a_temporary_copy(tmp_path):
    project = tmp_path / "project"
    copy = project / ".dvc" / "tmp" / "exps" / "tmpabc"  # where `dvc exp run --temp` runs a stage
    (copy / ".git").mkdir(parents=True)
    (copy / ".dvc").mkdir()
    assert project_root(copy, env={"DVC_ROOT": str(project)}) == project  # what DVC tells its stages
    assert project_root(copy, env={}) == copy  # without DVC's word, the copy is a project of its own
    (project / "sub").mkdir()
    assert project_root(project / "sub", env={}) == project
    assert project_root(tmp_path / "nowhere", env={}) == tmp_path / "nowhere"


def committed_folder(cache, name, files):
    """A folder object in DVC's cache listing `files` (relpath -> content) as `dvc commit` writes it."""
    listing = [{"md5": hashlib.md5(data.encode()).hexdigest(), "relpath": rel} for rel, data in files.items()]
    text = json.dumps(listing)
    digest = hashlib.md5(text.encode()).hexdigest()
    path = cache / "files" / "md5" / digest[:2] / f"{digest[2:]}.dir"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_checkpoint_counts_as_recorded_only_when_dvcs_cache_lists_it(tmp_path):
    (tmp_path / ".dvc").mkdir()
    assert dvc_cache(tmp_path) == tmp_path / ".dvc" / "cache"
    cache = dvc_cache(tmp_path)
    checkpoint = tmp_path / "checkpoints" / "step-00000008"
    checkpoint.mkdir(parents=True)
    (checkpoint / "state.json").write_text('{"step": 8, "fingerprint": "a"}')
    committed_folder(cache, "checkpoints", {"step-00000004/state.json": '{"step": 4, "fingerprint": "a"}'})
    assert not recorded_in_cache(checkpoint, cache)  # DVC was killed before it cached step 8
    committed_folder(cache, "checkpoints", {"step-00000008/state.json": '{"step": 8, "fingerprint": "b"}'})
    assert not recorded_in_cache(checkpoint, cache)  # another run's step 8
    committed_folder(cache, "checkpoints", {"step-00000008/state.json": '{"step": 8, "fingerprint": "a"}'})
    assert recorded_in_cache(checkpoint, cache)
    (tmp_path / ".dvc" / "config.local").write_text("[cache]\n    dir = ../../shared-cache\n")
    assert dvc_cache(tmp_path) == (tmp_path.parent / "shared-cache").resolve()
    assert dvc_cache(tmp_path / "checkpoints") is None
