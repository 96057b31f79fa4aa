"""Benchmark: the state machine's cost per transition on SQLite and PostgreSQL.

One process creates N tasks, then claims and completes each (a claim opens a run
and appends an event; a complete closes the run, appends an event and looks for
children to promote). Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_board.py [--tasks 2000] [--pg postgresql://postgres@127.0.0.1/postgres]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import create_engine, text

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.config import load_settings
from sparkops.storage.store import open_store


def measure(board_url: str, ops_url: str, n: int) -> dict[str, float]:
    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": board_url,
                                  "SPARKOPS_STORAGE_OPS_URL": ops_url})
    store = open_store(settings, create=True)
    timings: dict[str, list[float]] = {"create": [], "claim": [], "complete": [], "list": []}
    ids = []
    for i in range(n):
        t0 = time.perf_counter()
        ids.append(board.create_task(store.board, f"task {i}", priority=i % 5))
        timings["create"].append(time.perf_counter() - t0)
    for task_id in ids:
        t0 = time.perf_counter()
        run = board.claim(store.board, task_id, lock="bench:1").run_id
        t1 = time.perf_counter()
        board.complete(store.board, task_id, run_id=run, result="ok")
        t2 = time.perf_counter()
        timings["claim"].append(t1 - t0)
        timings["complete"].append(t2 - t1)
    for _ in range(20):
        t0 = time.perf_counter()
        queries.list_tasks(store.board, include_archived=True)
        timings["list"].append(time.perf_counter() - t0)
    store.dispose()
    out = {}
    for name, values in timings.items():
        values.sort()
        out[f"{name}_p50_ms"] = statistics.median(values) * 1000
        out[f"{name}_p99_ms"] = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
    out["claim_complete_per_s"] = n / (sum(timings["claim"]) + sum(timings["complete"]))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="maintenance database URL; a scratch database is created and dropped")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results["SQLite (file, WAL)"] = measure(f"sqlite:///{tmp}/kanban.db",
                                                f"sqlite:///{tmp}/sparkops.db", args.tasks)
    admin = create_engine(args.pg.replace("postgresql://", "postgresql+psycopg://"),
                          isolation_level="AUTOCOMMIT")
    name = f"sparkops_bench_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = args.pg.rsplit("/", 1)[0] + "/" + name
        results["PostgreSQL (loopback)"] = measure(url, url, args.tasks)
    except Exception as exc:  # noqa: BLE001 - report and go on with SQLite only
        print(f"PostgreSQL skipped: {str(exc).splitlines()[0]}", file=sys.stderr)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()

    print(f"Machine: {platform.machine()}, {platform.processor() or 'cpu'}, Python "
          f"{platform.python_version()}, {args.tasks} tasks, one process\n")
    print("| backend | create p50 / p99 ms | claim p50 / p99 ms | complete p50 / p99 ms "
          "| claim+complete per s | list all p50 ms |")
    print("|---|---|---|---|---|---|")
    for backend, r in results.items():
        print(f"| {backend} | {r['create_p50_ms']:.2f} / {r['create_p99_ms']:.2f} "
              f"| {r['claim_p50_ms']:.2f} / {r['claim_p99_ms']:.2f} "
              f"| {r['complete_p50_ms']:.2f} / {r['complete_p99_ms']:.2f} "
              f"| {r['claim_complete_per_s']:.0f} | {r['list_p50_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
