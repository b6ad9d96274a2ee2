"""The train stage on several processes (gloo on CPU, through torchrun): the same training as one process with the
same global batch, checkpoints that resume on any number of processes with either strategy, and stops that reach
every process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import (
    LONG_RUN,
    TINY,
    checkpoint_step,
    make_workspace,
    read_tsv,
    run_stage,
    session,
    stage_env,
    wait_for_steps,
    write_params,
)

from stages.lib.base.errors import UserError
from stages.lib.base.params import ModelParams, parse_params
from stages.lib.checkpointing import parts as ckpt
from stages.lib.checkpointing import store
from stages.lib.distributed.launcher import processes_to_start
from stages.lib.modeling.families import new_model, tied_names
from stages.lib.training.decision import fit_global_batch

# Two processes of batch 4 against one process of batch 4 x grad_accum 2: the same global batch of 8.
RUN = {"total_step_budget": 8, "batch_size": 4}
ONE_PROCESS = {**RUN, "grad_accum": 2}
TWO_PROCESSES = {**RUN, "grad_accum": 1, "devices": 2}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "stages.train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process: the weights and optimizer state after step 4, and after the whole 8-step run made in one
    uninterrupted session, with its losses and gradient norms."""
    saved = {}
    for step in (4, 8):
        root = make_workspace(tmp_path_factory.mktemp(f"reference-{step}"))
        session(root, steps_today=step, **ONE_PROCESS)
        folder = root / "checkpoints" / store.folder_name(step)
        saved[step] = {"weights": load_file(folder / "model.safetensors"),
                       "optimizer": ckpt.read_part(folder, "optimizer")}
    saved["losses"] = [float(v) for _, v in read_tsv(root, "train/loss")]
    saved["grad_norms"] = [float(v) for _, v in read_tsv(root, "grad_norm")]
    return saved


def assert_same_training(root, reference, step):
    """The checkpoint at `step` holds the reference's weights and optimizer state, within float tolerance, in the
    one-process layout (same names, same integer optimizer keys and groups)."""
    folder = root / "checkpoints" / store.folder_name(step)
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == reference[step]["weights"].keys()
    for name, value in weights.items():
        torch.testing.assert_close(value, reference[step]["weights"][name], rtol=1e-4, atol=1e-5, msg=name)
    optimizer = ckpt.read_part(folder, "optimizer")
    expected = reference[step]["optimizer"]
    assert optimizer["param_groups"] == expected["param_groups"]
    assert optimizer["state"].keys() == expected["state"].keys()
    for index, moments in expected["state"].items():
        assert optimizer["state"][index].keys() == moments.keys()
        for name, value in moments.items():
            torch.testing.assert_close(optimizer["state"][index][name], value, rtol=1e-4, atol=1e-5)


def state_of(root, step) -> dict:
    return json.loads((root / "checkpoints" / store.folder_name(step) / "state.json").read_text())


def test_two_ddp_processes_train_as_one_process_does_and_their_checkpoint_resumes_in_one(reference, tmp_path,
                                                                                       capsys):
    root = make_workspace(tmp_path)
    done = run_stage(root, steps_today=4, **TWO_PROCESSES)
    assert done.returncode == 0, done.stderr
    assert "2 processes (ddp, gloo)" in done.stdout
    assert checkpoint_step(root) == 4 and state_of(root, 4)["world_size"] == 2
    assert_same_training(root, reference, 4)
    assert [step for step, _ in read_tsv(root, "train/loss")] == [1, 2, 3, 4]  # rank 0 alone logs
    assert [float(v) for _, v in read_tsv(root, "train/loss")] == pytest.approx(reference["losses"][:4], rel=1e-5)
    assert [float(v) for _, v in read_tsv(root, "grad_norm")] == pytest.approx(reference["grad_norms"][:4], rel=1e-4)
    assert (root / "models" / "tiny" / "model.safetensors").exists()

    # The same settings on one process: grad_accum doubles so the global batch stays 8, and the data continues.
    result = session(root, **{**TWO_PROCESSES, "devices": 1})
    assert "train.grad_accum = 2 instead of 1" in capsys.readouterr().out
    assert (result.start_step, result.end_step) == (4, 8)
    assert_same_training(root, reference, 8)
    assert state_of(root, 8)["data_cursor"]["samples_seen"] == 8 * 8
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, 9))


