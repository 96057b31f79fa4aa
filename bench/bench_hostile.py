"""Benchmark: a demo sprint while another writer puts hostile rows into the board.

    .venv/bin/python bench/bench_hostile.py [--tasks 400] [--seed 7]

The same sprint runs twice on a real ``jobs_runner.py`` (native mode, 2 slots, the
demo agent working 1-3 s): once alone, once while a bounded loop (one write every
0.5 s) writes into the SQLite board, as a buggy tool or an attacker would:

* ready tasks with ids that are no plain ids (``../x``, an absolute path, a newline,
  a NUL, a backtick);
* tasks with text in integer and time columns (``'=1+2'``, ``'yesterday'``, ISO times);
* ``running`` tasks whose run names a *decoy* (a stranger process in its own
  session) as its agent, with the decoy's pid, start time, group and session
  (they are closed unsignalled, and then run as the ordinary tasks they are);
* the live runs of good tasks rewritten to name a decoy instead of their agent.

Checked: every good task done, each with exactly one completed run; every decoy
alive at the end (never signalled); both databases pass ``PRAGMA integrity_check``;
nothing made outside the data directory. Measured: the share of slot-time left idle
while good work was ready (sampled every 0.1 s), alone and under the loop, and their
ratio ("the runner's dispatch gaps unchanged").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_shared_board import Box
from sqlalchemy import func, select

from sparkops.board import runs
from sparkops.board import transitions as board
from sparkops.core import procs
from sparkops.storage.schema import task_runs, tasks

DEMO_AGENT = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "1", "--max-seconds", "3"]
CAPACITY = 2
ODD_IDS = ["../../../evil-{n}", "/tmp/sparkops-evil-{n}", "t_x {n}\nt_y", "t_nul\x00{n}", "t_`![x](http://127.0.0.1:9/{n}.png)`"]


class Sampler(threading.Thread):
    """Idle slots (this host's open runs short of the capacity; a slot working on a
    task the other writer added is busy, not a gap) while good work is ready, every
    0.1 s."""

    def __init__(self, box: Box, good: set[str]):
        super().__init__(name="sampler", daemon=True)
        self.box, self.good = box, good
        self.host = procs.host_name(box.settings["host.name"])
        self.idle: list[float] = []
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.wait(0.1):
            try:
                with self.box.store.board.read() as conn:
                    rows = conn.execute(select(tasks.c.id, tasks.c.status)
                                        .where(tasks.c.status.in_(["ready", "running"]))).all()
            except Exception:  # noqa: BLE001 - a locked moment: skip the sample
                continue
            ready = sum(1 for t, s in rows if s == "ready" and t in self.good)
            if not ready:
                continue
            try:
                running = runs.count_open_runs(self.box.store.board, self.host)
            except Exception:  # noqa: BLE001
                continue
            self.idle.append(max(0, CAPACITY - running) / CAPACITY)


class Hostile(threading.Thread):
    """The other writer: one hostile write every 0.5 s."""

    def __init__(self, box: Box, decoys: list[subprocess.Popen], seed: int):
        super().__init__(name="hostile", daemon=True)
        self.box, self.decoys, self.rng = box, decoys, random.Random(seed)
        self.halt = threading.Event()
        self.writes: dict[str, int] = {}
        self.n = 0

    def decoy_identity(self) -> dict:
        decoy = self.rng.choice(self.decoys)
        start = procs.start_of(decoy.pid)
        return {"host": procs.host_name(self.box.settings["host.name"]), "boot_id": procs.boot_id(),
                "shim": {"pid": 999_999, "start": 1.0, "pgid": 999_999, "sid": 999_999},
                "agent": {"pid": decoy.pid, "start": start, "pgid": decoy.pid, "sid": decoy.pid}}

    def run(self) -> None:
        while not self.halt.wait(0.5):
            self.n += 1
            kind = self.rng.choice(["odd id", "odd values", "forged run", "forged live run"])
            try:
                self.write(kind)
                self.writes[kind] = self.writes.get(kind, 0) + 1
            except sqlite3.Error:
                self.writes["refused by SQLite (locked)"] = self.writes.get("refused by SQLite (locked)", 0) + 1

    def write(self, kind: str) -> None:
        now = int(time.time())
        conn = sqlite3.connect(self.box.board_file, timeout=5)
        try:
            with conn:
                if kind == "odd id":
                    task_id = self.rng.choice(ODD_IDS).format(n=self.n)
                    conn.execute("INSERT OR IGNORE INTO tasks (id, title, status, priority, created_at, "
                                 "workspace_kind) VALUES (?, 'hostile id', 'ready', 9, ?, 'scratch')", (task_id, now))
                elif kind == "odd values":
                    conn.execute("INSERT INTO tasks (id, title, status, priority, created_at, workspace_kind, "
                                 "max_runtime_seconds) VALUES (?, '=HYPERLINK(\"x\")', ?, '=1+2', ?, 'scratch', "
                                 "'long')", (f"t_odd{self.n:05d}", self.rng.choice(["ready", "blocked", "done"]),
                                             self.rng.choice(["yesterday", "2026-12-01T10:00:00Z", "@SUM(1)"])))
                elif kind == "forged run":
                    task_id = f"t_frg{self.n:05d}"
                    conn.execute("INSERT INTO tasks (id, title, status, created_at, workspace_kind, claim_lock) "
                                 "VALUES (?, 'forged run', 'running', ?, 'scratch', ?)",
                                 (task_id, now, f"{procs.host_name(self.box.settings['host.name'])}:1"))
                    run_id = conn.execute(
                        "INSERT INTO task_runs (task_id, status, started_at, metadata, claim_lock) "
                        "VALUES (?, 'running', ?, ?, 'x:1')",
                        (task_id, now - 100_000, json.dumps({"process": self.decoy_identity()}))).lastrowid
                    conn.execute("UPDATE tasks SET current_run_id=? WHERE id=?", (run_id, task_id))
                else:
                    row = conn.execute("SELECT r.id FROM task_runs r JOIN tasks t ON t.current_run_id = r.id "
                                       "WHERE r.ended_at IS NULL AND t.title LIKE 'good %' "
                                       "ORDER BY random() LIMIT 1").fetchone()
                    if row:
                        conn.execute("UPDATE task_runs SET metadata=? WHERE id=?",
                                     (json.dumps({"process": self.decoy_identity()}), row[0]))
        finally:
            conn.close()


def sprint(n_tasks: int, hostile: bool, seed: int) -> dict:
    box = Box(dispatch_agent_argv=DEMO_AGENT, dispatch_max_in_progress=CAPACITY,
              reclaim_interval_seconds=5, reclaim_term_grace_seconds=3)
    decoys = [subprocess.Popen(["sleep", "3600"], start_new_session=True) for _ in range(4)]
    try:
        good = {board.create_task(box.store.board, f"good {n}", body="Write a haiku about queues.")
                for n in range(n_tasks)}
        sampler = Sampler(box, good)
        loop = Hostile(box, decoys, seed)
        box.start_runner()
        started = time.monotonic()
        sampler.start()
        if hostile:
            loop.start()
        deadline = started + 60 + n_tasks * 10
        while time.monotonic() < deadline:
            by_status = box.tasks_by_status()
            if set(by_status.get("done", [])) >= good:
                break
            time.sleep(1)
        elapsed = time.monotonic() - started
        loop.halt.set()
        sampler.halt.set()
        box.runner.send_signal(signal.SIGTERM)
        box.runner.wait(timeout=120)
        return {"hostile": hostile, "seconds": round(elapsed, 1), "writes": loop.writes,
                "idle_slot_share": round(sum(sampler.idle) / len(sampler.idle), 4) if sampler.idle else 0.0,
                "samples": len(sampler.idle), "problems": check(box, good, decoys)}
    finally:
        for decoy in decoys:
            if decoy.poll() is None:
                decoy.kill()
            decoy.wait()
        box.close()


def check(box: Box, good: set[str], decoys: list[subprocess.Popen]) -> list[str]:
    problems = []
    with box.store.board.read() as conn:
        statuses = dict(conn.execute(select(tasks.c.id, tasks.c.status).where(tasks.c.id.in_(good))).all())
        completed = dict(conn.execute(select(task_runs.c.task_id, func.count())
                                      .where(task_runs.c.outcome == "completed", task_runs.c.task_id.in_(good))
                                      .group_by(task_runs.c.task_id)).all())
    not_done = [t for t in good if statuses.get(t) != "done"]
    if not_done:
        problems.append(f"{len(not_done)} good task(s) not done: {not_done[:5]}")
    twice = [t for t in good if completed.get(t, 0) != 1]
    if twice:
        problems.append(f"{len(twice)} good task(s) without exactly one completed run: {twice[:5]}")
    dead = [d.pid for d in decoys if d.poll() is not None]
    if dead:
        problems.append(f"decoy process(es) {dead} were signalled")
    for name in ("kanban.db", "sparkops.db"):
        conn = sqlite3.connect(f"file:{box.dir / 'data' / name}?mode=ro", uri=True)
        try:
            verdict = conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()
        if verdict != "ok":
            problems.append(f"{name}: integrity_check says {verdict}")
    strays = [p for p in (Path("/tmp").glob("sparkops-evil-*"))] + list(box.dir.parent.glob("evil-*"))
    if strays:
        problems.append(f"made outside the data directory: {strays[:5]}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.platform()}")
    alone = sprint(args.tasks, hostile=False, seed=args.seed)
    print(json.dumps(alone, indent=2), flush=True)
    under = sprint(args.tasks, hostile=True, seed=args.seed)
    print(json.dumps(under, indent=2))
    ratio = under["idle_slot_share"] / alone["idle_slot_share"] if alone["idle_slot_share"] else None
    print(f"idle slot share: alone {alone['idle_slot_share']:.2%}, under the hostile loop "
          f"{under['idle_slot_share']:.2%}, ratio {ratio:.2f}" if ratio is not None else "no idle time alone")
    return 1 if alone["problems"] or under["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
