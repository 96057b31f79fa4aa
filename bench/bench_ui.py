"""Benchmark: each page of the app on a large board, first render and refresh.

    .venv/bin/python bench/bench_ui.py [--board DIR] [--pages Home,Board,...] [--write-docs]

The board is one made by ``bench/gen_board.py`` (100,000 tasks, 300,000 runs,
1,000,000 events): ``--board DIR`` reuses one (``DIR/data/kanban.db``), else one is
generated into a temporary directory, dated so that its newest activity is now.
A reused board is copied into a temporary directory and its timestamps shifted
the same way (the original is never written to), so the sprint window holds a
day of work as on a live board, not nothing.

How each page is measured, one fresh Python process per page (so Streamlit's
caches, the store and the imports of the page's modules are all cold):

* **first render**: ``AppTest.from_file(page).run()``, the whole script run
  server-side as a new browser session would cause it (reads, tables serialised
  to Arrow, charts to Vega-Lite); the browser's own drawing is not included;
* **refresh**: the same ``AppTest`` run again after :data:`REFRESH_WAIT` seconds
  (``page.REFRESH_SECONDS``, the live parts' refresh interval): the short-lived
  cached reads (2 s) have expired and are read again, those kept longer (the
  sprint metrics, 10 s) are not, as in a real session;
* **refresh, all expired**: one more run after ``st.cache_data.clear()``, as if
  every cached read had expired at once (the worst refresh);
* **peak RSS**: the process's ``ru_maxrss`` after the three runs, and in
  brackets its RSS just before the first run (the interpreter, Streamlit and the
  app's modules with pandas, altair and SQLAlchemy, imported beforehand and timed
  apart: a server pays that once, for whichever page it serves first).

Prints a markdown table; ``--write-docs`` also writes it, with the machine, to the
section "The app on a large board" at the end of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import json
import os
import platform
import resource
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PAGES = {
    "Home": "Home.py",
    "Board": "pages/1_Board.py",
    "Runs": "pages/2_Runs.py",
    "GPU": "pages/3_GPU.py",
    "Sprint review": "pages/4_Sprint_review.py",
    "Jobs": "pages/5_Jobs.py",
    "Playbook": "pages/6_Playbook.py",
    "Events": "pages/7_Events.py",
}
#: Targets, seconds, for the first render and for a refresh.
TARGET = {"Home": 1.0}
DEFAULT_TARGET = 2.0
#: Seconds between the first render and the refresh (the live parts' interval).
REFRESH_WAIT = 5.0
#: Timestamp columns shifted when a reused board is dated to now.
TIME_COLUMNS = {
    "tasks": ("created_at", "started_at", "completed_at"),
    "task_runs": ("started_at", "ended_at", "last_heartbeat_at", "claim_expires"),
    "task_events": ("created_at",),
    "task_comments": ("created_at",),
}
SECTION = "## The app on a large board"
#: The app's shared modules (and so pandas, altair, SQLAlchemy): imported once per
#: server process by whichever page is served first, so timed apart.
APP_MODULES = ("sparkops.ui.page", "sparkops.ui.data", "sparkops.ui.views", "sparkops.ui.board_view",
               "sparkops.ui.review_view", "sparkops.ui.home_view", "sparkops.ui.jobs_view", "sparkops.ui.events_view",
               "sparkops.ui.fleet_view", "sparkops.ui.playbook_view", "sparkops.ui.gpu_view")


# -- the board ------------------------------------------------------------------------------------


def generate_board(directory: Path, tasks: int, runs: int, events: int) -> dict:
    """A board from bench/gen_board.py whose newest activity is now."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gen_board

    gen_board.NOW = int(time.time())  # read by generate() at each call
    return gen_board.generate(directory, tasks, runs, events)


def newest_activity(db_path: Path) -> int:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        row = conn.execute("SELECT max(max(coalesce(completed_at, 0)), max(created_at)) FROM tasks").fetchone()
        events = conn.execute("SELECT max(created_at) FROM task_events").fetchone()
    return int(max(row[0] or 0, events[0] or 0))