def test_two_ddp_processes_packing_whole_documents_train_as_one_process_does(tmp_path):
    one = make_workspace(tmp_path / "one", prompts=True)
    session(one, steps_today=4, **ONE_PROCESS)
    two = make_workspace(tmp_path / "two", prompts=True)
    done = run_stage(two, steps_today=4, **TWO_PROCESSES)
    assert done.returncode == 0, done.stderr
    assert "packing: documents" in done.stdout and "2 processes (ddp, gloo)" in done.stdout
    expected = load_file(one / "checkpoints" / store.folder_name(4) / "model.safetensors")
    for name, value in load_file(two / "checkpoints" / store.folder_name(4) / "model.safetensors").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    assert [float(v) for _, v in read_tsv(two, "train/loss")] == pytest.approx(
        [float(v) for _, v in read_tsv(one, "train/loss")], rel=1e-5)
    assert state_of(two, 4)["data_cursor"] == state_of(one, 4)["data_cursor"]


def test_fsdp_resumes_a_one_process_checkpoint_and_its_own_resumes_in_one_process(reference, tmp_path):
    root = make_workspace(tmp_path)
    session(root, steps_today=2, **ONE_PROCESS)
    done = run_stage(root, steps_today=2, strategy="fsdp", **TWO_PROCESSES)
    assert done.returncode == 0, done.stderr
    assert "resuming from step 2" in done.stdout and "2 processes (fsdp, gloo)" in done.stdout
    assert_same_training(root, reference, 4)  # gathered into the one-process layout
    exported = load_file(root / "models" / "tiny" / "model.safetensors")  # HF keeps the other name of the tied pair
    expected = ckpt.retie(reference[4]["weights"], [["lm_head.weight", "model.embed_tokens.weight"]])
    for name, value in exported.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-4, atol=1e-5, msg=name)

    result = session(root, steps_today=4, **ONE_PROCESS)
    assert (result.start_step, result.end_step) == (4, 8)
    assert_same_training(root, reference, 8)


