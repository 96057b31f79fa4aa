"""Benchmarks of the engine, on a real jobs_runner.py, real shims and real agents.

    .venv/bin/python bench/bench_engine.py [latency] [recovery] [sprint] [footprint]

* latency:   ready -> agent started, over 50 tasks arriving at random moments;
* recovery:  agent killed (kill -9 of its process group) -> the same task running
             again in a new agent, over 20 kills;
* sprint:    100 tasks on 4 slots, agents of 5-15 s, 10% crash, 5% hang past a max
             runtime of 30 s; once with SparkOps' defaults, once with dispatch and
             reclaim on fixed ticks only (the seed's 120 s and 180 s scaled by
             10 s / 20 min = 1/120: 1.0 s and 1.5 s, no dispatch when a worker ends);
* footprint: the runner idle on an empty board for 60 s: CPU and RSS.

Prints markdown for docs/benchmarks.md. Everything runs in a temporary directory
on loopback; nothing is left behind.
"""

from __future__ import annotations

import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.config import load_settings
from sparkops.storage.store import open_store

PY = sys.executable

# An agent that notes when it started (and its process group), then completes
# at once, or, with HANG set, waits to be killed on its first attempt.
MARKER_AGENT = r"""
import os, sys, time, json
start = time.time()
ws = os.environ["SPARKOPS_WORKSPACE"]
run = int(os.environ["SPARKOPS_RUN_ID"])
with open(os.path.join(ws, f"started-{run}"), "w") as fh:
    json.dump({"t": start, "pgid": os.getpgid(0)}, fh)
first = not os.path.exists(os.path.join(ws, "attempted"))
open(os.path.join(ws, "attempted"), "a").close()
if os.environ.get("HANG") and first:
    while True:
        time.sleep(60)
sys.path.insert(0, os.environ["BENCH_ROOT"])
from sparkops.board import transitions as board
from sparkops.storage.db import Database
db = Database(os.environ["SPARKOPS_STORAGE_BOARD_URL"], role="board")
board.complete(db, os.environ["SPARKOPS_TASK_ID"], run_id=run, result="ok")
"""
# as an argv template element: braces doubled so {placeholders} are not looked for
MARKER_ARGV = [PY, "-c", MARKER_AGENT.replace("{", "{{").replace("}", "}}")]


