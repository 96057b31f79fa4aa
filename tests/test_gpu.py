"""The GPU adapter, the gpu-sample job and the zombie rule.

NVML is the edge: :class:`FakeNvml` below provides exactly the pynvml functions
and constants ``sparkops.meters.gpu`` uses. Everything else is real: the processes the
fake lists as GPU processes are real children (their command lines, start times
and sessions are read by psutil, and the zombie rule signals them for real), the
samples go to a real SQLite file and a real PostgreSQL, ``/proc/meminfo`` is a
real file in tmp_path, and the real ``pynvml`` of this machine is tried too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import NOW, ROOT, gone, make_settings, wait_for
from sqlalchemy import insert, select

from sparkops.config import Settings
from sparkops.core import procs
from sparkops.core.errors import ConfigError
from sparkops.jobs.framework import JobContext, JobSpec
from sparkops.meters import gpu
from sparkops.meters.nvml_fake import (
    GIB,
    LIBRARY_NOT_FOUND,
    MIB,
    NOT_AVAILABLE,
    NOT_SUPPORTED,
    Fail,
    FakeDevice,
    FakeNvml,
)
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_gpu_samples
from sparkops.storage.store import Store
from sparkops.watch import zombie_rule


def meminfo(tmp_path: Path, total_gib: float = 119.7, available_gib: float = 80.0) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       {int(total_gib * 1024 * 1024)} kB\n"
                    f"MemFree:        {int(available_gib * 1024 * 1000)} kB\n"
                    f"MemAvailable:   {int(available_gib * 1024 * 1024)} kB\n"
                    "Buffers:          123456 kB\n")
    return path


# -- real processes --------------------------------------------------------------------

SLEEPER = "import sys, time; time.sleep(60)"


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmdline(pid: int) -> str:
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return ""


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``python -c CODE MARKER`` (in its own session by default) and wait until
    its command line shows the marker (after exec); everything is killed at the end."""
    started: list[subprocess.Popen] = []

    def start(marker: str, code: str = SLEEPER, *, new_session: bool = True) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code, marker], start_new_session=new_session,
                                stdin=subprocess.DEVNULL)
        started.append(proc)
        wait_for(lambda: marker in cmdline(proc.pid), f"{marker} to start", proc=proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            try:
                if os.getpgid(proc.pid) == proc.pid:
                    os.killpg(proc.pid, signal.SIGKILL)
                else:
                    proc.kill()
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


@pytest.fixture
def tag() -> str:
    """Unique markers, so the patterns of one test match only its own processes."""
    return uuid.uuid4().hex[:10]


def zombie_settings(tmp_path: Path, tag: str, **env: str) -> Settings:
    values = {
        "SPARKOPS_GPU_KILL_PATTERNS": json.dumps([rf"fake-vllm-(\S+-)?{tag}"]),
        "SPARKOPS_GPU_SERVING_PATTERNS": json.dumps([f"fake-vllm-serve-{tag}"]),
        "SPARKOPS_GPU_ZOMBIE_THRESHOLD_GB": "1",
        "SPARKOPS_GPU_HEALTH_FAILURES_BEFORE_KILL": "3",
        "SPARKOPS_GPU_KILL_GRACE_SECONDS": "5",
        "SPARKOPS_GPU_MEMORY_RELEASE_TIMEOUT_SECONDS": "10",
        **env,
    }
    return make_settings(tmp_path, **values)


def listing(*pids: int, used: int = 2 * GIB, linger: int = 0) -> Callable[[], list[tuple[int, Any]]]:
    """A process list of those ``pids`` still running; a pid that ended stays listed
    for ``linger`` more reads (the driver releasing memory late)."""
    lingering = dict.fromkeys(pids, linger)

    def listed() -> list[tuple[int, Any]]:
        out = []
        for pid in pids:
            if running(pid):
                out.append((pid, used))
            elif lingering[pid] > 0:
                lingering[pid] -= 1
                out.append((pid, used))
        return out

    return listed


# -- snapshot --------------------------------------------------------------------------


def test_discrete_gpu_with_two_processes(spawn, tag: str) -> None:
    child = spawn(f"trainer-{tag}")
    nvml = FakeNvml(FakeDevice(compute=[(os.getpid(), 1536 * MIB), (child.pid, 30 * GIB)]))

    snap = gpu.snapshot(nvml, now=NOW)

    assert snap.available and snap.driver_version == "580.95.05" and snap.taken_at == NOW
    (device,) = snap.devices
    assert (device.index, device.name, device.uuid) == (0, "NVIDIA H100 80GB HBM3",
                                                        "GPU-5f1d3a2c-0000-0000-0000-000000000001")
    assert (device.utilization_pct, device.temperature_c, device.power_w) == (37, 61, 312.5)
    assert (device.memory_total_mb, device.memory_used_mb, device.memory_free_mb) == (81920, 20480, 61440)
    assert device.unified is False and device.notes == []
    by_pid = {p.pid: p for p in snap.processes}
    assert by_pid[os.getpid()].used_memory_mb == 1536
    assert by_pid[child.pid].used_memory_mb == 30 * 1024
    assert f"trainer-{tag}" in by_pid[child.pid].command_line
    assert by_pid[child.pid].name.startswith("python")
    assert by_pid[child.pid].start_time == procs.start_of(child.pid)
    assert nvml.inits == nvml.shutdowns == 1
    json.dumps(snap.as_dict())  # JSON-able for the page and the script


def test_compute_and_graphics_lists_are_merged_per_pid() -> None:
    me = os.getpid()
    nvml = FakeNvml(FakeDevice(compute=[(me, 4 * GIB)], graphics=[(me, None), (me, 4 * GIB)]))
    assert [(p.pid, p.used_memory_mb) for p in gpu.snapshot(nvml).processes] == [(me, 4096)]


def test_gb10_unified_memory_from_meminfo(tmp_path: Path) -> None:
    me = os.getpid()
    device = FakeDevice(name="NVIDIA GB10", memory=Fail(NOT_SUPPORTED), power_mw=Fail(NOT_SUPPORTED),
                        compute=[(me, 70 * GIB), (os.getppid(), 2 * GIB)])
    snap = gpu.snapshot(FakeNvml(device), meminfo_path=meminfo(tmp_path, 119.7, 40.0))

    (d,) = snap.devices
    assert d.unified is True and d.name == "NVIDIA GB10"
    assert d.memory_total_mb == pytest.approx(119.7 * 1024, abs=1)
    assert d.memory_free_mb == pytest.approx(40 * 1024, abs=1)
    assert d.memory_used_mb == 72 * 1024  # the sum of the processes
    assert any("unified memory" in n for n in d.notes)
    assert "power: Not Supported" in d.notes and d.power_w is None
    assert d.utilization_pct == 37  # the rest is still read


def test_unified_memory_without_process_memory_uses_meminfo(tmp_path: Path) -> None:
    """A total of 0 counts as "no device memory" too; with no per-process numbers,
    used is MemTotal - MemAvailable."""
    device = FakeDevice(memory=(0, 0, 0), compute=[(os.getpid(), None)])
    (d,) = gpu.snapshot(FakeNvml(device), meminfo_path=meminfo(tmp_path, 100, 60)).devices
    assert d.unified and d.memory_used_mb == pytest.approx(40 * 1024, abs=1)


def test_unreadable_meminfo_is_a_note(tmp_path: Path) -> None:
    device = FakeDevice(memory=Fail(NOT_SUPPORTED))
    (d,) = gpu.snapshot(FakeNvml(device), meminfo_path=tmp_path / "missing").devices
    assert d.unified and d.memory_total_mb is None and d.memory_used_mb is None
    assert any("cannot read" in n for n in d.notes)


def test_process_memory_not_available() -> None:
    me, parent = os.getpid(), os.getppid()
    device = FakeDevice(memory=Fail(NOT_SUPPORTED), compute=[(me, None), (parent, NOT_AVAILABLE)])
    snap = gpu.snapshot(FakeNvml(device), meminfo_path=Path("/proc/meminfo"))
    assert {p.pid: p.used_memory_mb for p in snap.processes} == {me: None, parent: None}
    assert snap.devices[0].unified and snap.devices[0].memory_used_mb is not None


def test_process_that_exits_between_listing_and_inspecting() -> None:
    """The fake lists a real child, then kills and reaps it before returning the
    list, so the snapshot inspects a pid that is gone; and a pid that never was."""
    child = subprocess.Popen([sys.executable, "-c", SLEEPER])

    def listed() -> list[tuple[int, Any]]:
        child.kill()
        child.wait()
        return [(child.pid, 3 * GIB), (never, GIB)]

    never = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    snap = gpu.snapshot(FakeNvml(FakeDevice(compute=listed)))

    by_pid = {p.pid: p for p in snap.processes}
    assert by_pid[never] == gpu.GpuProcess(never, 0, 1024.0)
    if not psutil.pid_exists(child.pid):  # (unless a newcomer got the pid already)
        assert by_pid[child.pid] == gpu.GpuProcess(child.pid, 0, 3072.0)


def test_failing_queries_give_none_and_notes() -> None:
    device = FakeDevice(name=Fail(999), util=Fail(NOT_SUPPORTED), temp=Fail(NOT_SUPPORTED),
                        memory=Fail(999), compute=Fail(NOT_SUPPORTED), graphics=Fail(NOT_SUPPORTED))
    snap = gpu.snapshot(FakeNvml(device))
    assert snap.available
    (d,) = snap.devices
    assert (d.name, d.utilization_pct, d.temperature_c, d.memory_total_mb) == (None, None, None, None)
    assert d.unified is False  # an unknown error is not "unified memory"
    assert d.notes == ["name: Unknown Error", "utilization: Not Supported", "temperature: Not Supported",
                       "compute processes: Not Supported", "graphics processes: Not Supported",
                       "memory: Unknown Error"]
    assert snap.processes == []


def test_no_nvml_library() -> None:
    nvml = FakeNvml(init_error=LIBRARY_NOT_FOUND)
    snap = gpu.snapshot(nvml)
    assert not snap.available and snap.devices == [] and snap.processes == []
    assert snap.reason == "NVML library not found (no NVIDIA driver on this machine)"
    assert "Driver Not Loaded" in gpu.snapshot(FakeNvml(init_error=9)).reason


def test_no_pynvml_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    snap = gpu.snapshot()
    assert not snap.available and "pip install nvidia-ml-py" in snap.reason


def test_the_real_pynvml_of_this_machine() -> None:
    """No driver here: available False with the reason. (On a GPU machine: devices.)"""
    snap = gpu.snapshot()
    if snap.available:
        assert snap.devices or snap.reason == "NVML sees no GPU"
    else:
        assert "NVML" in snap.reason or "nvidia-ml-py" in snap.reason


def test_an_unexpected_error_never_escapes() -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
            raise RuntimeError("boom")

    nvml = Broken(FakeDevice())
    snap = gpu.snapshot(nvml)
    assert not snap.available and "boom" in snap.reason and nvml.shutdowns == 1


# -- the gpu-sample job ----------------------------------------------------------------


def _row(created_at: int, host: str = "spark-1", device: int = 0) -> dict[str, Any]:
    return {"created_at": created_at, "host": host, "device": device, "name": "old",
            "utilization_pct": 1.0, "memory_used_mb": 1.0, "memory_total_mb": 2.0,
            "temperature_c": 40.0, "power_w": 10.0, "unified": 0, "processes": 0}


def test_sample_job_stores_rows_and_prunes_old_ones(store: Store, tmp_path: Path) -> None:
    ctx = JobContext(settings=make_settings(tmp_path), store=store, host="spark-1")
    day = 86400
    with store.ops.write() as conn:
        conn.execute(insert(ops_gpu_samples), [_row(NOW - 8 * day), _row(NOW - 8 * day, host="other"),
                                               _row(NOW - 6 * day), _row(NOW - day, host="other")])
    nvml = FakeNvml(FakeDevice(compute=[(os.getpid(), GIB)]),
                    FakeDevice(name="NVIDIA GB10", memory=Fail(NOT_SUPPORTED)))

    report = gpu.sample(ctx, now=NOW, nvml=nvml, meminfo_path=meminfo(tmp_path))

    assert report.acted and report.summary == ("stored a sample of 2 GPU(s); deleted 2 sample(s) "
                                               "older than the retention")
    with store.ops.read() as conn:
        times = sorted(r.created_at for r in conn.execute(select(ops_gpu_samples)))
    assert times == [NOW - 6 * day, NOW - day, NOW, NOW]
    rows = gpu.history(store.ops, since=NOW - 2 * day)
    assert [(r["created_at"], r["host"], r["device"]) for r in rows] == [
        (NOW - day, "other", 0), (NOW, "spark-1", 0), (NOW, "spark-1", 1)]
    new = [r for r in rows if r["created_at"] == NOW]
    assert new[0]["name"] == "NVIDIA H100 80GB HBM3" and new[0]["processes"] == 1
    assert new[0]["memory_used_mb"] == 20480 and new[0]["unified"] is False
    assert new[1]["unified"] is True and new[1]["memory_total_mb"] == pytest.approx(119.7 * 1024, abs=1)
    assert [r["host"] for r in gpu.history(store.ops, since=0, host="other")] == ["other"]
    json.dumps(rows)


def test_sample_job_without_nvml_stores_nothing(sqlite_store: Store, tmp_path: Path) -> None:
    ctx = JobContext(settings=make_settings(tmp_path), store=sqlite_store, host="spark-1")
    report = gpu.sample(ctx, now=NOW, nvml=FakeNvml(init_error=LIBRARY_NOT_FOUND))
    assert not report.acted
    assert report.summary == "no GPU sample: NVML library not found (no NVIDIA driver on this machine)"
    assert gpu.history(sqlite_store.ops, since=0) == []


def test_sample_job_through_run_job(sqlite_store: Store, tmp_path: Path) -> None:
    """As the lead registers it: run_job passes its options (here the fake) through."""
    settings = make_settings(tmp_path)
    ctx = JobContext(settings=settings, store=sqlite_store, host="spark-1")
    specs = {"gpu-sample": JobSpec("gpu-sample", gpu.sample, "gpu.sample_interval_seconds", "GPU sample")}
    result = run_job(ctx, "gpu-sample", now=NOW, specs=specs, nvml=FakeNvml(FakeDevice()))
    assert result.ok and result.summary == "stored a sample of 1 GPU(s)"
    assert len(gpu.history(sqlite_store.ops, since=NOW)) == 1
    assert specs["gpu-sample"].interval(settings) == 30.0


# -- the zombie rule on real processes -------------------------------------------------


def test_kills_the_matching_zombie_and_leaves_the_other(spawn, tag: str, tmp_path: Path) -> None:
    zombie = spawn(f"fake-vllm-{tag}")
    bystander = spawn(f"innocent-trainer-{tag}")
    settings = zombie_settings(tmp_path, tag)
    nvml = FakeNvml(FakeDevice(compute=listing(zombie.pid, bystander.pid, linger=2)))

    zombies = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0)

    assert {z.pid: z.killable for z in zombies} == {zombie.pid: True, bystander.pid: False}
    z = next(z for z in zombies if z.pid == zombie.pid)
    assert z.used_memory_mb == 2048 and "more than gpu.zombie_threshold_gb = 1" in z.reason
    assert "not part of a live model server's process tree" in z.reason
    lines = zombie_rule.explain(zombies)
    assert any(line.startswith(f"would kill pid {zombie.pid} (") and line.endswith(z.reason)
               for line in lines)
    assert any(line.startswith(f"would leave pid {bystander.pid} alone: not matching gpu.kill_patterns")
               for line in lines)
    assert running(zombie.pid)  # explain is a dry run

    sleeps: list[float] = []
    report = zombie_rule.kill_zombies(zombies, settings, nvml=nvml,
                                      sleep=lambda s: (sleeps.append(s), time.sleep(min(s, 0.01))),
                                      poll_seconds=0.25)

    assert gone(zombie.pid) and running(bystander.pid)
    assert [(k.pid, k.how, k.ended) for k in report.killed] == [(zombie.pid, "ended after SIGTERM", True)]
    assert [(s.pid, s.why) for s in report.skipped] == [(bystander.pid, "not matching gpu.kill_patterns")]
    assert report.memory_released is True and report.still_listed == []
    assert sleeps.count(0.25) == 2  # two more reads while the driver still listed it
    assert "GPU memory released" in report.summary()


