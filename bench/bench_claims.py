"""Benchmark: the dispatcher's claim (``board.claim_next``) with 1, 4 and 8
dispatchers at once, on SQLite and on PostgreSQL.

N ready tasks; K processes, each a dispatcher of its own host (as on a fleet),
loop ``claim_next`` then ``complete`` until nothing is left. Measured: every
claim_next call's latency (p50, p99) and the claims per second of all K together
(wall clock from the start barrier to the last claim). Checked: every task claimed
exactly once. Each figure is the median of ``--rounds`` rounds, SQLite and PostgreSQL
interleaved (SQLite first in odd rounds): on a 2-vCPU machine one round's figure
varies by 15% from the next.

    .venv/bin/python bench/bench_claims.py [--tasks 2000] [--dispatchers 1,4,8] [--rounds 3] [--pg URL] [--write-docs]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import sqlite3
import statistics
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
    parser.add_argument("--rounds", type=int, default=3, help="rounds per backend, interleaved")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    counts = [int(k) for k in args.dispatchers.split(",")]
    rows = []
    admin = create_engine(args.pg.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        version = conn.execute(text("SHOW server_version")).scalar()
    def sqlite_round(k: int) -> dict[str, float]:
        with tempfile.TemporaryDirectory() as tmp:
            return measure(f"sqlite:///{tmp}/kanban.db", f"sqlite:///{tmp}/sparkops.db", args.tasks, k)

    def postgres_round(k: int) -> dict[str, float]:
        name = f"sparkops_bench_{uuid.uuid4().hex[:8]}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            url = args.pg.rsplit("/", 1)[0] + "/" + name
            return measure(url, url, args.tasks, k)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    sqlite_name, postgres_name = "SQLite (file, WAL)", f"PostgreSQL {version} (loopback)"
    for k in counts:
        found: dict[str, list[dict[str, float]]] = {sqlite_name: [], postgres_name: []}
        for round_ in range(args.rounds):  # interleaved: SQLite first in odd rounds
            order = [(sqlite_name, sqlite_round), (postgres_name, postgres_round)]
            for name, run in order if round_ % 2 == 0 else order[::-1]:
                r = run(k)
                found[name].append(r)
                print(f"round {round_ + 1}, {name}, {k} dispatcher(s): {r}", file=sys.stderr)
        ratios = [p["claims_per_s"] / q["claims_per_s"] for p, q in zip(found[postgres_name], found[sqlite_name])]
        for name, results in found.items():
            rows.append((name, k, results, statistics.median(ratios) if name == postgres_name else None))
    admin.dispose()
    lines = ["| backend | dispatchers | claims per s (all together), median (range) | claim p50 ms | "
             "claim p99 ms | PostgreSQL / SQLite, median of the rounds |",
             "|---|---|---|---|---|---|"]
    for b, k, results, ratio in rows:
        rates = sorted(r["claims_per_s"] for r in results)
        p50, p99 = (statistics.median(r[key] for r in results) for key in ("p50_ms", "p99_ms"))
        lines.append(f"| {b} | {k} | {statistics.median(rates):.0f} ({rates[0]:.0f}-{rates[-1]:.0f}) | "
                     f"{p50:.2f} | {p99:.2f} | {'' if ratio is None else f'{ratio:.2f}'} |")
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
                 f"exactly once, checked); {args.rounds} rounds per backend, interleaved. "
                 f"Machine: {machine()}.\n\n{table}\n")
        path.write_text(current.rstrip() + "\n\n" + text_)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