class Sandbox:
    """A temporary SparkOps installation with its own databases and a runner."""

    def __init__(self, **settings: object):
        self.dir = Path(tempfile.mkdtemp(prefix="sparkops-bench-"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
        self.env.update({
            "PYTHONPATH": str(ROOT), "BENCH_ROOT": str(ROOT),
            # the agents read these (an agent gets only what it is given: dispatch.agent_env_pass)
            "SPARKOPS_DISPATCH_AGENT_ENV_PASS": json.dumps(["BENCH_ROOT", "HANG"]),
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{self.dir}/data/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{self.dir}/data/sparkops.db",
            "SPARKOPS_RUNNER_LOG_FILE": str(self.dir / "runner.log"),
        })
        for key, value in settings.items():
            name = "SPARKOPS_" + key.upper()
            self.env[name] = json.dumps(value) if isinstance(value, list) else str(value)
        self.settings = load_settings(env=self.env, cwd=self.dir)
        self.store = open_store(self.settings, create=True)
        self.runner: subprocess.Popen | None = None

    def start_runner(self) -> None:
        self.runner = subprocess.Popen([PY, str(ROOT / "jobs_runner.py")], cwd=self.dir, env=self.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def workspace(self, task_id: str) -> Path:
        return self.dir / "data" / "workspaces" / task_id

    def close(self) -> None:
        if self.runner and self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)
            self.runner.wait(timeout=30)
        # stop any worker still running (hung agents of the sprint)
        for proc in psutil.process_iter(["pid", "environ"]):
            try:
                if (proc.info["environ"] or {}).get("SPARKOPS_STORAGE_BOARD_URL") == \
                        self.env["SPARKOPS_STORAGE_BOARD_URL"] and proc.pid != os.getpid():
                    proc.kill()
            except psutil.Error:
                pass
        self.store.dispose()
        subprocess.run(["rm", "-rf", str(self.dir)], check=False)


def wait_for(predicate, timeout: float, poll: float = 0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError("benchmark step timed out")


def started(box: Sandbox, task_id: str, run: int | None = None):
    ws = box.workspace(task_id)
    if not ws.exists():
        return None
    for path in sorted(ws.glob("started-*")):
        if run is None or path.name == f"started-{run}":
            try:
                return int(path.name.split("-")[1]), json.loads(path.read_text())
            except ValueError:
                return None  # being written
    return None


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# -- latency ------------------------------------------------------------------------------


def bench_latency(n: int = 50) -> dict:
    box = Sandbox(dispatch_agent_argv=MARKER_ARGV)
    try:
        box.start_runner()
        time.sleep(2)  # runner up and idle
        rng = random.Random(1)
        latencies = []
        for i in range(n):
            time.sleep(rng.uniform(0, 1))  # arrivals at random phases of the 1 s tick
            t0 = time.time()
            task = board.create_task(box.store.board, f"latency {i}")
            _, info = wait_for(lambda: started(box, task), 30)
            latencies.append(info["t"] - t0)
            wait_for(lambda: queries.get_task(box.store.board, task)["status"] == "done", 30)
        return {"n": n, "median": statistics.median(latencies), "p90": pct(latencies, 0.9),
                "max": max(latencies)}
    finally:
        box.close()


# -- recovery -----------------------------------------------------------------------------


def bench_recovery(n: int = 20) -> dict:
    box = Sandbox(dispatch_agent_argv=MARKER_ARGV, dispatch_failure_limit=5)
    box.env["HANG"] = "1"
    try:
        box.start_runner()
        time.sleep(2)
        times = []
        for i in range(n):
            task = board.create_task(box.store.board, f"recovery {i}")
            run, info = wait_for(lambda: started(box, task), 30)
            time.sleep(0.2)
            t0 = time.time()
            os.killpg(info["pgid"], signal.SIGKILL)
            _, again = wait_for(lambda: started(box, task, run + 1) or None, 60)
            times.append(again["t"] - t0)
            wait_for(lambda: queries.get_task(box.store.board, task)["status"] == "done", 30)
        return {"n": n, "median": statistics.median(times), "p90": pct(times, 0.9), "max": max(times)}
    finally:
        box.close()


# -- the sprint ---------------------------------------------------------------------------


def bench_sprint(fixed_ticks: bool, tasks: int = 100, slots: int = 4) -> dict:
    timings = Path(tempfile.mkdtemp(prefix="sparkops-timings-")) / "timings.jsonl"
    agent = [PY, str(ROOT / "bench" / "sprint_agent.py"), str(timings), "5", "15", "0.1", "0.05"]
    settings: dict[str, object] = {
        "dispatch_agent_argv": agent, "dispatch_max_in_progress": slots,
        "reclaim_max_runtime_seconds": 30, "dispatch_failure_limit": 3,
    }
    if fixed_ticks:
        settings.update(dispatch_interval_seconds=120 / 120, reclaim_interval_seconds=180 / 120,
                        dispatch_wake_on_worker_exit="false")
    box = Sandbox(**settings)
    try:
        ids = [board.create_task(box.store.board, f"sprint task {i}") for i in range(tasks)]
        t0 = time.time()
        box.start_runner()

        def finished() -> bool:
            stats = queries.board_stats(box.store.board)["by_status"]
            return stats.get("done", 0) + stats.get("blocked", 0) == tasks

        wait_for(finished, 3600, poll=0.5)
        t_end = time.time()
        rows = [json.loads(line) for line in timings.read_text().splitlines()]
        return sprint_metrics(rows, t0, t_end, slots, box, ids)
    finally:
        box.close()


def sprint_metrics(rows: list[dict], t0: float, t_end: float, slots: int, box: Sandbox,
                   ids: list[str]) -> dict:
    runs = sorted(rows, key=lambda r: r["start"])
    agent_seconds = sum(r["end"] - r["start"] for r in runs)
    last_start = max(r["start"] for r in runs)
    makespan = max(r["end"] for r in runs) - t0

    # slot utilization while work waits: busy slot-time / capacity, from the first
    # start to the last start (after it, nothing was left to start)
    window_start = min(r["start"] for r in runs)
    busy = sum(max(0.0, min(r["end"], last_start) - max(r["start"], window_start)) for r in runs)
    utilization = busy / (slots * (last_start - window_start))

    # gap between a slot freeing and the next agent starting (while work remained)
    ends = sorted(r["end"] for r in runs if r["end"] < last_start)
    starts = sorted(r["start"] for r in runs if r["start"] > window_start + 1e-9)
    gaps, j = [], 0
    for end in ends:
        while j < len(starts) and starts[j] < end:
            j += 1
        if j < len(starts):
            gaps.append(starts[j] - end)
            j += 1
    statuses = {t: queries.get_task(box.store.board, t)["status"] for t in ids}
    return {
        "runs": len(runs), "done": sum(s == "done" for s in statuses.values()),
        "blocked": sum(s == "blocked" for s in statuses.values()),
        "crashed": sum(r["result"] == "crashed" for r in runs),
        "hung": sum(r["result"] == "terminated" for r in runs),
        "agent_seconds": agent_seconds, "ideal": agent_seconds / slots, "makespan": makespan,
        "ratio": makespan / (agent_seconds / slots), "utilization": utilization,
        "gap_mean": statistics.mean(gaps) if gaps else 0.0, "gap_p90": pct(gaps, 0.9) if gaps else 0.0,
    }


# -- footprint ----------------------------------------------------------------------------


def bench_footprint(seconds: float = 60) -> dict:
    box = Sandbox(dispatch_agent_argv=MARKER_ARGV)
    try:
        box.start_runner()
        time.sleep(5)  # start-up done
        proc = psutil.Process(box.runner.pid)
        before = proc.cpu_times()
        time.sleep(seconds)
        after = proc.cpu_times()
        cpu = (after.user + after.system - before.user - before.system) / seconds
        return {"cpu_percent": cpu * 100, "rss_mb": proc.memory_info().rss / 2**20, "seconds": seconds}
    finally:
        box.close()


def main(argv: list[str]) -> int:
    which = argv or ["latency", "recovery", "sprint", "footprint"]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 2**30:.0f} GiB, Python {platform.python_version()}\n")
    if "latency" in which:
        r = bench_latency()
        print(f"Dispatch latency, ready -> agent started, {r['n']} tasks: median {r['median']:.2f} s, "
              f"p90 {r['p90']:.2f} s, max {r['max']:.2f} s")
    if "recovery" in which:
        r = bench_recovery()
        print(f"Recovery, agent killed -> running again, {r['n']} kills: median {r['median']:.2f} s, "
              f"p90 {r['p90']:.2f} s, max {r['max']:.2f} s")
    if "sprint" in which:
        results = {"SparkOps (1 s ticks + dispatch on worker exit)": bench_sprint(False),
                   "fixed ticks (1.0 s dispatch, 1.5 s reclaim)": bench_sprint(True)}
        print("\n| sprint of 100 tasks, 4 slots | runs | done/blocked | crashed/hung | agent-s "
              "| ideal s | makespan s | makespan/ideal | utilization | gap mean / p90 s |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in results.items():
            print(f"| {name} | {r['runs']} | {r['done']}/{r['blocked']} | {r['crashed']}/{r['hung']} "
                  f"| {r['agent_seconds']:.0f} | {r['ideal']:.1f} | {r['makespan']:.1f} "
                  f"| {r['ratio']:.3f} | {r['utilization'] * 100:.1f}% "
                  f"| {r['gap_mean']:.2f} / {r['gap_p90']:.2f} |")
    if "footprint" in which:
        r = bench_footprint()
        print(f"\nRunner idle for {r['seconds']:.0f} s: CPU {r['cpu_percent']:.2f}% of a core, "
              f"RSS {r['rss_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