def test_sigkill_after_the_grace(spawn, tag: str, tmp_path: Path) -> None:
    ready = tmp_path / "stubborn.ready"
    stubborn = spawn(f"fake-vllm-{tag}", textwrap.dedent(f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(ready)!r}).touch()
        time.sleep(60)
    """))
    wait_for(ready.exists, "the SIGTERM handler")
    settings = zombie_settings(tmp_path, tag, SPARKOPS_GPU_KILL_GRACE_SECONDS="0.3")
    nvml = FakeNvml(FakeDevice(compute=listing(stubborn.pid)))
    zombies = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0)

    report = zombie_rule.kill_zombies(zombies, settings, nvml=nvml)

    assert gone(stubborn.pid)
    assert [(k.how, k.ended) for k in report.killed] == [("SIGKILL after 0.3s", True)]
    assert stubborn.wait(timeout=5) == -signal.SIGKILL
    assert report.memory_released is True


def fake_server(spawn, tag: str, name: str, tmp_path: Path) -> tuple[subprocess.Popen, int, int]:
    """``fake-vllm-serve-NAME-TAG``: listens on a free loopback port and runs an engine
    child (``fake-vllm-engine-...``, not matching serving_patterns itself), as vLLM's
    API server and EngineCore do. Returns the server, its port and the engine's pid."""
    ready = tmp_path / f"{name}.ready"
    server = spawn(f"fake-vllm-serve-{name}-{tag}", textwrap.dedent(f"""
        import json, pathlib, socket, subprocess, sys, time
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        engine = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)",
                                   "fake-vllm-engine-{name}-{tag}"])
        pathlib.Path({str(ready)!r}).write_text(json.dumps([sock.getsockname()[1], engine.pid]))
        time.sleep(60)
    """))
    port, engine = json.loads(wait_for(lambda: ready.exists() and ready.read_text(), f"{name}'s port"))
    wait_for(lambda: f"fake-vllm-engine-{name}-{tag}" in cmdline(engine), "the engine to start")
    return server, port, engine


