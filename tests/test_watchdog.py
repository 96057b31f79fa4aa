"""The watchdog job end to end, on real processes: a fake vLLM that dies, hangs and
is restarted through its restart argv, a real redis-server brought back, the
give-up rule, the alert cooldown across a runner restart, GPU zombies killed
(NVML faked at its edge, the processes real), stale runs reported, a dry run."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from conftest import NOW, gone, make_settings, wait_for
from sqlalchemy import select

from sparkops.board import runs
from sparkops.board import transitions as board
from sparkops.jobs.framework import JobContext
from sparkops.meters.nvml_fake import GIB, FakeDevice, FakeNvml
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_alerts, ops_job_runs
from sparkops.storage.store import open_store
from sparkops.watch import services

FAKE_VLLM = Path(__file__).parent / "fixtures" / "fake_vllm.py"
REDIS = shutil.which("redis-server")
OFF = {name: {"enabled": False} for name in ("vllm", "gateway", "redis", "ui", "tunnel")}


def listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Watch:
    """A store, settings with the given services, and watchdog passes at given times."""

    def __init__(self, tmp_path: Path, services_: dict, *, defaults: tuple[str, ...] = (), **env: str):
        """``defaults``: seed services left as they are by default (not declared)."""
        self.tmp_path = tmp_path
        off = {name: value for name, value in OFF.items() if name not in defaults}
        self.env = {"SPARKOPS_SERVICES": json.dumps({**off, **services_}), **env}
        self.settings = make_settings(tmp_path, **self.env)
        self.store = open_store(self.settings, create=True, now=NOW)
        self.ctx = JobContext.create(self.settings, self.store)

    def restart_runner(self) -> None:
        """A new process would have a new store and context: only the database remembers."""
        self.store.dispose()
        self.store = open_store(self.settings, now=NOW)
        self.ctx = JobContext.create(self.settings, self.store)

    def run(self, at: float, **options):
        result = run_job(self.ctx, "watchdog", now=at, trigger="schedule", **options)
        assert result.ok, result.error
        return result

    def state(self, name: str):
        return services.load_states(self.store.ops, self.ctx.host).get(name)

    def alerts(self) -> list[tuple]:
        with self.store.ops.read() as conn:
            return [(r.key, r.level, r.outcome, r.title) for r in
                    conn.execute(select(ops_alerts).order_by(ops_alerts.c.id))]

    def close(self) -> None:
        for proc in self.ctx.restarts:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self.store.dispose()


@pytest.fixture
def watches():
    made = []

    def make(tmp_path, services_, **env):
        made.append(Watch(tmp_path, services_, **env))
        return made[-1]
    yield make
    for watch in made:
        watch.close()


def start_fake_vllm(port: int, mode_file: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(FAKE_VLLM), str(port), str(mode_file)],
                            start_new_session=True)


def test_a_dead_vllm_is_restarted_through_its_restart_argv_and_recovers(tmp_path, watches):
    port, mode = free_port(), tmp_path / "mode"
    mode.write_text("healthy")
    argv = [sys.executable, str(FAKE_VLLM), str(port), str(mode)]
    watch = watches(tmp_path, {"vllm": {"check": "vllm", "url": f"http://127.0.0.1:{port}",
                                        "restart_argv": argv, "failures_before_restart": 2,
                                        "start_grace_seconds": 30}})
    first = start_fake_vllm(port, mode)
    try:
        wait_for(lambda: services.check(watch.settings.services[0]).ok, "the fake vLLM", proc=first)
        watch.run(NOW)
        assert watch.state("vllm").status == "up" and watch.alerts() == []
    finally:
        first.kill()
        first.wait()

    watch.run(NOW + 60)
    assert (watch.state("vllm").status, watch.state("vllm").consecutive_failures) == ("down", 1)
    result = watch.run(NOW + 120)
    assert "restarted vllm" in result.summary
    [restarted] = watch.ctx.restarts
    assert "fake_vllm.py" in " ".join(psutil.Process(restarted.pid).cmdline())
    wait_for(lambda: services.check(watch.settings.services[0]).ok, "the restarted vLLM", proc=restarted)
    watch.run(NOW + 130)  # inside the start grace: the check is fine anyway
    assert watch.state("vllm").status == "up"
    assert [(k, level) for k, level, *_ in watch.alerts()] == [("service:vllm", "error"),
                                                               ("service:vllm", "recovery")]
    assert all(outcome == "logged" for _, _, outcome, _ in watch.alerts())  # no channel configured


def test_a_hung_vllm_counts_as_down(tmp_path, watches):
    port, mode = free_port(), tmp_path / "mode"
    mode.write_text("healthy")
    fix = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('healthy')", str(mode)]
    watch = watches(tmp_path, {"vllm": {"check": "vllm", "url": f"http://127.0.0.1:{port}",
                                        "restart_argv": fix, "failures_before_restart": 2,
                                        "start_grace_seconds": 0}})
    server = start_fake_vllm(port, mode)
    try:
        wait_for(lambda: services.check(watch.settings.services[0]).ok, "the fake vLLM", proc=server)
        watch.run(NOW)
        mode.write_text("busy-stuck")
        watch.run(NOW + 60)
        assert "hung" in watch.state("vllm").detail
        assert "restarted vllm" in watch.run(NOW + 120).summary
        wait_for(lambda: mode.read_text() == "healthy", "the restart command to run")
        watch.run(NOW + 180)
        assert watch.state("vllm").status == "up"
    finally:
        server.kill()
        server.wait()


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
def test_a_stopped_redis_is_brought_back(tmp_path, watches):
    port = free_port()
    argv = [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(tmp_path)]
    watch = watches(tmp_path, {"redis": {"check": "redis", "port": port, "restart_argv": argv,
                                         "failures_before_restart": 1, "start_grace_seconds": 0}})
    redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    spec = next(s for s in watch.settings.services if s.name == "redis")
    wait_for(lambda: services.check(spec).ok, "redis", proc=redis)
    watch.run(NOW)
    redis.terminate()
    redis.wait()
    assert "restarted redis" in watch.run(NOW + 60).summary
    [back] = watch.ctx.restarts
    wait_for(lambda: services.check(spec).ok, "redis to be back", proc=back)
    watch.run(NOW + 120)
    assert watch.state("redis").status == "up"


def test_the_give_up_rule_stops_after_k_restarts_and_alerts_once(tmp_path, watches):
    watch = watches(tmp_path, {"broken": {
        "check": "tcp", "port": free_port(), "restart_argv": [sys.executable, "-c", "pass"],
        "failures_before_restart": 1, "restart_limit": 2, "restart_window_minutes": 30,
        "start_grace_seconds": 0}}, SPARKOPS_ALERTS_COOLDOWN_MINUTES="0")
    for minute in range(0, 8):
        watch.run(NOW + 60 * minute)
    state = watch.state("broken")
    assert state.status == "gave_up" and len(state.restarts) == 2
    gave_up = [a for a in watch.alerts() if "gave up" in a[3]]
    assert len(gave_up) == 1  # once, although the cooldown is 0
    restarts = [a for a in watch.alerts() if a[3].endswith("restarting it")]
    assert len(restarts) == 2


def test_the_cooldown_holds_across_a_runner_restart(tmp_path, watches):
    watch = watches(tmp_path, {"gateway": {"check": "tcp", "port": free_port(),
                                           "failures_before_restart": 1}})
    watch.run(NOW)
    watch.restart_runner()
    watch.run(NOW + 10 * 60)  # 10 minutes later, in a new runner: suppressed
    watch.run(NOW + 31 * 60)  # past the 30-minute cooldown: sent again
    assert [outcome for _, _, outcome, _ in watch.alerts()] == ["logged", "suppressed", "logged"]


def test_gpu_zombies_are_killed_and_the_model_server_restarted(tmp_path, watches):
    port, mode = free_port(), tmp_path / "mode"
    mode.write_text("healthy")
    marker = tmp_path / "vllm-restarted"
    restart = [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('x')", str(marker)]
    watch = watches(tmp_path, {"vllm": {"check": "vllm", "url": f"http://127.0.0.1:{port}",
                                        "restart_argv": restart}},
                    SPARKOPS_GPU_KILL_GRACE_SECONDS="5", SPARKOPS_GPU_MEMORY_RELEASE_TIMEOUT_SECONDS="5")
    server = start_fake_vllm(port, mode)
    code = "import time\nwhile True: time.sleep(1)"
    zombie = subprocess.Popen([sys.executable, "-c", code, "vllm-zombie-engine"], start_new_session=True)
    bystander = subprocess.Popen([sys.executable, "-c", code, "someone-elses-training-job"],
                                 start_new_session=True)
    try:
        wait_for(lambda: services.check(watch.settings.services[0]).ok, "the fake vLLM", proc=server)
        listed = lambda: [(p.pid, 110 * GIB) for p in (zombie, bystander) if p.poll() is None]  # noqa: E731
        nvml = FakeNvml(FakeDevice(name="NVIDIA GB10", compute=listed))
        dry = watch.run(NOW, nvml=nvml, dry_run=True)
        assert "would kill pid" in dry.summary and not marker.exists() and zombie.poll() is None

        result = watch.run(NOW + 60, nvml=nvml)
        wait_for(lambda: gone(zombie.pid), "the zombie to die")
        assert bystander.poll() is None  # does not match gpu.kill_patterns: never touched
        wait_for(marker.exists, "the vLLM restart after the kill")
        assert "killed" in result.summary
        assert ("gpu:zombies", "error") in [(k, level) for k, level, *_ in watch.alerts()]
    finally:
        for proc in (server, zombie, bystander):
            proc.kill()
            proc.wait()


def test_stale_runs_are_reported_not_closed(tmp_path, watches):
    watch = watches(tmp_path, {})
    task = board.create_task(watch.store.board, "orphaned claim", now=NOW)
    board.claim_next(watch.store.board, host=watch.ctx.host, lock=f"{watch.ctx.host}:1", capacity=1, now=NOW)
    result = watch.run(NOW + 3600)
    [stale] = result.details["stale"]
    assert (stale["task_id"], stale["outcome"]) == (task, "spawn_failed")
    assert "stale run" in result.summary
    assert runs.count_open_runs(watch.store.board, watch.ctx.host) == 1  # the reclaimer's job


def test_a_dry_run_changes_nothing(tmp_path, watches):
    watch = watches(tmp_path, {"gateway": {"check": "tcp", "port": free_port(),
                                           "restart_argv": [sys.executable, "-c", "pass"],
                                           "failures_before_restart": 1}})
    result = watch.run(NOW, dry_run=True)
    assert result.summary.startswith("dry run: would restart gateway")
    assert watch.state("gateway") is None and watch.alerts() == []
    assert watch.ctx.restarts == []  # nothing was started


def test_a_pass_says_what_is_down_and_what_it_did_not_look_at(tmp_path, watches):
    """"All well" covers only what was looked at: a declared service that fails is
    said (in a dry run too, before it counts for a restart) and counted as a
    problem; a seed default not found here is "not configured"; no NVML is "GPU not
    checked"."""
    watch = watches(tmp_path, {"redis": {"check": "tcp", "port": free_port()}}, defaults=("gateway",))
    gateway = next(s for s in watch.settings.services if s.name == "gateway")
    assert not gateway.declared and not listening(gateway.port)  # the seed's gateway port: nothing here
    no_gpu = FakeNvml(init_error=12)

    dry = run_job(watch.ctx, "watchdog", now=NOW, dry_run=True, nvml=no_gpu)
    assert dry.summary.startswith("dry run: redis down: "), dry.summary
    assert dry.problems == 1
    result = watch.run(NOW, nvml=no_gpu)
    assert result.summary.startswith("redis down: "), result.summary
    assert "(not configured here (not found): gateway; GPU not checked: " in result.summary
    assert result.problems == 1
    assert watch.state("gateway").status == "not_configured" and watch.alerts() == []

    # a watchdog that found a problem is recorded though it did nothing (the Jobs page shows it)
    with watch.store.ops.read() as conn:
        recorded = conn.execute(select(ops_job_runs.c.outcome, ops_job_runs.c.problems)).all()
    assert recorded == [("ok", 1), ("ok", 1)]  # the dry run and the pass


def test_all_well_only_when_nothing_is_wrong_and_names_what_is_not_here(tmp_path, watches):
    watch = watches(tmp_path, {}, defaults=("gateway",))
    assert not listening(4860)
    result = watch.run(NOW, nvml=FakeNvml(init_error=12))
    assert result.summary.startswith("all well (not configured here (not found): gateway; GPU not checked")
    assert result.problems == 0
