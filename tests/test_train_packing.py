"""The train stage with whole documents packed into samples: exact resume, what it reports, which data gets it."""

import json

import pytest
from train_helpers import checkpoint_step, make_workspace, read_tsv, session, tree_bytes

from stages.lib.base.errors import UserError


def state(root):
    return json.loads(next((root / "checkpoints").glob("step-*")).joinpath("state.json").read_text())


def test_instruction_data_is_packed_as_documents_and_three_sessions_equal_one(tmp_path, capsys):
    one = make_workspace(tmp_path / "one", prompts=True)
    session(one)
    out = capsys.readouterr().out
    assert "packing: documents: " in out and "% padding" in out and "cut into pieces" in out
    split = make_workspace(tmp_path / "split", prompts=True)
    for day in range(3):
        result = session(split, steps_today=4)
        assert (result.start_step, result.end_step) == (4 * day, 4 * day + 4)
    last = "checkpoints/step-00000012"
    for name in ("model.safetensors", "optimizer.safetensors", "optimizer.json", "rng.json"):  # bit for bit
        assert (split / last / name).read_bytes() == (one / last / name).read_bytes(), name
    assert tree_bytes(split / "models") == tree_bytes(one / "models")
    for metric in ("train/loss", "val/loss", "grad_norm"):
        assert read_tsv(split, metric) == read_tsv(one, metric)
    saved = state(split)
    assert saved["fingerprint_values"]["packing"] == "documents"
    cursor = saved["data_cursor"]
    assert cursor["samples_seen"] == 12 * 4 and 0 < cursor["documents_in_epoch"] <= cursor["documents_per_epoch"]
    facts = json.loads((split / "outputs" / "live" / "metrics.json").read_text())["data"]
    assert 0 < facts["padding_share"] < 1 and facts["documents_split"] > 0


def test_plain_text_is_cut_as_a_stream_and_changing_the_packing_starts_a_new_run(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, steps_today=4)
    assert "packing: stream: " in capsys.readouterr().out
    assert state(root)["fingerprint_values"]["packing"] == "stream"
    result = session(root, steps_today=4, packing="documents")
    assert result.start_step == 0 and checkpoint_step(root) == 4
    assert "packing: 'stream' -> 'documents'" in capsys.readouterr().out


def test_token_files_of_the_old_format_are_refused_with_what_to_do(tmp_path):
    root = make_workspace(tmp_path)
    meta_path = root / "data" / "tokens" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["format_version"] = 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"format 1, but this code reads format 2 .*rerun the tokenize stage"):
        session(root)


def test_a_model_that_would_let_packed_documents_see_each_other_is_refused(tmp_path, monkeypatch):
    import transformers.masking_utils as masking
    root = make_workspace(tmp_path, prompts=True)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    with pytest.raises(UserError, match="ignores the position ids that keep packed documents apart"):
        session(root)


def flash_attention_picked(leaks: bool):
    """pick_document_attention as it goes on a GPU with flash-attn: the session believes the variable-length kernel
    is picked (the attention here stays sdpa, the only one a CPU has) and, with `leaks`, the attention from then on
    lets packed documents see each other, as a broken kernel would."""
    import transformers.masking_utils as masking

    def pick(model, device, autocast_dtype):
        if leaks:
            masking.find_packed_sequence_indices = lambda position_ids: None  # restored by the test's monkeypatch
        return "flash_attention_2"
    return pick


@pytest.mark.parametrize("leaks", [False, True])
def test_the_documents_probe_runs_again_after_the_switch_to_flash_attention(tmp_path, monkeypatch, capsys, leaks):
    import transformers.masking_utils as masking

    from stages.lib.training import trainer
    monkeypatch.setattr(masking, "find_packed_sequence_indices", masking.find_packed_sequence_indices)
    monkeypatch.setattr(trainer, "pick_document_attention", flash_attention_picked(leaks))
    root = make_workspace(tmp_path, prompts=True)
    if leaks:
        with pytest.raises(UserError, match="with flash-attention .* the packed documents of a probe attended to each"):
            session(root, total_step_budget=2)
        assert not (root / "checkpoints").exists()
    else:
        assert session(root, total_step_budget=2).end_step == 2
        assert "variable-length kernel, checked on the device to keep them apart" in capsys.readouterr().out
