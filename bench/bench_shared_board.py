"""Benchmarks of a board that Hermes writes too, with a real jobs_runner.py.

    .venv/bin/python bench/bench_shared_board.py soak [--minutes 10] [--capacity 2]
    .venv/bin/python bench/bench_shared_board.py hermes-idle [--seconds 60]

* soak: the runner (native mode, the demo agent working 1-4 s per task) while a
  bounded loop of the real ``hermes kanban`` CLI creates, blocks, unblocks,
  completes and reclaims tasks at random. Live agents are sampled from /proc every
  50 ms. At the end: one completed run per done task, no two runs of a task
  overlapping, no open run without a live agent, every running task's current run
  open and no other run open, never more live agents than the capacity, and no
  run booked ``crashed`` (the demo agent does not fail here: a crash would be an
  agent stopped by Hermes booked as a failure).
* hermes-idle: the runner in ``dispatch.mode = hermes`` on a board with nothing to
  do: the CPU the runner and the ``hermes`` processes it starts use (the runner's
  own and its reaped children's CPU time), over the given seconds.

Needs the real hermes CLI (``.venv-hermes/bin/hermes``, as ``scripts/test`` installs
it). Everything runs in a temporary directory; nothing is left behind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil
from sqlalchemy import select

from sparkops.config import load_settings
from sparkops.core import procs
from sparkops.core.procs import RunIdentity
from sparkops.storage.schema import task_runs, tasks
from sparkops.storage.store import open_store

PY = sys.executable
HERMES = Path(os.environ.get("SPARKOPS_TEST_HERMES", ROOT / ".venv-hermes" / "bin" / "hermes"))
DEMO_AGENT = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "1", "--max-seconds", "4"]
NO_SERVICES = {n: {"enabled": False} for n in ("vllm", "gateway", "redis", "tunnel")}


class Box:
    """A temporary board, a runner, and both CLIs."""

    def __init__(self, **settings: object):
        self.dir = Path(tempfile.mkdtemp(prefix="sparkops-shared-"))
        self.board_file = self.dir / "data" / "kanban.db"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{self.board_file}",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{self.dir}/data/sparkops.db",
            "SPARKOPS_RUNNER_LOG_FILE": str(self.dir / "runner.log"),
            "SPARKOPS_SERVICES": json.dumps(NO_SERVICES),
        })
        for key, value in settings.items():
            self.env["SPARKOPS_" + key.upper()] = json.dumps(value) if isinstance(value, list) else str(value)
        self.hermes_env = {k: v for k, v in self.env.items() if not k.startswith("SPARKOPS_")}
        self.hermes_env.update(HERMES_KANBAN_DB=str(self.board_file), HOME=str(self.dir / "home"),
                               HERMES_HOME=str(self.dir / "home" / ".hermes"))
        self.settings = load_settings(env=self.env, cwd=self.dir)
        self.store = open_store(self.settings, create=True)
        self.runner: subprocess.Popen | None = None

    def start_runner(self) -> None:
        self.env["PATH"] = f"{HERMES.parent}{os.pathsep}{self.env.get('PATH', '')}"
        self.runner = subprocess.Popen([PY, str(ROOT / "jobs_runner.py")], cwd=self.dir, env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def hermes(self, *args: str) -> str:
        done = subprocess.run([str(HERMES), "kanban", *args], env=self.hermes_env, capture_output=True,
                              text=True, timeout=120, cwd=self.dir)
        return done.stdout + done.stderr

    def tasks_by_status(self) -> dict[str, list[str]]:
        with self.store.board.read() as conn:
            rows = conn.execute(select(tasks.c.id, tasks.c.status)).all()
        found: dict[str, list[str]] = {}
        for task_id, status in rows:
            found.setdefault(status, []).append(task_id)
        return found

    def close(self) -> None:
        if self.runner is not None and self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)
            self.runner.wait(timeout=30)
        for proc in psutil.process_iter(["pid", "environ"]):
            try:
                if (proc.info["environ"] or {}).get("SPARKOPS_STORAGE_BOARD_URL") == \
                        self.env["SPARKOPS_STORAGE_BOARD_URL"] and proc.pid != os.getpid():
                    proc.kill()
            except psutil.Error:
                pass
        self.store.dispose()
        shutil.rmtree(self.dir, ignore_errors=True)


class Census(threading.Thread):
    """Live demo agents of this box, from /proc every 50 ms."""

    def __init__(self, board_url: str):
        super().__init__(name="census", daemon=True)
        self.board_url = board_url
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.05):
            live = 0
            for proc in psutil.process_iter(["cmdline", "status", "environ"]):
                cmd = proc.info["cmdline"] or []
                if "demo-agent" in cmd and proc.info["status"] != psutil.STATUS_ZOMBIE and \
                        (proc.info["environ"] or {}).get("SPARKOPS_STORAGE_BOARD_URL") == self.board_url:
                    live += 1
            self.peak = max(self.peak, live)
            self.samples += 1


# -- soak ------------------------------------------------------------------------------------


def soak(minutes: float, capacity: int, seed: int) -> dict:
    rng = random.Random(seed)
    box = Box(dispatch_agent_argv=DEMO_AGENT, dispatch_max_in_progress=capacity,
              dispatch_heartbeat_seconds=1, reclaim_interval_seconds=5, reclaim_term_grace_seconds=3)
    census = Census(box.env["SPARKOPS_STORAGE_BOARD_URL"])
    done_cmds: Counter[str] = Counter()
    try:
        for n in range(2 * capacity):
            box.hermes("create", f"seed task {n}", "--body", "Write a haiku about queues.")
        box.start_runner()
        census.start()
        deadline = time.monotonic() + minutes * 60
        while time.monotonic() < deadline:
            by_status = box.tasks_by_status()
            verb = rng.choice(["create", "create", "block", "unblock", "complete", "reclaim"])
            pool = {"block": by_status.get("running", []) + by_status.get("ready", []),
                    "unblock": by_status.get("blocked", []),
                    "complete": by_status.get("running", []),
                    "reclaim": by_status.get("running", [])}.get(verb)
            if verb == "create":
                box.hermes("create", f"task {done_cmds['create']}", "--body", "Write a haiku about queues.")
            elif pool:
                target = rng.choice(pool)
                args = {"block": ["block", target, "soak", "says", "stop"], "unblock": ["unblock", target],
                        "complete": ["complete", target, "--result", "by the soak"],
                        "reclaim": ["reclaim", target, "--reason", "soak"]}[verb]
                box.hermes(*args)
            else:
                continue
            done_cmds[verb] += 1
            time.sleep(rng.uniform(0.2, 1.5))
        # the runner stops (its workers go on); give the shims a moment, then look
        box.runner.send_signal(signal.SIGTERM)
        box.runner.wait(timeout=60)
        time.sleep(3)
        census.halt.set()
        census.join(timeout=5)
        problems = check(box)
        with box.store.board.read() as conn:
            crashed = conn.execute(select(task_runs.c.id).where(task_runs.c.outcome == "crashed")).scalars().all()
        if crashed:  # the demo agent never fails here: a crash is a stop booked as a failure
            problems.append(f"{len(crashed)} run(s) booked crashed: {crashed[:10]}")
        by_status = {s: len(ids) for s, ids in box.tasks_by_status().items()}
        with box.store.board.read() as conn:
            runs = conn.execute(select(task_runs.c.outcome)).scalars().all()
        return {"minutes": minutes, "capacity": capacity, "commands": dict(done_cmds),
                "peak_live_agents": census.peak, "samples": census.samples, "tasks": by_status,
                "runs": dict(Counter(o or "open" for o in runs)), "problems": problems}
    finally:
        census.halt.set()
        box.close()


def check(box: Box) -> list[str]:
    """The soak's invariants, as problems in words (empty: all hold)."""
    with box.store.board.read() as conn:
        all_tasks = conn.execute(select(tasks.c.id, tasks.c.status, tasks.c.current_run_id)).all()
        all_runs = conn.execute(select(task_runs.c.id, task_runs.c.task_id, task_runs.c.started_at,
                                       task_runs.c.ended_at, task_runs.c.outcome, task_runs.c.metadata)
                                .order_by(task_runs.c.id)).all()
    problems = []
    runs_of: dict[str, list] = {}
    for run in all_runs:
        runs_of.setdefault(run.task_id, []).append(run)
    for task in all_tasks:
        runs = runs_of.get(task.id, [])
        completed = [r for r in runs if r.outcome == "completed"]
        if task.status == "done" and len(completed) != 1:
            problems.append(f"{task.id} is done with {len(completed)} completed runs")
        for earlier, later in zip(runs, runs[1:]):
            if earlier.ended_at is None or later.started_at < earlier.ended_at:
                problems.append(f"{task.id}: run {later.id} started before run {earlier.id} ended")
        open_runs = [r for r in runs if r.ended_at is None]
        if task.status == "running":
            if [r.id for r in open_runs] != [task.current_run_id]:
                problems.append(f"{task.id} is running with open runs {[r.id for r in open_runs]}, "
                                f"current {task.current_run_id}")
        elif open_runs:
            problems.append(f"{task.id} is {task.status} with open runs {[r.id for r in open_runs]}")
        for run in open_runs:
            meta = json.loads(run.metadata) if run.metadata else {}
            identity = RunIdentity.from_metadata(meta)
            if identity is None or not (procs.is_alive(identity.agent) or procs.is_alive(identity.shim)):
                problems.append(f"{task.id}: open run {run.id} has no live agent")
    return problems