def test_healthy_serving_tree_is_not_a_zombie_until_health_fails(spawn, tag: str, tmp_path: Path) -> None:
    server, port, engine_pid = fake_server(spawn, tag, "a", tmp_path)
    settings = zombie_settings(tmp_path, tag, SPARKOPS_GPU_SERVING_PATTERNS=json.dumps([f"fake-vllm-serve-\\S+-{tag}"]))
    # the engine (a child, not matching serving_patterns itself) holds 70 GB
    nvml = FakeNvml(FakeDevice(compute=listing(engine_pid, used=70 * GIB)))
    snap = gpu.snapshot(nvml)

    assert zombie_rule.find_zombies(snap, settings, serving_healthy=True, health_failures=0, watched_port=port) == []
    assert zombie_rule.find_zombies(snap, settings, serving_healthy=False, health_failures=2, watched_port=port) == []
    zombies = zombie_rule.find_zombies(snap, settings, serving_healthy=False, health_failures=3, watched_port=port)

    assert [(z.pid, z.killable) for z in zombies] == [(engine_pid, True)]
    assert zombies[0].reason == "model server unhealthy for 3 checks (gpu.health_failures_before_kill = 3)"
    report = zombie_rule.kill_zombies(zombies, settings, nvml=nvml)
    assert gone(engine_pid) and running(server.pid) and report.memory_released is True


