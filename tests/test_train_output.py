"""What a session tells its user: the summary's numbers, one line per validation and save, plain lines in a log
file instead of a progress bar, and the loss curves as an image."""

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from train_helpers import make_workspace, read_tsv, run_stage

from stages.lib.base.progress import Progress
from stages.lib.checkpointing.live_logs import logged_rows
from stages.lib.training.loss_plot import loss_svg
from stages.lib.training.summary import SessionNumbers, read_losses, summary_lines


def test_the_summary_says_what_the_session_did_to_the_run():
    numbers = SessionNumbers(start_step=400, end_step=600, total_steps=1000, tokens_per_step=2048,
                             step_seconds=(3.0,) + (0.9,) * 199, stopped_by="steps_today",
                             checkpoint=Path("checkpoints/step-00000600"), checkpoint_bytes=14_200_000,
                             losses={"train/loss": (2.512, 2.101), "val/loss": (None, 2.25)},
                             live_dir=Path("outputs/live"))
    assert summary_lines(numbers) == [
        "session summary: steps 400 -> 600 of 1000 (stopped by steps_today)",
        "  tokens      409,600 this session, 1,228,800 in all",
        "  train/loss  2.5120 -> 2.1010",
        "  val/loss    2.2500",  # no validation before this session: its value alone
        "  time        3 min training, 0.900 s per step",  # 182 s in all; the first step's warm-up left out
        "  checkpoint  checkpoints/step-00000600 (14.2 MB)",
        "  left        400 steps: 2 more sessions of this length",
        "  see         dvc metrics show, dvc plots show, outputs/live/loss.svg",
    ]
    spent = SessionNumbers(990, 1000, 1000, 2048, (1.0,), "budget", None, 0, {}, Path("outputs/live"))
    assert "  left        nothing: the budget is spent (raise train.total_step_budget to continue the run)" in (
        summary_lines(spent))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two sessions of a 12-step run in separate processes (stdout and stderr are pipes, not a terminal)."""
    root = make_workspace(tmp_path_factory.mktemp("logged"))
    first = run_stage(root, steps_today=5, log_every=3)
    second = run_stage(root, steps_today=5, log_every=3)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    return root, second


def test_a_session_prints_the_summary_with_the_logged_numbers(logged):
    root, second = logged
    train, val = read_tsv(root, "train/loss"), read_tsv(root, "val/loss")
    assert f"  train/loss  {float(dict(train)[5]):.4f} -> {float(dict(train)[10]):.4f}" in second.stdout
    assert f"  val/loss    {float(dict(val)[5]):.4f} -> {float(dict(val)[10]):.4f}" in second.stdout
    assert "session summary: steps 5 -> 10 of 12 (stopped by steps_today)" in second.stdout
    assert "  tokens      320 this session, 640 in all" in second.stdout  # 4 windows of 16 tokens per step
    assert "  left        2 steps: 1 more session of this length" in second.stdout
    assert read_losses(root / "outputs" / "live", 5) == {"train/loss": (float(dict(train)[5]), float(dict(train)[10])),
                                                        "val/loss": (float(dict(val)[5]), float(dict(val)[10]))}


def test_without_a_terminal_the_log_is_plain_lines_one_per_event(logged):
    root, second = logged
    lines = second.stdout.splitlines() + second.stderr.splitlines()
    assert "\r" not in second.stdout + second.stderr
    assert max(len(line) for line in lines) < 200
    steps = [line.split(":")[0] for line in lines if line.startswith("step ") and "train/loss" in line]
    assert steps == ["step 6/12", "step 9/12", "step 10/12"]  # every log_every steps, and the session's last
    assert "step 8: val/loss " in second.stdout and "step 10: val/loss " in second.stdout
    assert "step 10: saved checkpoints/step-00000010 in " in second.stdout
    assert "steps 5->10" not in second.stderr  # no progress bar


def test_on_a_terminal_the_bar_shows_steps_and_events_still_print(capsys):
    with Progress(0, 4, total=4, log_every=1, terminal=True) as progress:
        for step in range(1, 5):
            progress.step(step, loss=1.0, lr=1e-3, tokens_per_sec=10.0)
        progress.event("step 4: val/loss 1.0000")
    captured = capsys.readouterr()
    assert "step 1/4" not in captured.out and captured.out.strip() == "step 4: val/loss 1.0000"
    assert "4/4" in captured.err  # the bar


def test_the_loss_curves_are_an_svg_drawn_from_the_logs(logged):
    root, _ = logged
    image = ET.fromstring((root / "outputs" / "live" / "loss.svg").read_text())
    lines = image.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(lines) == 2  # train/loss and val/loss
    train_points = lines[0].get("points").split()
    assert len(train_points) == len(logged_rows(root / "outputs" / "live", "train/loss")) == 10


def test_a_long_run_is_thinned_to_a_readable_image_that_keeps_its_last_point():
    rows = [(step, 10.0 / step) for step in range(1, 5001)]
    image = ET.fromstring(loss_svg({"train/loss": rows, "val/loss": rows[::500]}))
    train, val = image.findall("{http://www.w3.org/2000/svg}polyline")
    assert len(train.get("points").split()) == 1001 and len(val.get("points").split()) == 10
    assert train.get("points").split()[-1] == "624.0,320.0"  # step 5000, the lowest loss: the bottom right corner
