"""Generate a large board for the review and export benchmarks.

    .venv/bin/python bench/gen_board.py DIR [--tasks 100000] [--runs 300000] [--events 1000000]

Writes DIR/data/kanban.db (and an empty DIR/data/sparkops.db) through SparkOps'
own schema: tasks over 30 days in 5 phases ([P1]..[P5] title tags) with realistic
statuses, assignees and dependencies, runs with the usual outcomes, and events.
Deterministic (seeded). Prints what it made and how long it took.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import insert

from sparkops.config import load_settings
from sparkops.storage.schema import task_events, task_links, task_runs, tasks
from sparkops.storage.store import open_store

NOW = 1_795_000_000
DAY = 86_400
ASSIGNEES = ["builder", "tester", "integrator", "reviewer", None]
OUTCOMES = ["completed"] * 70 + ["crashed"] * 12 + ["timed_out"] * 4 + ["blocked"] * 5 + \
    ["reclaimed"] * 4 + ["protocol_violation"] * 3 + ["rate_limited"] * 2
BATCH = 20_000


def generate(directory: Path, n_tasks: int, n_runs: int, n_events: int, seed: int = 7) -> dict:
    rng = random.Random(seed)
    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{directory}/data/kanban.db",
                                  "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{directory}/data/sparkops.db"},
                             cwd=directory)
    store = open_store(settings, create=True, now=NOW)
    db = store.board
    started = time.perf_counter()
    task_rows, ids = [], []
    for i in range(n_tasks):
        phase = 1 + i * 5 // n_tasks
        created = NOW - 30 * DAY + int(i * (29 * DAY) / n_tasks) + rng.randrange(600)
        done = rng.random() < 0.6 + 0.1 * (5 - phase)
        status = "done" if done else rng.choice(["ready", "todo", "todo", "blocked", "running", "archived"])
        start = created + rng.randrange(60, 4 * 3600) if status in ("done", "running", "blocked") else None
        completed = start + rng.randrange(120, 6 * 3600) if status == "done" else None
        task_id = f"t_{i:08x}"
        ids.append(task_id)
        task_rows.append({
            "id": task_id, "title": f"[P{phase}] generated task {i}: refactor module {i % 97}",
            "body": "Generated for the benchmark.", "assignee": rng.choice(ASSIGNEES), "status": status,
            "priority": rng.randrange(4), "created_by": "bench", "created_at": created,
            "started_at": start, "completed_at": min(completed, NOW) if completed else None,
            "workspace_kind": "scratch", "consecutive_failures": rng.choice([0, 0, 0, 1, 2]),
            "last_failure_error": "crash: simulated" if status == "blocked" else None,
        })
    link_rows = [{"parent_id": ids[i - 1 - rng.randrange(min(i, 50))], "child_id": ids[i]}
                 for i in range(1, n_tasks) if rng.random() < 0.3]
    link_rows = list({(r["parent_id"], r["child_id"]): r for r in link_rows}.values())
    run_rows = []
    for _ in range(n_runs):
        task = task_rows[rng.randrange(n_tasks)]
        begin = (task["started_at"] or task["created_at"]) + rng.randrange(0, 3600)
        outcome = rng.choice(OUTCOMES)
        run_rows.append({"task_id": task["id"], "profile": task["assignee"], "status": outcome,
                         "started_at": begin, "ended_at": min(begin + rng.randrange(60, 7200), NOW),
                         "outcome": outcome, "summary": "generated", "error": None if outcome == "completed"
                         else f"{outcome}: simulated"})
    kinds = ["created", "claimed", "completed", "crashed", "blocked", "promoted", "commented", "unblocked"]
    event_rows = [{"task_id": ids[rng.randrange(n_tasks)], "run_id": None, "kind": rng.choice(kinds),
                   "payload": json.dumps({"reason": "generated"}), "created_at": NOW - rng.randrange(30 * DAY)}
                  for _ in range(n_events)]
    for table, rows in ((tasks, task_rows), (task_links, link_rows), (task_runs, run_rows),
                        (task_events, event_rows)):
        for i in range(0, len(rows), BATCH):
            with db.write() as conn:
                conn.execute(insert(table), rows[i:i + BATCH])
    store.dispose()
    return {"tasks": n_tasks, "links": len(link_rows), "runs": n_runs, "events": n_events,
            "seconds": time.perf_counter() - started, "now": NOW}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", type=Path)
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=300_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    args = parser.parse_args()
    made = generate(args.dir, args.tasks, args.runs, args.events)
    print(json.dumps(made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
