"""The session plan: seconds per step, when the session ends and what ends it, the sessions the budget still needs,
and what each session adds to DVC's cache; printed and logged once the first steps are timed."""

import math

import pytest
from train_helpers import make_workspace, read_tsv, session

from stages.lib.base.params import LoraParams, ModelParams
from stages.lib.modeling import lora
from stages.lib.modeling.families import new_model
from stages.lib.training.session_plan import (
    PLAN_AFTER_STEPS,
    export_seconds,
    plan_lines,
    plan_metrics,
    plan_session,
    stored_bytes,
)

TIMES = [9.0, 2.0, 2.0, 3.0, 2.0]  # the first step carries the warm-up


def plan(end=100, total=1000, deadline=math.inf, reserve=0.0, start=0):
    return plan_session(step=start + 5, start=start, end=end, total=total, step_times=TIMES, now=0.0,
                        deadline=deadline, reserve=reserve, checkpoint_bytes=12_000_000, export_bytes=4_000_000)


def test_steps_today_ends_the_session_and_the_rest_of_the_budget_needs_sessions_of_its_length():
    p = plan(end=100, total=1000)
    assert (p.seconds_per_step, p.session_end, p.ends_by, p.seconds_left) == (2.0, 100, "steps_today", 190.0)
    assert p.sessions_after == 9  # 900 steps left, 100 per session
    assert "ends at step 100 in about 3 min" in plan_lines(p)[0] and "9 more sessions" in plan_lines(p)[0]
    assert plan(end=1000, total=1000).ends_by == "budget" and plan(end=1000, total=1000).sessions_after == 0


def test_minutes_today_ends_it_when_the_time_runs_out_first():
    # 5 steps done at t=0; a deadline 400 s away with 100 s kept for eval, save and export: 150 more steps.
    p = plan(end=1000, total=1000, deadline=400.0, reserve=100.0)
    assert (p.session_end, p.ends_by, p.sessions_after) == (155, "minutes_today", 6)  # 845 left, 155 per session
    assert "by train.minutes_today" in plan_lines(p)[0]
    assert plan(end=100, total=1000, deadline=1e9).ends_by == "steps_today"  # the time limit is not the first


def test_each_session_adds_a_checkpoint_and_an_export_to_the_cache():
    p = plan()
    assert p.checkpoint_bytes == 4_000_000 + 8_000_000  # weights and AdamW's two fp32 moments
    assert p.cache_bytes_per_session == 16_000_000
    assert "adds about 16 MB to DVC's cache (checkpoint 12 MB, export 4.0 MB)" in plan_lines(p)[1]
    assert plan_metrics(p) == {"session/seconds_per_step": 2.0, "session/sessions_after_this": 9,
                               "session/cache_mb_per_session": 16.0}


def test_a_session_prints_and_logs_its_plan_once_after_the_first_steps(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, steps_today=8)
    out = capsys.readouterr().out
    assert out.count("session plan at step") == 1
    assert f"session plan at step {PLAN_AFTER_STEPS}:" in out and "ends at step 8" in out
    assert "1 more session of this length" in out  # 4 steps left of 12, 8 per session
    assert [step for step, _ in read_tsv(root, "session/sessions_after_this")] == [PLAN_AFTER_STEPS]
    session(root, steps_today=2)  # shorter than the first steps timed: the plan comes at its last step
    assert "session plan at step 10:" in capsys.readouterr().out


def test_a_lora_session_stores_its_adapters_and_their_adamw_state_not_the_base():
    model = new_model(ModelParams(n_layer=2, hidden_size=32, n_head=4), 64, {}, seed=0)
    weights = sum(p.numel() for p in model.parameters())
    assert stored_bytes(model) == (12 * weights, 4 * weights)  # all of it trains: fp32, and two moments
    lora.add_adapters(model, LoraParams(r=4))
    adapters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert adapters == 4 * 2 * (4 * (32 + 32) + 2 * (32 + 128) + (128 + 32))  # r x (in + out) of 7 layers, 2 blocks
    assert stored_bytes(model, "adapter") == (12 * adapters, 4 * adapters)
    assert stored_bytes(model, "merged") == (12 * adapters, 4 * weights)  # the base's size
    assert stored_bytes(model, "both") == (12 * adapters, 4 * weights + 4 * adapters)


def test_the_time_kept_for_the_export_grows_with_what_it_writes_beyond_the_checkpoint():
    # A LoRA of phi-2: a 283 MB checkpoint of adapters and their AdamW state, a 5.6 GB merged export.
    assert export_seconds(3.0, 283_000_000, 5_600_000_000) == pytest.approx(3.0 * 5_600 / 283)
    assert export_seconds(3.0, 283_000_000, 94_000_000) == 3.0  # the adapter alone: never less than the save
    assert export_seconds(3.0, 12 * 10**6, 4 * 10**6) == 3.0  # a full fine-tune's export: a third of its checkpoint