def test_an_unhealthy_watched_server_never_takes_a_healthy_one_on_another_port_with_it(
        spawn, tag: str, tmp_path: Path) -> None:
    """Found on this machine: rule (b) killed every vLLM on the host, because the
    serving tree was any matching command line. Now it is the watched port's tree."""
    _watched, port, watched_engine = fake_server(spawn, tag, "watched", tmp_path)
    other, _other_port, other_engine = fake_server(spawn, tag, "other", tmp_path)
    settings = zombie_settings(tmp_path, tag, SPARKOPS_GPU_SERVING_PATTERNS=json.dumps([f"fake-vllm-serve-\\S+-{tag}"]))
    nvml = FakeNvml(FakeDevice(compute=listing(watched_engine, other_engine, used=70 * GIB)))

    zombies = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=False, health_failures=5,
                                       watched_port=port)

    assert [z.pid for z in zombies] == [watched_engine]
    zombie_rule.kill_zombies(zombies, settings, nvml=nvml)
    assert gone(watched_engine) and running(other_engine) and running(other.pid)


def test_an_engine_left_by_a_dead_server_is_a_zombie(spawn, tag: str, tmp_path: Path) -> None:
    """The seed's case: the API server died, its engine (matching the serving
    patterns, listening nowhere) still holds the GPU. Rule (a) while the server was
    never seen unhealthy, rule (b) once its checks fail."""
    debris = spawn(f"fake-vllm-serve-dead-{tag}")  # matches, holds memory, listens nowhere
    settings = zombie_settings(tmp_path, tag, SPARKOPS_GPU_SERVING_PATTERNS=json.dumps([f"fake-vllm-serve-\\S+-{tag}"]))
    snap = gpu.snapshot(FakeNvml(FakeDevice(compute=listing(debris.pid, used=70 * GIB))))

    (a,) = zombie_rule.find_zombies(snap, settings, serving_healthy=True, health_failures=0, watched_port=1)
    assert a.pid == debris.pid and "not part of a live model server's process tree" in a.reason
    (b,) = zombie_rule.find_zombies(snap, settings, serving_healthy=False, health_failures=3, watched_port=1)
    assert b.reason.endswith("left by a server that no longer listens")


