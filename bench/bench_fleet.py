"""Benchmark: a sprint of three hosts on one PostgreSQL board.

Three real ``jobs_runner.py`` processes with host identities gb10-a/b/c and
capacities 2/3/4, real shims and the demo agent (0-0.4 s of work, then its report
through ``python -m sparkops task complete``). With a quarter of the tasks done one
host dies (its runner, shims and agents killed with SIGKILL): the other hosts'
reclaimers close its runs by their heartbeats and the tasks run again there. At half
done the PostgreSQL server itself is restarted (``pg_ctlcluster ... restart -m fast``):
the runners, shims and agents ride it out.

Measured: wall time, tasks per second, how busy the live hosts' slots were. Checked
(``violations``): every task done exactly once, no run left open, no host over its
capacity at any point of the event log, no run lost to the database restart.

    .venv/bin/python bench/bench_fleet.py [--tasks 2000] [--pg ADMIN_URL]

Needs a local PostgreSQL it may restart (``pg_ctlcluster``, as root); it makes a
database of its own and drops it afterwards. ``tests/test_fleet_sprint.py`` runs the
same scenario with a few dozen tasks; this is the scale run (about 40 minutes for
2,000 tasks on 2 vCPUs at 0.87 tasks/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil
from sqlalchemy import create_engine, func, select, text
from sqlalchemy.exc import DBAPIError

from sparkops.board import model, queries
from sparkops.board import transitions as board
from sparkops.config import load_settings
from sparkops.storage.schema import task_events, task_runs
from sparkops.storage.store import open_store

HOSTS = {"gb10-a": 2, "gb10-b": 3, "gb10-c": 4}  # name: max_in_progress
HEARTBEAT_TIMEOUT = 8
AGENT = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "0", "--max-seconds", "0.4"]
NO_SERVICES = {name: {"enabled": False} for name in ("vllm", "gateway", "redis", "tunnel")}
CLOSING = {"completed", "blocked", "reclaimed", *(str(o) for o in model.FAILURE_OUTCOMES)}
DEAD_HOST_REASON = "no heartbeat from host gb10-a for "


def pg_cluster() -> list[str] | None:
    """``pg_ctlcluster VERSION main`` for the local server, when we may restart it."""
    if os.geteuid() != 0 or not shutil.which("pg_ctlcluster") or not Path("/etc/postgresql").is_dir():
        return None
    versions = sorted(os.listdir("/etc/postgresql"))
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] if versions else None


def restart_postgres(cluster: list[str]) -> None:
    subprocess.run([*cluster, "restart", "--", "-m", "fast"], check=True, capture_output=True, timeout=120)


def runner_env(name: str, capacity: int, url: str, home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_STORAGE_BOARD_URL": url, "SPARKOPS_STORAGE_OPS_URL": url,
        "SPARKOPS_HOST_NAME": name,
        "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": str(capacity),
        "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(AGENT),
        "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "1",
        "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(home / "workspaces"),
        "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(home / "logs" / "runs"),
        "SPARKOPS_RUNNER_LOG_FILE": str(home / "logs" / "runner.log"),
        "SPARKOPS_RECLAIM_INTERVAL_SECONDS": "2",
        "SPARKOPS_RECLAIM_HEARTBEAT_TIMEOUT_SECONDS": str(HEARTBEAT_TIMEOUT),
        "SPARKOPS_WATCHDOG_INTERVAL_SECONDS": "3600",
        "SPARKOPS_GPU_SAMPLE_INTERVAL_SECONDS": "3600",
        "SPARKOPS_REVIEW_INTERVAL_SECONDS": "3600",
        "SPARKOPS_EXPORT_INTERVAL_SECONDS": "3600",
        "SPARKOPS_SERVICES": json.dumps(NO_SERVICES),
    })
    return env


def wait_for(predicate: Callable[[], Any], what: str, timeout: float,
             proc: subprocess.Popen | None = None) -> Any:
    """Poll ``predicate`` until it is truthy; TimeoutError after ``timeout`` s, or
    RuntimeError at once if ``proc`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the runner exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


class Occupancy:
    """Samples open runs against the live hosts' slots twice a second."""

    def __init__(self, db, capacity: int):
        self.db, self.capacity = db, capacity
        self.samples: list[float] = []
        self.stop = threading.Event()

    def loop(self) -> None:
        while not self.stop.wait(0.5):
            try:
                with self.db.read() as conn:
                    running = conn.execute(select(func.count()).select_from(task_runs)
                                           .where(task_runs.c.ended_at.is_(None))).scalar_one()
            except DBAPIError:
                continue  # the server is restarting
            self.samples.append(min(1.0, running / self.capacity))

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0


def kill_host(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the runner and everything it started (shims run in their own
    sessions, agents under them), as when the machine loses power."""
    tree = [proc.pid]
    try:
        tree += [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    return tree


def peak_open_runs_per_host(db) -> dict[str, int]:
    """The most runs each host had open at once, walking the event log in id order:
    +1 at ``claimed`` (its lock names the host), -1 at an event that closes that run."""
    with db.read() as conn:
        events = conn.execute(select(task_events.c.kind, task_events.c.run_id, task_events.c.payload)
                              .order_by(task_events.c.id)).all()
    host_of: dict[int, str] = {}
    level: dict[str, int] = {}
    peak: dict[str, int] = {}
    for kind, run_id, payload in events:
        if kind == "claimed":
            host = model.host_of_lock(json.loads(payload)["lock"])
            host_of[run_id] = host
            level[host] = level.get(host, 0) + 1
            peak[host] = max(peak.get(host, 0), level[host])
        elif kind in CLOSING and run_id in host_of:
            level[host_of[run_id]] -= 1
    return peak


@dataclass
class SprintResult:
    task_ids: list[str]
    runs: list[Any]                  # rows: id, task_id, outcome, ended_at, claim_lock, error
    statuses: set[str]
    open_on_dead_host: list[int]     # gb10-a's runs open when it was killed
    killed: list[int]                # the pids killed with it
    done_at_restart: int
    peaks: dict[str, int]
    exit_codes: dict[str, int]       # the surviving runners' exits on SIGTERM
    elapsed: float
    utilization: float
    samples: int
    runner_output: dict[str, str] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.task_ids) / self.elapsed


def run_sprint(tasks: int, pg_url: str, cluster: list[str], workdir: Path) -> SprintResult:
    """Run the scenario on the empty PostgreSQL database ``pg_url``, files under
    ``workdir``. Raises TimeoutError/RuntimeError if the sprint does not finish."""
    env = {"SPARKOPS_STORAGE_BOARD_URL": pg_url, "SPARKOPS_STORAGE_OPS_URL": pg_url}
    store = open_store(load_settings(env=env, cwd=workdir), create=True)
    procs: dict[str, subprocess.Popen] = {}
    try:
        ids = [board.create_task(store.board, f"fleet task {n}", body="Write a haiku about queues.")
               for n in range(tasks)]

        def done() -> int:
            try:
                return queries.board_stats(store.board)["by_status"].get("done", 0)
            except DBAPIError:  # the server is restarting
                return -1

        for name, capacity in HOSTS.items():
            home = workdir / name
            home.mkdir()
            with open(home / "runner.out", "wb") as out:
                procs[name] = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=home,
                                               env=runner_env(name, capacity, pg_url, home),
                                               stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        budget = 120 + tasks * 1.5
        occupancy = Occupancy(store.board, sum(HOSTS.values()))
        threading.Thread(target=occupancy.loop, name="occupancy", daemon=True).start()

        # 1. one host dies with its runs open
        # the runs are read in the same poll that decides to kill: a run seen open by
        # one read may have ended by the next (the demo agent is quick)
        def open_on(host: str) -> list[int]:
            return [r["id"] for r in queries.list_runs(store.board, active_only=True, limit=100)
                    if model.host_of_lock(r["claim_lock"]) == host]
        open_on_a = wait_for(lambda: done() >= tasks // 4 and open_on("gb10-a"),
                             "a quarter of the tasks done, with gb10-a busy", timeout=budget)
        killed = kill_host(procs.pop("gb10-a"))
        occupancy.capacity -= HOSTS["gb10-a"]

        # 2. the database restarts under the two that are left
        wait_for(lambda: done() >= tasks // 2, "half of the tasks done", timeout=budget)
        restart_postgres(cluster)
        done_at_restart = done()

        # 3. they finish the sprint by themselves
        try:
            wait_for(lambda: done() == tasks, f"all {tasks} tasks done", timeout=budget, proc=procs["gb10-b"])
        except (TimeoutError, RuntimeError):
            stuck = [(t["id"], t["status"], t["current_run_id"], t["last_failure_error"])
                     for t in queries.list_tasks(store.board) if t["status"] != "done"]
            print("not done:", stuck[:20], file=sys.stderr)
            print("open runs:", queries.list_runs(store.board, active_only=True, limit=20), file=sys.stderr)
            raise
        elapsed = time.monotonic() - started
        occupancy.stop.set()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        exit_codes = {name: proc.wait(timeout=60) for name, proc in procs.items()}

        with store.board.read() as conn:
            runs = conn.execute(select(task_runs.c.id, task_runs.c.task_id, task_runs.c.outcome,
                                       task_runs.c.ended_at, task_runs.c.claim_lock, task_runs.c.error)).all()
        return SprintResult(
            task_ids=ids, runs=runs, statuses={t["status"] for t in queries.list_tasks(store.board)},
            open_on_dead_host=open_on_a, killed=killed, done_at_restart=done_at_restart,
            peaks=peak_open_runs_per_host(store.board), exit_codes=exit_codes, elapsed=elapsed,
            utilization=occupancy.mean(), samples=len(occupancy.samples),
            runner_output={name: (workdir / name / "runner.out").read_text(errors="replace")
                           for name in procs})
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                kill_host(proc)
        store.dispose()


def violations(result: SprintResult) -> list[str]:
    """Every invariant of the sprint that does not hold, in words (empty: all hold)."""
    found = []
    completed = [r.task_id for r in result.runs if r.outcome == "completed"]
    if sorted(completed) != sorted(result.task_ids):
        found.append("a task completed twice or not at all")
    if any(r.ended_at is None for r in result.runs):
        found.append("a run was left open")
    if result.statuses != {"done"}:
        found.append(f"task statuses at the end: {sorted(result.statuses)}")
    if not result.open_on_dead_host or len(result.killed) <= 1:
        found.append("gb10-a was not killed with runs open")
    by_id = {r.id: r for r in result.runs}
    for run_id in result.open_on_dead_host:
        run = by_id[run_id]
        if run.outcome not in ("crashed", "completed") or (
                run.outcome == "crashed" and not (run.error or "").startswith(DEAD_HOST_REASON)):
            found.append(f"gb10-a's run {run_id} ended {run.outcome}: {run.error}")
    lost = [r for r in result.runs if r.outcome != "completed"
            and not (r.error or "").startswith(DEAD_HOST_REASON)]
    if lost:
        found.append(f"runs that failed for another reason than gb10-a's death: {lost}")
    if any(result.peaks[h] > HOSTS[h] for h in result.peaks) or set(result.peaks) != set(HOSTS):
        found.append(f"open runs per host at the busiest {result.peaks}, capacities {HOSTS}")
    if result.done_at_restart >= len(result.task_ids):
        found.append("the sprint was over before the database restarted")
    for name, code in result.exit_codes.items():
        if code != 0:
            found.append(f"{name}'s runner exited {code} on SIGTERM:\n{result.runner_output[name][-2000:]}")
    return found


def summary(result: SprintResult) -> str:
    crashed = sum(1 for r in result.runs if r.outcome == "crashed")
    return (f"{len(result.task_ids)} tasks on 3 hosts in {result.elapsed:.0f} s "
            f"({result.rate:.2f} tasks/s); {len(result.runs)} runs, {crashed} crashed (gb10-a killed "
            f"with {len(result.open_on_dead_host)} open); peaks {result.peaks}; {result.done_at_restart} "
            f"done at the database restart; slots of the live hosts busy {result.utilization:.1%} "
            f"of the time ({result.samples} samples)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pg", default=os.environ.get(
        "SPARKOPS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"),
        help="a maintenance database URL; the benchmark creates and drops its own database")
    args = parser.parse_args()
    cluster = pg_cluster()
    if cluster is None:
        print("bench_fleet needs a local PostgreSQL it may restart (pg_ctlcluster, as root)", file=sys.stderr)
        return 2
    name = f"sparkops_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"{args.pg.rsplit('/', 1)[0]}/{name}".replace("postgresql+psycopg://", "postgresql://")
    try:
        with tempfile.TemporaryDirectory(prefix="sparkops-fleet-") as tmp:
            result = run_sprint(args.tasks, url, cluster, Path(tmp))
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(summary(result))
    for run in result.runs:
        if run.outcome != "completed":
            print(f"run {run.id} of {run.task_id} on {model.host_of_lock(run.claim_lock)}: "
                  f"{run.outcome}: {run.error}")
    problems = violations(result)
    for problem in problems:
        print("VIOLATION:", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
