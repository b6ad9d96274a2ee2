"""The lease that keeps one session at a time per run across machines, with real git: a bare remote and two clones
(no DVC, no training: a few git commands each)."""

import socket
import subprocess

import pytest
from dvc_helpers import configure_git, run

from stages.lib.daily import lease as leases
from stages.lib.daily.lease import Holder, Lease, LeaseHeld, ref_for

REF = ref_for("main")


@pytest.fixture
def machines(tmp_path, monkeypatch):
    """A bare git remote and two clones of it; the tests run in the first."""
    run(tmp_path, "git", "init", "-q", "--bare", "-b", "main", "remote.git")
    for name in ("x", "y"):
        run(tmp_path, "git", "clone", "-q", "remote.git", name)
        configure_git(tmp_path / name)
    monkeypatch.chdir(tmp_path / "x")
    return tmp_path


def test_a_second_machine_is_refused_naming_the_holder_until_the_lease_is_dropped(machines, monkeypatch):
    lease, note = Lease.take("origin", "main", expected_end=2_000_000_000.0)
    assert note == f"took the lease ({REF} in origin)"
    commit, holder = leases.read("origin", REF)
    assert commit == lease.commit and holder.machine == socket.gethostname() and holder.expected_end == 2e9

    monkeypatch.chdir(machines / "y")
    with pytest.raises(LeaseHeld, match=rf"another session of this run is training on {socket.gethostname()} "
                       r"\(process \d+, branch main\) since .*, expected to end at .*; its lease .* lapses at"):
        Lease.take("origin", "main", expected_end=None)
    monkeypatch.chdir(machines / "x")
    assert lease.renew(now=lease.holder.expires) and leases.read("origin", REF)[0] == lease.commit != commit
    assert lease.drop() == f"dropped the lease ({REF} in origin)"
    assert leases.read("origin", REF) == ("", None)
    monkeypatch.chdir(machines / "y")
    assert Lease.take("origin", "main", None)[0].drop().startswith("dropped")


def test_an_expired_lease_is_taken_over_with_a_note(machines):
    dead, _ = Lease.take("origin", "main", expected_end=None, now=1_000.0)  # expired long ago: its machine died
    lease, note = Lease.take("origin", "main", expected_end=None)
    assert note.startswith(f"took over the lease ({REF} in origin) of {socket.gethostname()} (process ")
    assert "its lease expired at" in note
    assert not dead.renew() and "held by" in dead.lost  # the dead one, back, learns it lost the lease
    assert dead.drop().startswith("the lease was taken over meanwhile")
    assert leases.read("origin", REF)[0] == lease.commit
    lease.drop()


def test_a_lease_left_by_a_killed_command_on_this_machine_is_taken_over_at_once(machines):
    gone = subprocess.Popen(["true"])
    gone.wait()
    holder = Holder(socket.gethostname(), gone.pid, "main", 0.0, None, 4_000_000_000.0)
    assert leases._swap("origin", REF, "", leases._lease_commit(holder))
    assert f"its process {gone.pid} on this machine is gone" in Lease.take("origin", "main", None)[1]


def test_of_two_machines_racing_for_the_lease_one_wins(machines):
    old, _ = leases.read("origin", REF)
    first = leases._lease_commit(Holder("x", 1, "main", 0.0, None, 4e9))
    second = leases._lease_commit(Holder("y", 2, "main", 0.0, None, 4e9))
    assert leases._swap("origin", REF, old, first)
    assert not leases._swap("origin", REF, old, second)  # y read the same (empty) lease: its swap is refused
    assert leases.read("origin", REF)[1].machine == "x"
