"""Benchmark: ``measure.compute`` on a large generated board (the review's cost).

Generates a board with ``gen_board.generate()`` (100,000 tasks, 300,000 runs,
1,000,000 events over 30 days) in a temporary directory, in a child process so
the generator's memory does not count, then times the full ``compute()`` with a
window covering the whole 30 days and ``phase_of`` from the ``[P1]``..``[P5]``
title tags (built once, outside the timing, as the phases module would).
Prints a markdown table for docs/benchmarks.md.

    .venv/bin/python bench/bench_metrics.py [--repeat 5] [--board DIR] [--profile]

Target: median under 2 s and peak RSS under 500 MB on a 2-vCPU VM.
"""

from __future__ import annotations

import argparse
import cProfile
import multiprocessing
import platform
import pstats
import re
import resource
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil
from sqlalchemy import select

from sparkops.config import load_settings
from sparkops.sprint import (
    measure,
    metrics,
)
from sparkops.storage.schema import tasks
from sparkops.storage.store import open_store

NOW = 1_795_000_000  # gen_board's "now"
WINDOW_HOURS = 30 * 24
TARGET_SECONDS = 2.0
TARGET_RSS_MB = 500.0
MB = 1024 * 1024


def _generate(directory: str, n_tasks: int, n_runs: int, n_events: int) -> None:
    import gen_board  # in the child process only

    made = gen_board.generate(Path(directory), n_tasks, n_runs, n_events)
    print(f"generated {made['tasks']} tasks, {made['runs']} runs, {made['events']} events "
          f"in {made['seconds']:.1f} s", flush=True)


class PeakRss:
    """Samples this process's RSS every 2 ms while active; keeps the maximum."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.peak = self.proc.memory_info().rss
        self._stop.clear()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--board", type=Path,
                        help="a directory already made by gen_board.py (skips generating)")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=300_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--profile", action="store_true", help="also print where one run spends its time")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        directory = args.board or Path(tmp)
        if args.board is None:
            child = multiprocessing.get_context("spawn").Process(
                target=_generate, args=(str(directory), args.tasks, args.runs, args.events))
            child.start()
            child.join()
            if child.exitcode != 0:
                print(f"generating the board failed (exit {child.exitcode})", file=sys.stderr)
                return 1
        settings = load_settings(env={
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{directory}/data/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{directory}/data/sparkops.db"}, cwd=directory)
        store = open_store(settings)
        pattern = re.compile(settings["review.phase_patterns"][0])
        with store.board.read() as conn:
            phase_of = {tid: m.group(1) for tid, title in conn.execute(select(tasks.c.id, tasks.c.title))
                        if (m := pattern.search(title))}
        size_mb = (directory / "data" / "kanban.db").stat().st_size / MB

        def run() -> metrics.Metrics:
            return measure.compute(store.board, now=NOW, window_hours=WINDOW_HOURS, phase_of=phase_of)

        baseline = psutil.Process().memory_info().rss
        seconds, peaks = [], []
        for _ in range(args.repeat):
            with PeakRss() as rss:
                t0 = time.perf_counter()
                result = run()
                seconds.append(time.perf_counter() - t0)
            peaks.append(rss.peak)
        tracemalloc.start()
        run()
        _, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        if args.profile:
            profiler = cProfile.Profile()
            profiler.runcall(run)
        store.dispose()
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    print(f"\nMachine: {platform.machine()}, {psutil.cpu_count()} CPUs, "
          f"{psutil.virtual_memory().total / 1024**3:.0f} GiB; Python {platform.python_version()}, "
          f"SQLite {sqlite3.sqlite_version}; board {size_mb:.0f} MB on disk "
          f"({args.tasks} tasks, {args.runs} runs, {args.events} events); window {WINDOW_HOURS} h; "
          f"phase_of for {len(phase_of)} tasks\n")
    print("| what | target | measured |")
    print("|---|---|---|")
    print(f"| `compute()` wall time, {args.repeat} runs | median < {TARGET_SECONDS:.0f} s "
          f"| median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s "
          f"(runs: {', '.join(f'{s:.2f}' for s in seconds)}) |")
    print(f"| peak RSS while computing (psutil, 2 ms samples) | < {TARGET_RSS_MB:.0f} MB "
          f"| {max(peaks) / MB:.0f} MB ({(max(peaks) - baseline) / MB:+.0f} MB over the "
          f"{baseline / MB:.0f} MB before the first run) |")
    print(f"| process peak RSS (ru_maxrss, whole benchmark) | | {max_rss:.0f} MB |")
    print(f"| Python allocations peak (tracemalloc, one run) | | {traced_peak / MB:.0f} MB |")
    print(f"\n{result.throughput.completed} completions, {result.runs.runs} runs, "
          f"{result.blocked_count} blocked, {len(result.wip)} WIP hours.")
    if args.profile:
        print("\nWhere one run spends its time (cumulative seconds):")
        stats = pstats.Stats(profiler)
        rows = [(ct, fn[2]) for fn, (_, _, _, ct, _) in stats.stats.items()  # type: ignore[attr-defined]
                if fn[0].endswith("metrics.py") and fn[2].startswith("_")]
        for ct, name in sorted(rows, reverse=True):
            print(f"  {name:20s} {ct:.3f}")
    ok = statistics.median(seconds) < TARGET_SECONDS and max(peaks) / MB < TARGET_RSS_MB
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