def test_a_reused_pid_is_never_signalled(spawn, tag: str, tmp_path: Path) -> None:
    stranger = spawn(f"fake-vllm-{tag}")
    settings = zombie_settings(tmp_path, tag)
    nvml = FakeNvml(FakeDevice(compute=listing(stranger.pid)))
    (z,) = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0)
    recorded = dataclasses.replace(z, start_time=z.start_time - 3600)  # the zombie it once was

    report = zombie_rule.kill_zombies([recorded], settings, nvml=nvml)

    assert running(stranger.pid)
    assert report.killed == [] and report.memory_released is None
    assert "now belongs to another process" in report.skipped[0].why


def test_a_zombie_that_ended_meanwhile_is_skipped(spawn, tag: str, tmp_path: Path) -> None:
    proc = spawn(f"fake-vllm-{tag}")
    settings = zombie_settings(tmp_path, tag)
    nvml = FakeNvml(FakeDevice(compute=listing(proc.pid)))
    zombies = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0)
    proc.kill()
    proc.wait()
    report = zombie_rule.kill_zombies(zombies, settings, nvml=nvml)
    assert report.killed == [] and report.skipped[0].why == "it is gone"


def test_never_sparkops_itself_its_ancestors_or_its_session(spawn, tag: str, tmp_path: Path) -> None:
    """Even with a kill pattern that matches everything."""
    same_session = spawn(f"fake-vllm-{tag}", new_session=False)
    settings = zombie_settings(tmp_path, tag, SPARKOPS_GPU_KILL_PATTERNS='["."]')
    nvml = FakeNvml(FakeDevice(compute=listing(os.getpid(), os.getppid(), same_session.pid)))
    zombies = zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0)

    why = {z.pid: z.leave_reason for z in zombies}
    assert not any(z.killable for z in zombies)
    assert why[os.getpid()] == "it is this SparkOps process"
    assert why[os.getppid()] == "it is an ancestor of this SparkOps process"
    assert why[same_session.pid].startswith("it is in SparkOps' own session")
    report = zombie_rule.kill_zombies(zombies, settings, nvml=nvml)
    assert report.killed == [] and len(report.skipped) == 3 and running(same_session.pid)


