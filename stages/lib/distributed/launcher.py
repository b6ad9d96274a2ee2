"""Starting the train stage in several processes through torchrun, and the signals between launcher and workers.

- `train.devices` above 1 (or `auto` on a machine with several GPUs): `python -m stages.train` starts
  `python -m torch.distributed.run --standalone --nproc-per-node N -m stages.train` and waits for it, so `dvc repro`
  needs nothing else. Started under torchrun by hand (several nodes: torchrun's own rendezvous), the stage takes the
  world from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) instead.
- A signal to `python -m stages.train` is passed to every worker once (a second one, over a second later, stops
  them at once, see stages/lib/training/stop.py); workers stop and save when the launcher disappears. torchrun started
  by hand passes one signal on to the workers and kills them `--shutdown-timeout` seconds later (30 by default): give it
  the time a checkpoint takes to save.
- Under the launcher rank 0 hands the session's exit code to it through a file and every worker exits with 0, so
  torchrun reports no failure for a stop or a user error; the launcher exits with the session's code.
"""

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from stages.lib.base.errors import UserError
from stages.lib.base.files import write_atomically

LAUNCH_DIR_ENV = "STEPWISE_LAUNCH_DIR"  # set by the launcher: where workers leave their pids and the exit code
LAUNCHER_PID_ENV = "STEPWISE_LAUNCHER_PID"
EXIT_CODE_FILE = "exit-code"


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher speaking its environment) started this process."""
    return "LOCAL_RANK" in os.environ or "WORLD_SIZE" in os.environ


def processes_to_start(devices: int | str, device: str) -> int:
    """How many training processes `train.devices` asks for on this machine (`auto`: one per visible GPU)."""
    from stages.lib.base.devices import visible_gpus  # torch: not needed to tell whether torchrun started us

    gpus = visible_gpus(device)
    if devices == "auto":
        return max(1, gpus)
    if gpus and devices > gpus:
        raise UserError(f"train.devices = {devices}, but torch sees {gpus} GPU(s); set train.devices to at most "
                        f"{gpus} (or auto), or train.device: cpu to train in CPU processes")
    return devices


def launch(processes: int) -> int:
    """Run this stage in `processes` processes under torchrun on this machine; returns the session's exit code."""
    with tempfile.TemporaryDirectory(prefix="stepwise-launch-") as launch_dir:
        env = {**os.environ, LAUNCH_DIR_ENV: launch_dir, LAUNCHER_PID_ENV: str(os.getpid())}
        # torchrun would set 1 thread per process (with a warning); share the cores out instead.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                   "-m", "stages.train"]
        print(f"starting {processes} training processes: python {' '.join(command[1:])}", flush=True)
        # A session of its own: a Ctrl-C in the terminal reaches only this process, which passes it to the
        # workers once (torchrun would pass it on too, and a doubled signal means "stop at once").
        torchrun = subprocess.Popen(command, env=env, start_new_session=True)
        with _signals_passed_to_workers(torchrun, Path(launch_dir)):
            returncode = torchrun.wait()
        reported = Path(launch_dir) / EXIT_CODE_FILE
        if returncode == 0 and reported.exists():
            return int(reported.read_text())
        return returncode


@contextlib.contextmanager
def _signals_passed_to_workers(torchrun: subprocess.Popen, launch_dir: Path):
    def pass_on(signum, frame):
        pids = _worker_pids(launch_dir)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)
        if not pids:  # the workers are still starting: torchrun stops them
            torchrun.send_signal(signum)
    previous = {sig: signal.signal(sig, pass_on) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launched_here() -> bool:
    """Whether this worker was started by `launch` (which waits for the exit code), not by a torchrun by hand."""
    return LAUNCH_DIR_ENV in os.environ


def launcher_pid() -> int | None:
    """The pid of the `python -m stages.train` that launched this worker, if one did."""
    pid = os.environ.get(LAUNCHER_PID_ENV)
    return int(pid) if pid else None


def register_worker(rank: int) -> None:
    """Leave this worker's pid for the launcher, which passes signals on to it."""
    if launched_here():
        write_atomically(Path(os.environ[LAUNCH_DIR_ENV]) / f"rank-{rank}.pid", str(os.getpid()))


def _worker_pids(launch_dir: Path) -> list[int]:
    return [int(path.read_text()) for path in sorted(launch_dir.glob("rank-*.pid"))]


def exit_code_to_report(code: int) -> int:
    """The code this worker exits with (see the module docstring)."""
    launch_dir = os.environ.get(LAUNCH_DIR_ENV)
    if not launch_dir or "WORLD_SIZE" not in os.environ:
        return code
    if os.environ.get("RANK", "0") == "0":
        write_atomically(Path(launch_dir) / EXIT_CODE_FILE, str(code))
    return 0


def launcher_gone(pid: int | None) -> bool:
    """Whether the launcher that started this worker has died (a killed `dvc repro`, say)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, though not ours to signal
        return False
    return False
