"""Precision by hardware (a fake device capability), fp16's loss scaler as a checkpoint part resumed bitwise, skipped
steps counted, and precision switched between sessions of one run (fp16 autocast and GradScaler run on a CPU)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_workspace, read_tsv, run_stage, session

from stages.lib.base.errors import UserError
from stages.lib.base.files import write_atomically
from stages.lib.base.params import ModelParams
from stages.lib.checkpointing import parts as ckpt
from stages.lib.modeling.families import new_model
from stages.lib.modeling.precision import LossScaler, inference_dtype, pick_precision, precision_for

T4, V100, P100, GTX1080, A100, H100 = (7, 5), (7, 0), (6, 0), (6, 1), (8, 0), (9, 0)


def checkpoint(root, step):
    return root / "checkpoints" / f"step-{step:08d}"


def scaler_state(root, step):
    return json.loads((checkpoint(root, step) / "scaler.json").read_text())


def test_auto_is_bf16_from_compute_capability_8_fp16_on_older_gpus_with_fast_fp16_and_fp32_on_cpus():
    assert [precision_for("auto", c) for c in (None, GTX1080, P100, V100, T4, A100, H100)] == [
        "fp32", "fp32", "fp16", "fp16", "fp16", "bf16", "bf16"]
    assert [precision_for(mode, A100) for mode in ("fp32", "bf16", "fp16")] == ["fp32", "bf16", "fp16"]
    assert precision_for("fp16", T4) == "fp16"


def test_an_exported_model_generates_in_fp32_on_cpus_and_bf16_weights_in_fp16_on_gpus_without_native_bf16():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert [inference_dtype(bf16, c) for c in (None, GTX1080, P100, V100, T4, A100, H100)] == [
        fp32, fp32, fp16, fp16, fp16, bf16, bf16]
    assert [inference_dtype(fp16, c) for c in (None, T4, A100)] == [fp32, fp16, fp16]
    assert [inference_dtype(fp32, c) for c in (None, T4, A100)] == [fp32, fp32, fp32]


def test_bf16_on_a_gpu_that_only_emulates_it_is_an_error_that_says_why_and_suggests_fp16():
    with pytest.raises(UserError, match=r"Tesla T4 \(compute capability 7\.5\) has no native bf16.*"
                                        r"train\.precision: fp16"):
        precision_for("bf16", T4, "Tesla T4")


def test_pick_precision_asks_the_gpu_for_its_capability_not_is_bf16_supported(monkeypatch):
    # On a T4, torch.cuda.is_bf16_supported() says True (emulation): the capability must decide.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: T4)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    gpu = torch.device("cuda", 0)
    chosen = pick_precision("auto", gpu)
    assert (chosen.name, chosen.autocast_dtype, chosen.scales_loss) == ("fp16", torch.float16, True)
    assert chosen.describe() == "fp16 with loss scaling"
    with pytest.raises(UserError, match="Tesla T4"):
        pick_precision("bf16", gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: A100)
    assert pick_precision("auto", gpu).autocast_dtype == torch.bfloat16
    assert not pick_precision("auto", gpu).scales_loss


def test_on_a_cpu_auto_is_fp32_and_a_half_precision_asked_for_runs_with_a_warning(capsys):
    cpu = torch.device("cpu")
    assert pick_precision("auto", cpu).autocast_dtype is None
    assert capsys.readouterr().out == ""
    fp16 = pick_precision("fp16", cpu)
    assert "far slower than fp32" in capsys.readouterr().out
    with fp16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16


def tiny_model_and_optimizer():
    model = new_model(ModelParams(n_layer=1, hidden_size=16, n_head=2, max_position_embeddings=16), 32,
                      {"eos_token_id": 0}, seed=0)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)


def backward(model, scaler, factor=1.0):
    tokens = torch.arange(8).reshape(1, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(input_ids=tokens, labels=tokens).loss
    scaler.scale(loss * factor).backward()


def grad_norm(model):
    return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])


def test_a_step_with_inf_gradients_is_skipped_counted_and_halves_the_scale():
    model, optimizer = tiny_model_and_optimizer()
    scaler = LossScaler(enabled=True, device_type="cpu")
    backward(model, scaler)
    scaler.unscale(optimizer)
    assert scaler.step(optimizer, grad_norm(model))  # a clean first step creates the optimizer state
    optimizer.zero_grad()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}

    backward(model, scaler, factor=float("inf"))
    scaler.unscale(optimizer)
    assert not scaler.step(optimizer, grad_norm(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # weights untouched
    for i, state in optimizer.state_dict()["state"].items():  # so are the moments and the step count
        assert all(torch.equal(moments[i][k], v) for k, v in state.items())
    assert scaler.skipped_steps == 1 and scaler.current_scale() == 2.0 ** 15


def test_the_scaler_state_round_trips_and_a_scaler_that_does_not_scale_keeps_it():
    scaler = LossScaler(enabled=True, device_type="cpu")
    scaler.load_state_dict({"skipped_steps": 3, "grad_scaler": {"scale": 1024.0, "growth_factor": 2.0,
                                                                "backoff_factor": 0.5, "growth_interval": 2000,
                                                                "_growth_tracker": 7}})
    state = scaler.state_dict()
    assert json.loads(json.dumps(state)) == state  # JSON, no pickle
    assert state["skipped_steps"] == 3 and state["grad_scaler"]["scale"] == 1024.0
    assert state["grad_scaler"]["_growth_tracker"] == 7
    fp32 = LossScaler(enabled=False, device_type="cpu")
    fp32.load_state_dict(state)
    assert fp32.state_dict() == state and fp32.current_scale() is None
    loss = torch.tensor(2.0)
    assert fp32.scale(loss) is loss


@pytest.fixture(scope="module")
def fp16_run(tmp_path_factory):
    """12 fp16 steps in one session."""
    root = make_workspace(tmp_path_factory.mktemp("fp16"))
    session(root, precision="fp16")
    return root


def test_fp16_sessions_resume_bitwise_with_the_scaler_state(fp16_run, tmp_path):
    root = make_workspace(tmp_path)
    for day in range(3):
        assert session(root, precision="fp16", steps_today=4).start_step == 4 * day
    assert (checkpoint(root, 12) / "model.safetensors").read_bytes() == (
        checkpoint(fp16_run, 12) / "model.safetensors").read_bytes()
    assert scaler_state(root, 12) == scaler_state(fp16_run, 12)
    assert scaler_state(root, 12)["grad_scaler"]["_growth_tracker"] == 12  # 12 clean steps, across 3 sessions
    assert read_tsv(root, "train/loss") == read_tsv(fp16_run, "train/loss")
    assert read_tsv(root, "loss_scale") == read_tsv(fp16_run, "loss_scale")


def set_loss_scale(root, step, scale):
    """A run whose loss scale is far too high: its next fp16 steps overflow (written as a session would)."""
    for folder in (root / "checkpoints", root / ".checkpoint-recovery"):
        path = folder / f"step-{step:08d}" / "scaler.json"
        state = json.loads(path.read_text())
        state["grad_scaler"]["scale"] = scale
        write_atomically(path, json.dumps(state))


def test_skipped_steps_leave_the_weights_consume_their_batches_are_logged_and_printed(tmp_path, capsys):
    root = make_workspace(tmp_path)
    session(root, precision="fp16", steps_today=2)
    set_loss_scale(root, 2, 2.0 ** 24)
    before = load_file(checkpoint(root, 2) / "model.safetensors")
    session(root, precision="fp16", steps_today=2)
    assert "2 of 2 steps skipped this session" in capsys.readouterr().out
    after = load_file(checkpoint(root, 4) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)  # two skipped steps changed nothing...
    state = json.loads((checkpoint(root, 4) / "state.json").read_text())
    assert state["data_cursor"]["samples_seen"] == 4 * 4  # ...but used their batches: the data goes on
    assert scaler_state(root, 4)["skipped_steps"] == 2 and scaler_state(root, 4)["grad_scaler"]["scale"] == 2 ** 22

    session(root, precision="fp16", steps_today=8)
    skipped = [int(v) for _, v in read_tsv(root, "skipped_steps")]
    assert skipped[:4] == [0, 0, 1, 2] and skipped[-1] == skipped[-2] > 2  # the scale came down, then steps went on
    assert "in the run" in capsys.readouterr().out
    logged_norms = [step for step, _ in read_tsv(root, "grad_norm")]
    assert 3 not in logged_norms and 12 in logged_norms  # no inf in the logs: skipped_steps says it
    assert [step for step, _ in read_tsv(root, "lr")] == list(range(1, 13))


def test_a_run_with_skipped_steps_still_resumes_bitwise(tmp_path):
    roots = []
    for name, sessions in (("whole", [8]), ("split", [3, 5])):
        root = make_workspace(tmp_path / name)
        session(root, precision="fp16", steps_today=2)
        set_loss_scale(root, 2, 2.0 ** 24)
        for steps in sessions:
            session(root, precision="fp16", steps_today=steps)
        roots.append(root)
    whole, split = roots
    assert scaler_state(split, 10) == scaler_state(whole, 10)
    assert scaler_state(whole, 10)["skipped_steps"] >= 3  # the split fell among the skipped steps
    assert (checkpoint(split, 10) / "model.safetensors").read_bytes() == (
        checkpoint(whole, 10) / "model.safetensors").read_bytes()


def test_precision_changes_between_sessions_of_one_run_and_master_state_stays_fp32(fp16_run, tmp_path):
    root = make_workspace(tmp_path)
    session(root, precision="fp16", steps_today=4)
    fp16_scaler = scaler_state(root, 4)
    assert session(root, precision="fp32", steps_today=4).start_step == 4
    assert scaler_state(root, 8) == fp16_scaler  # kept, untouched, through the session that did not scale
    assert session(root, precision="bf16", steps_today=2).start_step == 8
    assert session(root, precision="fp16", steps_today=2).start_step == 10
    assert scaler_state(root, 12)["grad_scaler"]["_growth_tracker"] == fp16_scaler["grad_scaler"][
        "_growth_tracker"] + 2  # the fp16 scale went on from where the first fp16 session left it
    weights = load_file(checkpoint(root, 12) / "model.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
    optimizer = ckpt.read_part(checkpoint(root, 12), "optimizer")
    assert {v.dtype for s in optimizer["state"].values() for k, v in s.items() if k != "step"} == {torch.float32}
    # The same run as twelve fp16 steps, to within half-precision rounding.
    reference = load_file(checkpoint(fp16_run, 12) / "model.safetensors")
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[name], rtol=0.05, atol=5e-3, msg=name)
    losses = [[float(v) for _, v in read_tsv(r, "train/loss")] for r in (root, fp16_run)]
    assert losses[0] == pytest.approx(losses[1], rel=0.02)


def test_fp16_sharded_over_two_fsdp_processes_skips_the_steps_one_process_skips(tmp_path):
    batch = {"batch_size": 4, "total_step_budget": 8}
    one, two = make_workspace(tmp_path / "one"), make_workspace(tmp_path / "two")
    for root in (one, two):
        session(root, precision="fp16", steps_today=2, grad_accum=2, **batch)
        set_loss_scale(root, 2, 2.0 ** 21)  # the next step overflows, on one process as on two
    session(one, precision="fp16", steps_today=6, grad_accum=2, **batch)
    done = run_stage(two, precision="fp16", steps_today=6, grad_accum=1, devices=2, strategy="fsdp", **batch)
    assert done.returncode == 0, done.stderr
    assert scaler_state(two, 8) == scaler_state(one, 8) and scaler_state(one, 8)["skipped_steps"] == 1
    a, b = (load_file(checkpoint(root, 8) / "model.safetensors") for root in (one, two))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-3, atol=1e-4, msg=name)


def test_fp16_that_overflows_in_every_forward_pass_stops_with_a_checkpoint_and_says_what_to_try(tmp_path, capsys):
    from test_families import base_model
    base = base_model("llama", tmp_path / "base")
    with torch.no_grad():  # as a base trained in bf16 can be: weights past fp16's 65,504, inf in the forward pass
        base.model.layers[0].mlp.down_proj.weight.mul_(1e6)
    base.save_pretrained(tmp_path / "base")
    root = make_workspace(tmp_path / "run", init_from=str(tmp_path / "base"), total_step_budget=60)
    result = session(root, precision="fp16", init_from=str(tmp_path / "base"), total_step_budget=60)
    assert (result.stopped_by, result.exit_code, result.end_step) == ("fp16-overflow", 1, 20)
    err = capsys.readouterr().err
    assert err.count("fp16 cannot train this model: the last 20 steps were all skipped") == 1, err
    assert "checkpoint at step 20" in err and "train.precision: bf16" in err and "train.precision: fp32" in err
    assert scaler_state(root, 20)["skipped_steps"] == 20
    assert not (root / "models" / "tiny").exists()  # nothing learned: nothing exported
    before = base.state_dict()
    after = load_file(checkpoint(root, 20) / "model.safetensors")
    assert all(torch.equal(after[name], before[name]) for name in after)


def test_fp16_gives_up_on_steps_skipped_in_a_row_or_on_a_share_of_them_after_the_scale_settled():
    from stages.lib.modeling.precision import gives_up
    assert gives_up(19, 19, 0) is None and gives_up(20, 20, 0) == "the last 20 steps were all skipped"
    assert gives_up(3, 199, 50) is None  # the share counts from 100 steps past the first 100
    assert gives_up(1, 200, 2) is None and "3 of the 100 steps" in gives_up(1, 200, 3)
    assert gives_up(0, 1100, 20) is None and gives_up(0, 1100, 21) is not None