def dated_copy(source: Path, directory: Path) -> int:
    """Copy ``source``'s databases into ``directory``/data and shift every timestamp
    so that the newest activity is now; returns the shift in seconds."""
    data = directory / "data"
    data.mkdir(parents=True)
    for name in ("kanban.db", "sparkops.db"):
        if (source / "data" / name).exists():
            shutil.copyfile(source / "data" / name, data / name)
    shift = int(time.time()) - newest_activity(data / "kanban.db")
    with sqlite3.connect(data / "kanban.db") as conn:
        columns = {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t in TIME_COLUMNS}
        for table, wanted in TIME_COLUMNS.items():
            sets = ", ".join(f"{c} = {c} + :s" for c in wanted if c in columns[table])
            if sets:
                conn.execute(f"UPDATE {table} SET {sets}", {"s": shift})
    return shift


def board_size(db_path: Path) -> dict[str, int]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True) as conn:
        return {t: conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("tasks", "task_links", "task_runs", "task_events")}


# -- one page in a fresh process -------------------------------------------------------------------


def rss_mb() -> float:
    try:
        import psutil
        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is a test requirement
        return float("nan")


def measure_page(page: str, board_dir: Path, work_dir: Path, profile: Path | None) -> dict:
    """Runs in the child process: render ``page`` three times, as described above."""
    for name in [n for n in os.environ if n.startswith("SPARKOPS_")]:
        del os.environ[name]
    os.environ["SPARKOPS_STORAGE_BOARD_URL"] = f"sqlite:///{board_dir}/data/kanban.db"
    os.environ["SPARKOPS_STORAGE_OPS_URL"] = f"sqlite:///{board_dir}/data/sparkops.db"
    os.chdir(work_dir)  # no sparkops.toml, no .streamlit/secrets.toml
    import streamlit as st
    from streamlit import config
    from streamlit.testing.v1 import AppTest

    config.set_option("server.address", "127.0.0.1")
    started = time.perf_counter()
    for module in APP_MODULES:  # what the server has imported once it served any page
        importlib.import_module(module)
    imports = time.perf_counter() - started
    before = rss_mb()
    at = AppTest.from_file(str(ROOT / "sparkops" / "app" / page), default_timeout=600)

    if profile is not None:
        profile_script_thread()

    def timed() -> float:
        started = time.perf_counter()
        at.run()
        return time.perf_counter() - started

    first = timed()
    problems = trouble(at)
    time.sleep(REFRESH_WAIT)
    refresh = timed()
    st.cache_data.clear()
    expired = timed()
    problems += trouble(at)
    if profile is not None:
        PROFILER.dump_stats(str(profile))
    return {"imports": imports, "first": first, "refresh": refresh, "expired": expired, "rss_before_mb": before,
            "rss_mb": rss_mb(), "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "problems": [str(p)[:300] for p in problems]}


PROFILER = None


def profile_script_thread() -> None:
    """Profile the page's script, which Streamlit runs in its own thread (cProfile
    sees only the thread that enables it)."""
    global PROFILER
    import cProfile

    from streamlit.runtime.scriptrunner import script_runner

    PROFILER = cProfile.Profile()
    original = script_runner.ScriptRunner._run_script

    def profiled(self, rerun_data):
        PROFILER.enable()
        try:
            return original(self, rerun_data)
        finally:
            PROFILER.disable()

    script_runner.ScriptRunner._run_script = profiled


def trouble(at) -> list[str]:
    """Exceptions, and the error box a page shows when it cannot read its data (other
    error boxes, such as "the jobs runner has never run", are what the page is for)."""
    return ([e.value for e in at.exception]
            + [e.value for e in at.error if e.value.startswith(("**SparkOps cannot", "**Database error"))])


def in_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"bench child {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the report --------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import sqlalchemy
    import streamlit
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{os.cpu_count()}-vCPU {platform.machine()} ({cpu}), {memory:.0f} GiB RAM; "
            f"Python {platform.python_version()}, Streamlit {streamlit.__version__}, "
            f"SQLAlchemy {sqlalchemy.__version__}, SQLite {sqlite3.sqlite_version}")


def verdict(name: str, r: dict) -> str:
    target = TARGET.get(name, DEFAULT_TARGET)
    ok = r["first"] < target and r["refresh"] < target and not r["problems"]
    return "yes" if ok else "**no**"