def worker_pids(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the workers a torchrun process started (Linux /proc)."""
    children = Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split()
    ranks = {}
    for pid in map(int, children):
        env = dict(item.split("=", 1) for item in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in item)
        ranks[int(env["RANK"])] = pid
    return ranks


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_process_stops_both_after_the_same_step_with_one_checkpoint(tmp_path):
    root = make_workspace(tmp_path)
    write_params(root, **{**TWO_PROCESSES, **LONG_RUN})
    torchrun = subprocess.Popen(TORCHRUN, cwd=root, env=stage_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)
    wait_for_steps(root, torchrun, 3)
    os.kill(worker_pids(torchrun.pid)[1], signal.SIGTERM)  # rank 1 only: rank 0 must learn of it
    _, stderr = torchrun.communicate(timeout=60)
    assert torchrun.returncode != 0  # torchrun reports the workers' exit code, 143, as a failure
    assert stderr.count("SIGTERM: finishing this step") == 1  # rank 1 got it; rank 0 stopped with it all the same
    stopped_at = checkpoint_step(root)
    assert state_of(root, stopped_at)["world_size"] == 2
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, stopped_at + 1))

    result = session(root, steps_today=1, **LONG_RUN, batch_size=4, grad_accum=2)
    assert (result.start_step, result.end_step) == (stopped_at, stopped_at + 1)


def test_a_signal_to_the_launcher_stops_every_worker_with_a_checkpoint_and_its_exit_code(tmp_path):
    root = make_workspace(tmp_path)
    write_params(root, **{**TWO_PROCESSES, **LONG_RUN})
    launcher = subprocess.Popen([sys.executable, "-m", "stages.train"], cwd=root, env=stage_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_steps(root, launcher, 2)
    launcher.send_signal(signal.SIGTERM)
    _, stderr = launcher.communicate(timeout=60)
    assert launcher.returncode == 128 + signal.SIGTERM, stderr
    assert stderr.count("SIGTERM: finishing this step") == 2  # passed on to both workers
    assert "ChildFailedError" not in stderr  # the workers ended cleanly, handing their exit code to the launcher
    stopped_at = checkpoint_step(root)
    assert [step for step, _ in read_tsv(root, "train/loss")] == list(range(1, stopped_at + 1))


MASKED_ON_RANK_1 = """
import os
import stages.lib.tokenizing.batches as batches
from stages.train import main

if os.environ["RANK"] == "1":  # every target of this rank's micro-batch of step 1 is a prompt token
    original = batches.TrainBatches.micro_batch

    def masked(self, step, micro):
        batch = original(self, step, micro)
        if step == 1:
            batch.labels.fill_(-100)
        return batch
    batches.TrainBatches.micro_batch = masked
main()
"""


def test_ddp_with_an_untied_head_trains_through_a_micro_batch_with_nothing_to_learn_on_one_process(tmp_path):
    root = make_workspace(tmp_path)
    write_params(root, **{**TWO_PROCESSES, "total_step_budget": 3, "model": {**TINY["model"], "tie_embeddings": False}})
    (root / "masked.py").write_text(MASKED_ON_RANK_1)
    done = subprocess.run([*TORCHRUN[:-2], "masked.py"], cwd=root, env=stage_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert checkpoint_step(root) == 3
    assert all(float(v) > 0 for _, v in read_tsv(root, "train/loss"))


def test_a_user_error_in_the_workers_is_printed_once_and_fails_the_launcher(tmp_path):
    root = make_workspace(tmp_path)
    session(root, steps_today=1, **ONE_PROCESS)
    done = run_stage(root, **{**TWO_PROCESSES, "lr": 0.02, "resume": "require"})
    assert done.returncode == 1
    assert done.stderr.count("error: train.resume = require") == 1, done.stderr
    assert "ChildFailedError" not in done.stderr


FAILS_ON_RANK_1 = """
import os
import time
import torch
from stages.lib.base.errors import UserError
from stages.lib.modeling.loss import LossModule
from stages.train import main

FAULTS = {
    "user-error": lambda: UserError("the data of step 3 cannot be read (a fault made for this test)"),
    "out-of-memory": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
}
if os.environ["RANK"] == "1":  # its third training forward pass fails, in the middle of step 3
    original, calls = LossModule.forward, []

    def failing(self, *args, **kwargs):
        if torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 3:
                open("failed-at", "w").write(str(time.monotonic()))
                raise FAULTS[os.environ["FAULT"]]()
        return original(self, *args, **kwargs)
    LossModule.forward = failing
main()
"""


@pytest.mark.parametrize("fault, message", [
    ("user-error", "error (on process 1): the data of step 3 cannot be read"),
    ("out-of-memory", "error (on process 1): cpu ran out of memory during the session"),
])
def test_a_failure_on_rank_1_mid_step_stops_rank_0_at_once_and_rank_0_shows_it_once(tmp_path, fault, message):
    root = make_workspace(tmp_path)
    write_params(root, **{**TWO_PROCESSES, **LONG_RUN})
    (root / "fails.py").write_text(FAILS_ON_RANK_1)
    torchrun = subprocess.Popen([*TORCHRUN[:-2], "fails.py"], cwd=root, env={**stage_env(), "FAULT": fault},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = torchrun.communicate(timeout=90)  # without the failure watch: the 30-minute collective timeout
    ended = time.monotonic()
    assert torchrun.returncode != 0
    assert stderr.count(message) == 1, stderr[-3000:]
    assert stderr.count("(a fault made for this test)" if fault == "user-error" else "ran out of memory") == 1
    failed_at = float((root / "failed-at").read_text())
    assert ended - failed_at < 15  # torchrun's own shutdown included; rank 0 is stopped within the watch's poll
    assert [step for step, _ in read_tsv(root, "train/loss")] == [1, 2]  # rank 0 never finished step 3


def test_a_global_batch_other_processes_cannot_keep_is_an_error_naming_settings_that_would():
    assert fit_global_batch(8, batch_size=4, world_size=1) == 2
    assert fit_global_batch(8, batch_size=2, world_size=2) == 2
    with pytest.raises(UserError, match=r"8 samples, 4 per process on 2 processes.*batch_size = 3 does not divide.*"
                                        r"batch_size 4 with grad_accum 1, batch_size 2 with grad_accum 2"):
        fit_global_batch(8, batch_size=3, world_size=2)
    with pytest.raises(UserError, match=r"global batch is 6 samples.*4 processes cannot share evenly"):
        fit_global_batch(6, batch_size=1, world_size=4)


def test_the_weights_file_stores_tied_tensors_once_as_safetensors_own_save_does(tmp_path):
    from safetensors.torch import save_model
    from test_checkpoint import save_checkpoint
    model = new_model(ModelParams(n_layer=1, hidden_size=16, n_head=2), 32, {}, seed=0)  # tied embeddings
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"step": 1, "fingerprint": "abc", "fingerprint_values": {}}
    saved = save_checkpoint(tmp_path / "one", tmp_path / "r1", model, optimizer, state)
    assert tied_names(model) == [["lm_head.weight", "model.embed_tokens.weight"]]
    save_model(model, str(tmp_path / "safetensors.safetensors"))
    assert (saved / "model.safetensors").read_bytes() == (tmp_path / "safetensors.safetensors").read_bytes()
    weights = ckpt.read_weights(saved)
    assert set(ckpt.retie(weights, tied_names(model))) == set(model.state_dict())


def test_devices_on_a_machine_without_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert processes_to_start("auto", "auto") == 1
    assert processes_to_start(2, "auto") == 2  # CPU processes with gloo
    assert parse_params({"train": {"devices": "auto", "strategy": "fsdp"}}).train.devices == "auto"
    with pytest.raises(UserError, match=r"train\.devices = 'all' is not allowed; expected 'auto' or a whole number"):
        parse_params({"train": {"devices": "all"}})
