"""A session reads each of its inputs once and passes it on: the token folder's meta.json, each checkpoint's
state.json (checked with every safetensors header, which is the costly part)."""

from collections import Counter
from pathlib import Path

from train_helpers import make_workspace, session


def test_a_session_reads_the_token_meta_once_and_each_checkpoint_state_once(tmp_path, monkeypatch):
    root = make_workspace(tmp_path)
    # a first session leaves a checkpoint, which the second one finds, restores and prunes
    session(root, total_step_budget=4, save_every=2, eval_every=2)
    reads = Counter()
    read_text = Path.read_text

    def counted(path, *args, **kwargs):
        if path.name in ("meta.json", "state.json"):
            reads[(path.parent.parent.name, path.parent.name, path.name)] += 1
        return read_text(path, *args, **kwargs)
    monkeypatch.setattr(Path, "read_text", counted)
    result = session(root, total_step_budget=8, save_every=2, eval_every=2)
    assert result.end_step == 8
    assert reads[("data", "tokens", "meta.json")] == 1
    # each checkpoint folder: once when it is written (or found when deciding), once when the next save prunes it
    states = {key: n for key, n in reads.items() if key[2] == "state.json"}
    assert states and max(states.values()) <= 2, states
