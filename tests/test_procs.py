"""Process identity on real processes: describe, is_alive (zombies, stopped
processes, a pid that now belongs to a stranger), group_alive and
terminate_group on real process groups (SIGTERM, then SIGKILL after the grace)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, wait_for

from sparkops.core import procs
from sparkops.core.procs import Proc, RunIdentity


def running(pid: int) -> bool:
    """Is ``pid`` a live process (not a zombie)?"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False




@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``python -c CODE`` (in its own session by default) and wait until it
    has written its ready file; every group started is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(code: str, *, new_session: bool = True, name: str = "child") -> subprocess.Popen:
        ready = tmp_path / f"{name}.ready"
        body = textwrap.dedent(code).replace("READY", repr(str(ready)))
        proc = subprocess.Popen([sys.executable, "-c", body], start_new_session=new_session,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        wait_for(ready.exists, f"{name} to be ready")
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL) if os.getpgid(proc.pid) == proc.pid else proc.kill()
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


SLEEPER = """
    import pathlib, time
    pathlib.Path(READY).touch()
    time.sleep(60)
"""

#: A process that would leave a trace if anyone ever sent it SIGTERM.
STRANGER = """
    import pathlib, signal, time
    def noted(signum, frame):
        pathlib.Path(READY + ".sigterm").touch()
        raise SystemExit(0)
    signal.signal(signal.SIGTERM, noted)
    pathlib.Path(READY).touch()
    time.sleep(60)
"""

IGNORES_TERM = """
    import pathlib, signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    pathlib.Path(READY).touch()
    time.sleep(60)
"""

#: A group leader with two children in its group; prints the children's pids.
FAMILY = """
    import pathlib, subprocess, sys, time
    kids = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(2)]
    print(" ".join(str(k.pid) for k in kids), flush=True)
    pathlib.Path(READY).touch()
    time.sleep(60)
"""

#: A leader that obeys SIGTERM with a child that ignores it, in one group.
STUBBORN_CHILD = """
    import pathlib, subprocess, sys, time
    code = "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \\
           "pathlib.Path(%r).touch(); time.sleep(60)" % (READY + ".kid",)
    kid = subprocess.Popen([sys.executable, "-c", code])
    while not pathlib.Path(READY + ".kid").exists():
        time.sleep(0.01)
    print(kid.pid, flush=True)
    pathlib.Path(READY).touch()
    time.sleep(60)
"""


# -- identity ------------------------------------------------------------------------------


def test_describe_and_is_alive_on_a_real_child(spawn):
    child = spawn(SLEEPER)
    me = procs.describe(child.pid)
    assert me == Proc(pid=child.pid, start=procs.start_of(child.pid), pgid=child.pid, sid=child.pid)
    assert procs.is_alive(me)
    assert procs.describe(child.pid) == me  # a second reading agrees (within the tolerance)

    child.kill()
    child.wait()
    assert not procs.is_alive(me)
    assert procs.describe(child.pid) is None