def test_small_and_unknown_memory_is_not_a_zombie(spawn, tag: str, tmp_path: Path) -> None:
    small = spawn(f"fake-vllm-{tag}")
    settings = zombie_settings(tmp_path, tag)
    unknown = FakeNvml(FakeDevice(compute=listing(small.pid, used=None)))
    under = FakeNvml(FakeDevice(compute=listing(small.pid, used=GIB)))  # exactly 1 GB: not more
    for nvml in (unknown, under):
        assert zombie_rule.find_zombies(gpu.snapshot(nvml), settings, serving_healthy=True, health_failures=0) == []


def test_memory_that_is_never_released_times_out(spawn, tag: str) -> None:
    """The clock is a parameter: 60 s of waiting in no time."""
    proc = spawn(f"fake-vllm-{tag}")
    start = procs.start_of(proc.pid)
    nvml = FakeNvml(FakeDevice(compute=[(proc.pid, 10 * GIB)]))  # listed forever
    clock = [0.0]
    released, listed, waited, note = zombie_rule.wait_for_memory_release(
        {proc.pid: start}, nvml=nvml, timeout=60, sleep=lambda s: clock.__setitem__(0, clock[0] + s),
        clock=lambda: clock[0], poll_seconds=1)
    assert (released, listed, waited) == (False, [proc.pid], 60)
    assert "not released after 60s" in note
    released, _, _, note = zombie_rule.wait_for_memory_release({proc.pid: start}, nvml=FakeNvml(init_error=12),
                                                               timeout=60)
    assert released is None and "cannot tell" in note