def table(results: dict[str, list[dict]]) -> str:
    """One row per page; with several rounds, each cell is the range (min-max)."""
    lines = ["| page | target | first render s | refresh s | refresh, all caches expired s "
             "| peak RSS MB (before the page) | meets target |",
             "|---|---|---|---|---|---|---|"]
    for name, runs in results.items():
        def span(key: str, fmt: str = ".2f") -> str:
            low, high = min(r[key] for r in runs), max(r[key] for r in runs)
            return f"{low:{fmt}}" if f"{low:{fmt}}" == f"{high:{fmt}}" else f"{low:{fmt}}-{high:{fmt}}"
        worst = {k: max(r[k] for r in runs) for k in ("first", "refresh", "expired")}
        worst["problems"] = [p for r in runs for p in r["problems"]]
        lines.append(f"| {name} | < {TARGET.get(name, DEFAULT_TARGET):g} s | {span('first')} "
                     f"| {span('refresh')} | {span('expired')} | {span('peak_rss_mb', '.0f')} "
                     f"({span('rss_before_mb', '.0f')}) | {verdict(name, worst)} |")
    imports = [r["imports"] for runs in results.values() for r in runs]
    lines.append(f"\nOnce per server process, before the first page: importing the app's modules "
                 f"(pandas, altair, SQLAlchemy with them) {min(imports):.2f}-{max(imports):.2f} s, "
                 "not counted above.")
    return "\n".join(lines)


def write_docs(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    current = path.read_text()
    if SECTION in current:
        current = current[:current.index(SECTION)].rstrip() + "\n"
    path.write_text(current.rstrip() + "\n\n" + text.rstrip() + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", type=Path, help="a directory made by bench/gen_board.py (reused, not written)")
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=300_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated page names")
    parser.add_argument("--repeat", type=int, default=1, help="measure each page this many times")
    parser.add_argument("--profile", type=Path, help="write a cProfile file per page into this directory")
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        profile = args.profile / (Path(args.child).stem + ".prof") if args.profile else None
        print(json.dumps(measure_page(args.child, args.board, args.work, profile)))
        return 0

    names = [n.strip() for n in args.pages.split(",") if n.strip()]
    unknown = [n for n in names if n not in PAGES]
    if unknown:
        parser.error(f"unknown page(s) {', '.join(unknown)}; pages are {', '.join(PAGES)}")
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sparkops-bench-ui-") as tmp:
        board_dir, work = Path(tmp) / "board", Path(tmp) / "work"
        work.mkdir()
        started = time.perf_counter()
        if args.board:
            shift = dated_copy(args.board, board_dir)
            origin = f"{args.board} (copied, timestamps shifted by {shift / 86400:.1f} days to end now)"
        else:
            generate_board(board_dir, args.tasks, args.runs, args.events)
            origin = "generated by bench/gen_board.py, ending now"
        size = board_size(board_dir / "data" / "kanban.db")
        megabytes = (board_dir / "data" / "kanban.db").stat().st_size / 1e6
        print(f"board: {size['tasks']:,} tasks, {size['task_links']:,} links, {size['task_runs']:,} runs, "
              f"{size['task_events']:,} events, {megabytes:.0f} MB; {origin}; "
              f"ready in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for _round in range(args.repeat):
            for name in names:
                child = ["--child", PAGES[name], "--board", str(board_dir), "--work", str(work)]
                if args.profile:
                    child += ["--profile", str(args.profile)]
                r = in_child(child)
                results[name].append(r)
                print(f"  {name}: first {r['first']:.2f}s, refresh {r['refresh']:.2f}s, "
                      f"all expired {r['expired']:.2f}s, peak RSS {r['peak_rss_mb']:.0f} MB"
                      + (f"; PROBLEMS: {r['problems']}" if r["problems"] else ""), file=sys.stderr)

    report = table(results)
    print(report)
    if args.write_docs:
        today = dt.date.today().isoformat()
        write_docs(f"{SECTION} (`bench/bench_ui.py`)\n\n"
                   f"Board: {size['tasks']:,} tasks, {size['task_links']:,} links, {size['task_runs']:,} "
                   f"runs, {size['task_events']:,} events ({megabytes:.0f} MB of SQLite), {origin}.\n"
                   f"Machine: {machine()}. Run on {today}, {args.repeat} round(s), nothing else running.\n\n"
                   f"{report}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