# -- hermes mode, idle --------------------------------------------------------------------------


def hermes_idle(seconds: float) -> dict:
    box = Box(dispatch_mode="hermes",
              dispatch_hermes_argv=[str(HERMES), "kanban", "dispatch", "--max", "{max}", "--json"])
    try:
        for n in range(20):
            box.hermes("create", f"finished task {n}")
        for task_id in box.tasks_by_status().get("ready", []):
            box.hermes("complete", task_id, "--result", "done before the benchmark")
        box.start_runner()
        time.sleep(10)  # start-up, the first look and its hermes run
        proc = psutil.Process(box.runner.pid)
        before, t0 = proc.cpu_times(), time.monotonic()
        time.sleep(seconds)
        after, elapsed = proc.cpu_times(), time.monotonic() - t0
        own = (after.user + after.system) - (before.user + before.system)
        children = (after.children_user + after.children_system) - \
                   (before.children_user + before.children_system)
        return {"seconds": round(elapsed, 1), "runner_cpu_s": round(own, 3),
                "hermes_cpu_s": round(children, 3),
                "share_of_a_core": round((own + children) / elapsed, 5),
                "rss_mb": round(proc.memory_info().rss / 2**20, 1),
                "interval_s": box.settings["dispatch.hermes_interval_seconds"]}
    finally:
        box.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("soak")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--capacity", type=int, default=2)
    p.add_argument("--seed", type=int, default=12)
    p = sub.add_parser("hermes-idle")
    p.add_argument("--seconds", type=float, default=60)
    args = parser.parse_args()
    if not HERMES.is_file():
        print(f"needs the hermes CLI at {HERMES} (scripts/test installs it)", file=sys.stderr)
        return 2
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.platform()}")
    if args.what == "soak":
        result = soak(args.minutes, args.capacity, args.seed)
    else:
        result = hermes_idle(args.seconds)
    print(json.dumps(result, indent=2))
    return 1 if result.get("problems") or result.get("peak_live_agents", 0) > args.__dict__.get(
        "capacity", 1 << 30) else 0


if __name__ == "__main__":
    sys.exit(main())