def test_the_start_time_counts_from_boot_not_from_the_wall_clock(spawn, tmp_path):
    """The start time is the kernel's, in ticks after boot: a step of the wall clock
    (which moves psutil's create_time with it) does not make a live worker look like
    a stranger. A name with spaces and parentheses does not confuse the reading."""
    odd = tmp_path / "a) (b c"
    odd.symlink_to(sys.executable)
    child = subprocess.Popen([str(odd), "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        wait_for(lambda: psutil.Process(child.pid).name() == "a) (b c", "the odd name")
        since_boot = psutil.Process(child.pid).create_time() - psutil.boot_time()
        assert procs.start_of(child.pid) == pytest.approx(since_boot, abs=1.0)  # boot time is whole seconds
        assert procs.is_alive(procs.describe(child.pid))
    finally:
        child.kill()
        child.wait()
    with pytest.raises(psutil.NoSuchProcess):
        procs.start_of(child.pid)


def test_a_record_from_before_holds_the_epoch_start_and_still_matches(spawn):
    """Records written before start times counted from boot hold psutil's
    create_time: the worker they name is still recognised, a stranger still not."""
    child = spawn(SLEEPER)
    now = procs.describe(child.pid)
    before = Proc(pid=child.pid, start=psutil.Process(child.pid).create_time(), pgid=now.pgid, sid=now.sid)
    assert before.start > procs.EPOCH_START
    assert procs.is_alive(before) and procs.group_alive(before)
    assert not procs.is_alive(Proc(pid=child.pid, start=before.start - 5, pgid=now.pgid, sid=now.sid))


def test_a_zombie_counts_as_dead_and_its_group_as_empty(spawn):
    child = spawn(SLEEPER)
    me = procs.describe(child.pid)
    child.kill()  # not reaped: a zombie until we wait for it
    wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, "the zombie")
    assert not procs.is_alive(me)
    assert not procs.group_alive(me)
    assert procs.terminate_group(me, grace=5) == f"pid {child.pid} already gone"


def test_a_stopped_process_is_alive(spawn):
    """SIGSTOP does not end a process: a stopped worker is still its run's worker."""
    child = spawn(SLEEPER)
    me = procs.describe(child.pid)
    os.kill(child.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_STOPPED, "the stop")
        assert procs.is_alive(me) and procs.group_alive(me)
    finally:
        os.kill(child.pid, signal.SIGCONT)


def test_none_is_never_alive_and_never_signalled():
    assert not procs.is_alive(None)
    assert not procs.group_alive(None)
    assert procs.terminate_group(None, grace=0) == "no process recorded"


# -- PID reuse -----------------------------------------------------------------------------


@pytest.mark.parametrize("own_group", [True, False], ids=["stranger-leads-a-group", "stranger-in-our-group"])
def test_a_dead_workers_pid_owned_by_a_stranger_is_dead_and_never_signalled(spawn, tmp_path, own_group):
    """The worker died; its pid now belongs to an unrelated process. We cannot make
    the kernel hand out the same pid on demand, so the reuse is recorded the way it
    would look: the stranger's pid with the dead worker's start time."""
    worker = spawn(SLEEPER, name="worker")
    recorded_worker = procs.describe(worker.pid)
    # A pid comes round again only after the kernel has handed out all the others,
    # never within START_TOLERANCE of the first start: keep the two starts apart.
    time.sleep(2 * procs.START_TOLERANCE)
    worker.kill()
    worker.wait()

    stranger = spawn(STRANGER, new_session=own_group, name="stranger")
    reused = Proc(pid=stranger.pid, start=recorded_worker.start, pgid=stranger.pid)
    assert procs.describe(stranger.pid).start != pytest.approx(reused.start, abs=procs.START_TOLERANCE)

    assert not procs.is_alive(reused)
    assert not procs.group_alive(reused)
    assert procs.terminate_group(reused, grace=0.2) == f"pid {stranger.pid} already gone"

    time.sleep(0.2)  # a signal, had one been sent, would have been handled by now
    assert running(stranger.pid)
    assert not (tmp_path / "stranger.ready.sigterm").exists()
    # the control: the stranger does leave its trace when it is signalled
    stranger.terminate()
    assert stranger.wait(timeout=10) == 0
    assert (tmp_path / "stranger.ready.sigterm").exists()


def test_a_live_pid_with_another_start_time_is_not_the_recorded_process(spawn, tmp_path):
    """The reverse reading: the pid is live, but it started at another time than
    the one recorded, so it is somebody else."""
    live = spawn(STRANGER, name="stranger")
    actual = procs.describe(live.pid)
    for shift in (-3600.0, -1.0, 1.0):
        other = Proc(pid=actual.pid, start=actual.start + shift, pgid=actual.pgid)
        assert not procs.is_alive(other)
        assert not procs.group_alive(other)
        assert procs.terminate_group(other, grace=0.2).endswith("already gone")
    assert procs.is_alive(actual)
    assert not (tmp_path / "stranger.ready.sigterm").exists()


# -- groups --------------------------------------------------------------------------------


def test_terminate_group_ends_the_leader_and_every_child(spawn):
    family = spawn(FAMILY)
    kids = [int(p) for p in family.stdout.readline().split()]
    leader = procs.describe(family.pid)
    assert all(os.getpgid(k) == leader.pgid for k in kids)
    assert procs.group_alive(leader)

    result = procs.terminate_group(leader, grace=5)

    assert result == f"process group {leader.pgid} ended after SIGTERM"
    assert not procs.group_alive(leader)
    assert not any(running(pid) for pid in [family.pid, *kids])


def test_terminate_group_sends_sigkill_after_the_grace_to_a_process_that_ignores_sigterm(spawn):
    stubborn = spawn(IGNORES_TERM)
    me = procs.describe(stubborn.pid)
    started = time.monotonic()

    result = procs.terminate_group(me, grace=0.3)

    assert result == f"process group {me.pgid} killed (SIGKILL after 0.3s)"
    assert time.monotonic() - started >= 0.3
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert not procs.group_alive(me)


def test_a_group_whose_leader_is_gone_is_alive_while_a_member_lives_and_is_then_killed(spawn):
    """The leader obeys SIGTERM, its child ignores it: the group outlives its leader
    (the leftovers the reclaimer must still stop), and SIGKILL ends it."""
    parent = spawn(STUBBORN_CHILD)
    kid = int(parent.stdout.readline())
    leader = procs.describe(parent.pid)
    os.kill(parent.pid, signal.SIGTERM)
    parent.wait(timeout=5)
    assert not procs.is_alive(leader)
    assert procs.group_alive(leader)  # the leader is gone, its group is not
    assert running(kid)

    result = procs.terminate_group(leader, grace=0.3)

    assert result == f"process group {leader.pgid} killed (SIGKILL after 0.3s)"
    assert not running(kid)
    assert not procs.group_alive(leader)


def test_group_alive_for_a_member_that_is_not_the_leader(spawn):
    """A recorded process that is not its group's leader: its group is alive while
    any member of that group runs."""
    family = spawn(FAMILY)
    kid = int(family.stdout.readline().split()[0])
    member = procs.describe(kid)
    assert member.pgid == family.pid != member.pid
    assert procs.group_alive(member)
    os.killpg(family.pid, signal.SIGKILL)
    family.wait()
    wait_for(lambda: not procs.group_alive(member), "the group to empty")


# -- the recorded form ---------------------------------------------------------------------


def test_run_identity_round_trips_through_metadata():
    identity = RunIdentity("gb10", "boot-1", shim=Proc(10, 1.5, 10), agent=Proc(11, 2.25, 11))
    assert RunIdentity.from_metadata({"process": identity.as_dict()}) == identity
    assert RunIdentity.from_metadata({"claimed_by": "sparkops"}) is None
    assert RunIdentity.from_metadata(None) is None
    assert RunIdentity.from_metadata({"process": {"host": ""}}) is None
    assert Proc.from_dict({"pid": 12, "start": 3}) == Proc(12, 3.0, 12)  # pgid defaults to the pid
    assert Proc.from_dict({"pid": 12}) is None


OUTSIDE_SESSION = """
import json, os, sys, time
from sparkops.core import procs
me = procs.describe(os.getpid())
print(json.dumps({"pid": os.getpid(), "stat_session": procs.stat_of(os.getpid()).sid, "recorded": me.as_dict(),
                  "group": procs.group_members(me)}), flush=True)
"""


def test_a_session_led_from_outside_the_pid_namespace_is_unknown_and_only_the_process_is_ours():
    """As in a sandbox or container that starts a program without a session of its
    own (CI here): the kernel reads session 0. That record still names the process
    (pid and start), never a group to signal; a stored session of 0 reads the same."""
    try:
        done = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c", OUTSIDE_SESSION],
                              capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    except FileNotFoundError:
        pytest.skip("util-linux's unshare is not installed")
    if done.returncode != 0 and "unshare" in done.stderr:
        pytest.skip(f"cannot make a pid namespace here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["stat_session"] == 0
    assert seen["recorded"] == {"pid": seen["pid"], "start": seen["recorded"]["start"], "pgid": seen["pid"],
                                "sid": None}
    assert seen["group"] == [seen["pid"]]  # the process itself, no group
    assert Proc.from_dict({"pid": 12, "start": 3, "pgid": 12, "sid": 0}) == Proc(12, 3.0, 12, None)
    assert Proc.from_dict({"pid": 12, "start": 3, "pgid": 12, "sid": -4}) is None  # not a session: not a record


def test_boot_id_and_exit_descriptions():
    assert procs.boot_id() == procs.boot_id() != ""
    assert procs.exit_description(-signal.SIGKILL) == "killed by SIGKILL"
    assert procs.exit_description(3) == "exit 3"
    assert procs.exit_description(-200) == "killed by signal 200"


def test_a_childs_output_log_rotates_past_its_size(tmp_path):
    log = tmp_path / "vllm.log"
    for n in range(5):
        log.write_bytes(b"x" * 100 + str(n).encode())
        procs.rotate_log(log, max_bytes=50, backups=2)
    assert not log.exists()  # rotated away; the next restart writes a fresh one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vllm.log.1", "vllm.log.2"]
    assert (tmp_path / "vllm.log.1").read_bytes().endswith(b"4")
    assert (tmp_path / "vllm.log.2").read_bytes().endswith(b"3")
    small = tmp_path / "small.log"
    small.write_bytes(b"y")
    procs.rotate_log(small, max_bytes=50, backups=2)
    assert small.read_bytes() == b"y"
