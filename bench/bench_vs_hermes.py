"""Benchmark: SparkOps' state machine against Hermes' own, on the same loop and machine.

Two measures, each in interleaved rounds (Hermes, SparkOps, SparkOps, Hermes, ...), every
round a fresh process and a fresh SQLite board in a temporary directory:

* **transitions**: one process creates N tasks, then claims and completes each, through
  the library: Hermes 0.19's ``hermes_cli.kanban_db`` (run by the ``.venv-hermes`` the
  tests install) and SparkOps' ``board.transitions``. Tasks per second, create+claim+
  complete and claim+complete apart.
* **the report process**: a worker's report as a fresh process, as an agent sends it:
  ``python -m sparkops task complete T --run R`` against ``hermes kanban complete T``,
  on a board of claimed tasks; wall time per report. SparkOps' report is timed twice:
  from under the task's live shim (a real ``sparkops.engine.shim`` whose agent waits;
  the report is handed to the shim, as every agent's is) and with no shim (the
  report process makes it itself).

Talks to nothing but files in a temporary directory. Prints a markdown table for
docs/benchmarks.md.

    .venv/bin/python bench/bench_vs_hermes.py [--tasks 1000] [--rounds 3] [--reports 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HERMES_PYTHON = ROOT / ".venv-hermes" / "bin" / "python"
HERMES_BIN = ROOT / ".venv-hermes" / "bin" / "hermes"


# -- the loops, run in a child process ------------------------------------------------


def hermes_loop(db: Path, n: int) -> dict[str, float]:
    from hermes_cli import kanban_db as kb

    kb.init_db(db)
    conn = kb.connect(db)
    t0 = time.perf_counter()
    ids = [kb.create_task(conn, title=f"task {i}", priority=i % 5) for i in range(n)]
    t1 = time.perf_counter()
    for task_id in ids:
        if kb.claim_task(conn, task_id, claimer="bench:1") is None:
            raise SystemExit(f"hermes did not claim {task_id}")
        if not kb.complete_task(conn, task_id, result="ok"):
            raise SystemExit(f"hermes did not complete {task_id}")
    t2 = time.perf_counter()
    conn.close()
    return {"create_s": t1 - t0, "claim_complete_s": t2 - t1}


def sparkops_loop(db: Path, n: int) -> dict[str, float]:
    sys.path.insert(0, str(ROOT))
    from sparkops.board import transitions as board
    from sparkops.config import load_settings
    from sparkops.storage.store import open_store

    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{db}",
                                  "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{db.with_name('ops.db')}"},
                             cwd=db.parent)
    store = open_store(settings, create=True)
    t0 = time.perf_counter()
    ids = [board.create_task(store.board, f"task {i}", priority=i % 5) for i in range(n)]
    t1 = time.perf_counter()
    for task_id in ids:
        run = board.claim(store.board, task_id, lock="bench:1").run_id
        board.complete(store.board, task_id, run_id=run, result="ok")
    t2 = time.perf_counter()
    store.dispose()
    return {"create_s": t1 - t0, "claim_complete_s": t2 - t1}


# -- the report process ------------------------------------------------------------------


def claimed_board(tool: str, directory: Path, n: int) -> tuple[Path, list[tuple[str, int]]]:
    """A board with ``n`` claimed tasks, made by ``tool`` through its library:
    ``[(task id, run id), ...]``."""
    db = directory / "kanban.db"
    code = (f"import json, sys; sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / 'bench')!r}]; "
            "from bench_vs_hermes import _claim_all; "
            f"print(json.dumps(_claim_all({tool!r}, {str(db)!r}, {n})))")
    python = HERMES_PYTHON if tool == "hermes" else Path(sys.executable)
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True,
                         env=_env(directory), cwd=directory)
    return db, [tuple(x) for x in json.loads(out.stdout.strip().splitlines()[-1])]


def _claim_all(tool: str, db: str, n: int) -> list[tuple[str, int]]:
    path = Path(db)
    if tool == "hermes":
        from hermes_cli import kanban_db as kb

        kb.init_db(path)
        conn = kb.connect(path)
        out = []
        for i in range(n):
            task_id = kb.create_task(conn, title=f"report {i}")
            task = kb.claim_task(conn, task_id, claimer="bench:1")
            out.append((task_id, task.current_run_id))
        return out
    from sparkops.board import transitions as board
    from sparkops.config import load_settings
    from sparkops.storage.store import open_store

    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{path}",
                                  "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{path.with_name('ops.db')}"},
                             cwd=path.parent)
    store = open_store(settings, create=True)
    out = []
    for i in range(n):
        task_id = board.create_task(store.board, f"report {i}")
        out.append((task_id, board.claim(store.board, task_id, lock="bench:1").run_id))
    store.dispose()
    return out


#: The agent of a shim in the report benchmark: leaves its environment (the report
#: socket and token the shim gave it) for the benchmark, then waits.
WAITING_AGENT = ["{python}", "-c", "import json, os, time; json.dump(dict(os.environ), open('env.tmp', 'w')); "
                 "os.rename('env.tmp', 'env.json'); time.sleep(60)"]


def report_times(tool: str, n: int, *, via_shim: bool = False) -> list[float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-report-{tool}-") as tmp:
        directory = Path(tmp)
        db, claimed = claimed_board(tool, directory, n)
        env = _env(directory, db)
        times = []
        for task_id, run_id in claimed:
            shim = None
            if tool == "hermes":
                argv = [str(HERMES_BIN), "kanban", "complete", task_id, "--result", "ok"]
            else:
                argv = [sys.executable, "-m", "sparkops", "task", "complete", task_id, "--run", str(run_id),
                        "--result", "ok"]
            report_env = env
            if via_shim:
                shim, report_env = _shim_for(directory, env, task_id, run_id)
            t0 = time.perf_counter()
            done = subprocess.run(argv, capture_output=True, text=True, env=report_env, cwd=directory)
            times.append(time.perf_counter() - t0)
            if done.returncode != 0:
                raise SystemExit(f"{tool} report failed: {done.stderr.strip()[:300]}")
            if shim is not None:
                shim.wait(timeout=60)
        return times


def _shim_for(directory: Path, env: dict[str, str], task_id: str, run_id: int
              ) -> tuple[subprocess.Popen, dict[str, str]]:
    """A real shim for the run, its agent waiting: (the shim, the agent's environment)."""
    shim_env = {**env, "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(WAITING_AGENT),
                "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(directory / "workspaces"),
                "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(directory / "logs"),
                "SPARKOPS_DISPATCH_REPORT_EXIT_GRACE_SECONDS": "0"}
    shim = subprocess.Popen([sys.executable, "-m", "sparkops.engine.shim", task_id, str(run_id)], env=shim_env,
                            cwd=directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    left = directory / "workspaces" / task_id / "env.json"
    deadline = time.monotonic() + 60
    while not left.exists():
        if shim.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the shim of {task_id} did not start its agent (exit {shim.poll()})")
        time.sleep(0.01)
    return shim, json.loads(left.read_text())


def _env(directory: Path, db: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
    env.update(HOME=str(directory / "home"), HERMES_HOME=str(directory / "home" / ".hermes"),
               PYTHONPATH=str(ROOT))
    if db is not None:
        env.update(HERMES_KANBAN_DB=str(db), SPARKOPS_STORAGE_BOARD_URL=f"sqlite:///{db}",
                   SPARKOPS_STORAGE_OPS_URL=f"sqlite:///{db.with_name('ops.db')}")
    return env


# -- the driver ------------------------------------------------------------------------------


def transitions_round(tool: str, n: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"bench-vs-{tool}-") as tmp:
        directory = Path(tmp)
        python = HERMES_PYTHON if tool == "hermes" else Path(sys.executable)
        out = subprocess.run([str(python), str(Path(__file__)), "--child", tool, "--db", str(directory / "kanban.db"),
                              "--tasks", str(n)], capture_output=True, text=True, env=_env(directory), cwd=directory)
        if out.returncode != 0:
            raise SystemExit(f"{tool} round failed: {out.stderr.strip()[-600:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reports", type=int, default=8, help="reports timed per tool and round")
    parser.add_argument("--child", choices=["hermes", "sparkops"], help=argparse.SUPPRESS)
    parser.add_argument("--db", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        loop = hermes_loop if args.child == "hermes" else sparkops_loop
        print(json.dumps(loop(Path(args.db), args.tasks)))
        return
    if not HERMES_BIN.exists():
        raise SystemExit(f"no Hermes at {HERMES_BIN}: run ./scripts/test once (it installs .venv-hermes)")
    n = args.tasks
    rows: dict[str, list[dict[str, float]]] = {"hermes": [], "sparkops": []}
    reports: dict[str, list[float]] = {"hermes": [], "sparkops": [], "sparkops-shim": []}
    for r in range(args.rounds):
        order = ("hermes", "sparkops") if r % 2 == 0 else ("sparkops", "hermes")
        for tool in order:
            result = transitions_round(tool, n)
            rows[tool].append(result)
            print(f"round {r + 1} {tool:<8}: create {n / result['create_s']:7.0f}/s, "
                  f"claim+complete {n / result['claim_complete_s']:7.0f}/s, "
                  f"all three {n / (result['create_s'] + result['claim_complete_s']):7.0f} tasks/s", file=sys.stderr)
        for tool, via_shim in [(tool, False) for tool in order] + [("sparkops", True)]:
            times = report_times(tool, args.reports, via_shim=via_shim)
            reports[tool + ("-shim" if via_shim else "")] += times
            print(f"round {r + 1} {tool:<8}: report {'through its shim ' if via_shim else ''}median "
                  f"{statistics.median(times):.3f} s", file=sys.stderr)

    def rate(tool: str, key: str | None) -> list[float]:
        return [n / (x["create_s"] + x["claim_complete_s"] if key is None else x[key]) for x in rows[tool]]

    print(f"\n{platform.node()}: {os.cpu_count()} CPUs, Python {platform.python_version()}; "
          f"{n} tasks a round, {args.rounds} rounds, {args.reports} reports per tool a round\n")
    print("| measure | Hermes 0.19 | SparkOps | SparkOps / Hermes |")
    print("|---|---:|---:|---:|")
    for label, key in (("create + claim + complete, tasks/s", None), ("claim + complete, tasks/s", "claim_complete_s"),
                       ("create, tasks/s", "create_s")):
        h, s = rate("hermes", key), rate("sparkops", key)
        print(f"| {label} | {min(h):.0f}-{max(h):.0f} | {min(s):.0f}-{max(s):.0f} | "
              f"{statistics.median(s) / statistics.median(h):.2f} |")
    h = statistics.median(reports["hermes"])
    for label, key in (("a worker's report as a process, through its shim, median s", "sparkops-shim"),
                       ("a worker's report as a process, no shim, median s", "sparkops")):
        s = statistics.median(reports[key])
        print(f"| {label} | {h:.3f} | {s:.3f} | {s / h:.2f} |")


if __name__ == "__main__":
    main()