def test_no_gpu_means_no_zombies(tmp_path: Path) -> None:
    snap = gpu.snapshot(FakeNvml(init_error=LIBRARY_NOT_FOUND))
    assert zombie_rule.find_zombies(snap, make_settings(tmp_path), serving_healthy=False, health_failures=99) == []


def test_a_bad_pattern_is_a_config_error_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gpu.kill_patterns: 'vllm\(' is not a valid regular expression"):
        make_settings(tmp_path, SPARKOPS_GPU_KILL_PATTERNS='["vllm("]')
    # and find_zombies, given patterns some other way, says the same
    snap = gpu.snapshot(FakeNvml(FakeDevice(compute=[(os.getpid(), GIB)])))
    with pytest.raises(ConfigError, match=r"gpu.kill_patterns: 'vllm\(' is not a regular expression"):
        zombie_rule.find_zombies(snap, {**make_settings(tmp_path).values, "gpu.kill_patterns": ["vllm("]},
                                 serving_healthy=True, health_failures=0)


# -- scripts/gpu_check.py --------------------------------------------------------------


def test_gpu_check_script_without_a_gpu() -> None:
    """Here there is no driver: it says so and exits 0, and needs no sqlalchemy."""
    code = ("import runpy, sys; sys.modules['sqlalchemy'] = None; sys.argv = ['gpu_check.py']; "
            f"runpy.run_path({str(ROOT / 'scripts' / 'gpu_check.py')!r}, run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "NVML library not found" in result.stdout
    assert "could not" in result.stdout.lower()


def test_gpu_check_script_flow_with_the_fake(tmp_path: Path) -> None:
    """The whole flow of the script with the fake standing in for NVML and a plain
    python process standing in for the CUDA holder."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)

    def holders() -> list[tuple[int, Any]]:
        return [(p.pid, 256 * MIB) for p in psutil.Process().children(recursive=True)
                if check.MARKER in cmdline(p.pid) and running(p.pid)]

    fake_holder = "import sys; print('ready', flush=True); sys.stdin.read()"
    lines: list[str] = []
    rc = check.main(["--workload-seconds", "0"], nvml=FakeNvml(FakeDevice(compute=holders)),
                    holder_code=fake_holder, out=lines.append)
    text = "\n".join(lines)
    assert rc == 0, text
    assert "would kill pid" in text and "holds 0.25 GB of GPU memory" in text
    assert "COULD NOT" not in text
    assert "GPU memory released" in text
    assert "nothing was killed" in text.lower()


def test_gpu_check_meters_a_workload_with_the_fake(tmp_path: Path) -> None:
    """The meters' part of the script: a fake GPU draws 100 W idle and 400 W while
    a stand-in workload runs (a flag file), its energy counter integrating that; the
    script's shares of the counter, its power cross-check and its verdicts follow."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    flag = tmp_path / "busy"
    energy = {"mj": 0.0, "at": time.monotonic()}

    def watts() -> float:
        return 400.0 if flag.exists() else 100.0

    def energy_mj() -> int:  # integrates the power since the last read
        now = time.monotonic()
        energy["mj"] += watts() * (now - energy["at"]) * 1000
        energy["at"] = now
        return int(energy["mj"])

    device = FakeDevice(util=lambda: 95 if flag.exists() else 0, power_mw=lambda: int(watts() * 1000),
                        energy_mj=energy_mj)
    workload = (f"import sys, time, pathlib; flag = pathlib.Path({str(flag)!r}); print('ready', flush=True); "
                "sys.stdin.readline(); flag.touch(); time.sleep(float(sys.argv[2])); flag.unlink(); "
                "print('done 7', flush=True)")
    lines: list[str] = []
    rc = check.main(["--workload-seconds", "1.5", "--idle-seconds", "1", "--every", "0.2"],
                    nvml=FakeNvml(device, init_error=None), holder_code="import sys; sys.exit(5)",
                    workload_code=workload, out=lines.append)
    text = "\n".join(lines)
    assert rc == 0, text
    assert "workload: done 7" in text
    assert "COULD: see the workload in the energy counter" in text, text
    assert "COULD: see the workload in the utilization" in text, text
    assert "COULD: workload: mean power from the energy counter" in text, text
    verdicts = [line for line in lines if line.startswith("COULD")]
    assert not any("energy counter" in v or "utilization" in v for v in verdicts if v.startswith("COULD NOT")), text
