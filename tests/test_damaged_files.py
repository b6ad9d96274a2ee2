"""Every failure a user's files can cause ends in a message naming the file and what to do, never a traceback."""

import json
import shutil

import pytest
from train_helpers import make_tokenizer, make_workspace, read_tsv, run_stage, session

from stages.lib.base.errors import UserError
from stages.lib.modeling.inference import choose_style
from stages.lib.tokenizing.records import templates_used
from stages.lib.tokenizing.token_files import FORMAT_VERSION as TOKEN_FORMAT
from stages.lib.tokenizing.token_files import open_split, read_meta


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = make_workspace(tmp_path_factory.mktemp("trained"))
    session(root, steps_today=4)
    return root


def copy_of(trained, tmp_path):
    root = tmp_path / "workspace"
    shutil.copytree(trained, root)
    return root


def test_a_meta_json_that_is_not_json(tmp_path):
    (tmp_path / "meta.json").write_text('{"format_version": 1, "dty')
    with pytest.raises(UserError, match=r"meta\.json is damaged .*rerun the tokenize stage"):
        read_meta(tmp_path)


def test_a_bad_line_in_a_token_jsonl_names_its_line(tmp_path):
    meta = {"format_version": TOKEN_FORMAT, "dtype": "uint16", "vocab_size": 8, "eos_id": 0,
            "tokenizer_fingerprint": "", "bin": False, "jsonl": True,
            "splits": {"train": {"documents": 2, "tokens": 4, "loss_tokens": 4, "sha256": ""}}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "train.jsonl").write_text('{"ids": [1, 0], "mask": [1, 1]}\n{"ids": [2, 0], "mas": [1, 1]}\n')
    with pytest.raises(UserError, match=r"train\.jsonl:2: expected .*KeyError"):
        open_split(tmp_path, "train")


def test_a_damaged_stats_json_of_the_render_stage(tmp_path):
    (tmp_path / "stats.json").write_text("{not json")
    with pytest.raises(UserError, match=r"stats\.json is damaged .*rerun the render stage"):
        templates_used(tmp_path)
    make_tokenizer(tmp_path / "tok")
    from transformers import AutoTokenizer
    with pytest.raises(UserError, match=r"stats\.json is damaged"):
        choose_style(AutoTokenizer.from_pretrained(tmp_path / "tok"), None, False, rendered_dir=tmp_path)


def test_a_log_row_cut_short_by_a_kill_is_dropped_with_a_note(trained, tmp_path, capsys):
    root = copy_of(trained, tmp_path)
    loss_log = root / "outputs" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    loss_log.write_text(loss_log.read_text() + "5\t4.1\n6")  # a newer row, then one cut short
    session(root, steps_today=1)
    assert "loss.tsv:7: dropped a log row that cannot be read" in capsys.readouterr().out
    assert [step for step, _ in read_tsv(root, "train/loss")] == [1, 2, 3, 4, 5]


def test_a_log_file_without_its_header_stops_the_session_naming_it(trained, tmp_path):
    root = copy_of(trained, tmp_path)
    loss_log = root / "outputs" / "live" / "plots" / "metrics" / "train" / "loss.tsv"
    loss_log.write_text("1\t4.0\n")
    done = run_stage(root, steps_today=1)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "loss.tsv: expected DVCLive's header `step<TAB><metric>`" in done.stderr


def test_an_init_from_folder_transformers_cannot_load(trained, tmp_path):
    root = copy_of(trained, tmp_path)
    base = tmp_path / "base"
    shutil.copytree(root / "models" / "tiny", base)
    (base / "model.safetensors").write_bytes(b"not weights")
    done = run_stage(root, init_from=str(base))
    assert done.returncode == 1 and "Traceback" not in done.stderr
    # the base's files are checked before transformers is asked to load them: the damaged file is named
    assert f"{base / 'model.safetensors'}: not a readable safetensors file" in done.stderr
    assert "download or export the base again" in done.stderr


def test_native_windows_stops_at_start_pointing_to_wsl(monkeypatch, capsys):
    from stages.lib.base import errors
    monkeypatch.setattr(errors.os, "name", "nt")
    with pytest.raises(SystemExit) as stopped:
        errors.run_stage(lambda: pytest.fail("a stage must not start on native Windows"))
    assert stopped.value.code == 1 and "run it in WSL 2" in capsys.readouterr().err


def test_a_full_disk_is_a_message_saying_nothing_complete_was_replaced_and_what_to_do(capsys):
    import errno

    from stages.lib.base import errors

    def fills_the_disk():
        raise OSError(errno.ENOSPC, "No space left on device", "checkpoints/.tmp-step-00000010/model.safetensors")

    with pytest.raises(SystemExit) as stopped:
        errors.run_stage(fills_the_disk)
    message = capsys.readouterr().err
    assert stopped.value.code == 1 and message.startswith("error: no space left on the device while writing "
                                                          "checkpoints/.tmp-step-00000010/model.safetensors")
    assert "the last complete checkpoint" in message and "dvc gc --workspace" in message
    assert "Traceback" not in message
    with pytest.raises(PermissionError):  # any other OSError is not ours to explain
        errors.run_stage(lambda: (_ for _ in ()).throw(PermissionError(errno.EACCES, "Permission denied")))
