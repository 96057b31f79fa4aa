"""Benchmark: the dispatcher's claim (``board.claim_next``) with 1, 4 and 8
dispatchers at once, on SQLite and on PostgreSQL.

N ready tasks; K processes, each a dispatcher of its own host (as on a fleet),
loop ``claim_next`` then ``complete`` until nothing is left. Measured: every
claim_next call's latency (p50, p99) and the claims per second of all K together
(wall clock from the start barrier to the last claim). Checked: every task claimed
exactly once.

    .venv/bin/python bench/bench_claims.py [--tasks 2000] [--dispatchers 1,4,8] [--pg URL] [--write-docs]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, func, select, text

from sparkops.board import transitions as board
from sparkops.config import load_settings
from sparkops.storage.schema import task_runs
from sparkops.storage.store import open_store

SECTION = "## Claims with concurrent dispatchers"


def _settings(board_url: str, ops_url: str):
    return load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": board_url, "SPARKOPS_STORAGE_OPS_URL": ops_url})


def _dispatcher(board_url: str, ops_url: str, host: str, barrier, results) -> None:
    store = open_store(_settings(board_url, ops_url))
    latencies: list[float] = []
    barrier.wait()
    last = time.time()
    while True:
        t0 = time.perf_counter()
        change = board.claim_next(store.board, host=host, lock=f"{host}:{os.getpid()}", capacity=1000)
        latencies.append(time.perf_counter() - t0)
        if change is None:
            break
        last = time.time()
        board.complete(store.board, change.task_id, run_id=change.run_id, result="ok")
    store.dispose()
    results.put((latencies[:-1], last))  # the final empty claim is not a claim


def measure(board_url: str, ops_url: str, tasks: int, dispatchers: int) -> dict[str, float]:
    store = open_store(_settings(board_url, ops_url), create=True)
    for i in range(tasks):
        board.create_task(store.board, f"task {i}", priority=i % 5)
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(dispatchers + 1), ctx.Queue()
    procs = [ctx.Process(target=_dispatcher, args=(board_url, ops_url, f"host-{k}", barrier, results))
             for k in range(dispatchers)]
    for p in procs:
        p.start()
    barrier.wait()
    started = time.time()
    outs = [results.get(timeout=1800) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    latencies = sorted(x for lat, _ in outs for x in lat)
    ended = max(last for _, last in outs)
    with store.board.read() as conn:
        runs = conn.execute(select(func.count()).select_from(task_runs)).scalar_one()
        distinct = conn.execute(select(func.count(func.distinct(task_runs.c.task_id)))).scalar_one()
    store.dispose()
    assert len(latencies) == tasks == runs == distinct, (len(latencies), tasks, runs, distinct)
    return {"claims_per_s": tasks / (ended - started), "p50_ms": latencies[len(latencies) // 2] * 1000,
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1000}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-vCPU {platform.machine()} ({cpu}), {memory:.0f} GiB; Python "
            f"{platform.python_version()}, SQLite {sqlite3.sqlite_version}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--dispatchers", default="1,4,8")
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="maintenance database URL; a scratch database is made and dropped per run")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    counts = [int(k) for k in args.dispatchers.split(",")]
    rows = []
    admin = create_engine(args.pg.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
    for k in counts:
        with tempfile.TemporaryDirectory() as tmp:
            r = measure(f"sqlite:///{tmp}/kanban.db", f"sqlite:///{tmp}/sparkops.db", args.tasks, k)
        rows.append(("SQLite (file, WAL)", k, r))
        print(f"SQLite, {k} dispatcher(s): {r}", file=sys.stderr)
        name = f"sparkops_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = args.pg.rsplit("/", 1)[0] + "/" + name
            r = measure(url, url, args.tasks, k)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        rows.append((f"PostgreSQL {version} (loopback)", k, r))
        print(f"PostgreSQL, {k} dispatcher(s): {r}", file=sys.stderr)
    admin.dispose()
    lines = ["| backend | dispatchers | claims per s (all together) | claim p50 ms | claim p99 ms |",
             "|---|---|---|---|---|"]
    lines += [f"| {b} | {k} | {r['claims_per_s']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
              for b, k, r in rows]
    table = "\n".join(lines)
    print(table)
    if args.write_docs:
        path = ROOT / "docs" / "benchmarks.md"
        current = path.read_text()
        if SECTION in current:
            head, _, rest = current.partition(SECTION)
            following = rest.find("\n## ")
            current = head.rstrip() + "\n" + (rest[following:] if following >= 0 else "")
        text_ = (f"{SECTION} (`bench/bench_claims.py`)\n\n{args.tasks} ready tasks; each dispatcher is "
                 "its own host and loops claim_next + complete until none is left (every task claimed "
                 f"exactly once, checked). Machine: {machine()}.\n\n{table}\n")
        path.write_text(current.rstrip() + "\n\n" + text_)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
