"""Benchmark: the statements and round trips of each transition, SparkOps against Hermes.

For each transition (create, claim, complete, block, book a crash, reclaim) on a
fresh board: how many SQL statements the tool sends, counting ``BEGIN`` and
``COMMIT`` (on SQLite each is a call into the library; on PostgreSQL each is a
round trip to the server). Hermes 0.19's ``hermes_cli.kanban_db`` on SQLite (its
only backend; counted with ``sqlite3``'s trace callback, in the ``.venv-hermes``
the tests install) and SparkOps' ``board.transitions`` on SQLite and PostgreSQL
(counted with SQLAlchemy's cursor and transaction events). Also SparkOps'
dispatcher claim (``claim_next``: the best eligible ready task within the host's
capacity), which Hermes does as a ``list`` then a ``claim``, and a shim's whole run
(recording itself and its agent, watching the run while the agent starts, the
agent's report handed to it; the report process's own statements are not counted:
through the shim it makes none).

    .venv/bin/python bench/bench_statements.py [--pg ADMIN_URL]

Prints a markdown table for docs/benchmarks.md. Talks to files in a temporary
directory and, with ``--pg``, to a database of its own that it drops afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from bench_vs_hermes import _env  # noqa: E402  (HOME and HERMES_HOME in the temporary directory)

HERMES_PYTHON = ROOT / ".venv-hermes" / "bin" / "python"
TRANSITIONS = ("create", "claim", "complete", "block", "crash", "reclaim")


def hermes_counts(db: str) -> dict[str, int]:
    """Run in Hermes' virtualenv: each transition once, its statements counted."""
    from hermes_cli import kanban_db as kb

    kb.init_db(Path(db))
    conn = kb.connect(Path(db))
    seen: list[str] = []
    conn.set_trace_callback(seen.append)

    def count(step: Callable[[], object]) -> int:
        seen.clear()
        step()
        return len(seen)

    counts = {}
    made: list[str] = []
    counts["create"] = count(lambda: made.append(kb.create_task(conn, title="t")))
    for _ in range(3):
        made.append(kb.create_task(conn, title="t"))
    a, b, c, d = made
    counts["claim"] = count(lambda: kb.claim_task(conn, a, claimer="bench:1"))
    counts["complete"] = count(lambda: kb.complete_task(conn, a, result="ok"))
    kb.claim_task(conn, b, claimer="bench:1")
    counts["block"] = count(lambda: kb.block_task(conn, b, reason="needs a human"))
    kb.claim_task(conn, c, claimer="bench:1")
    counts["crash"] = count(lambda: kb._record_task_failure(conn, c, "agent exit 1", outcome="crashed",
                                                            release_claim=True, end_run=True))
    kb.claim_task(conn, d, claimer="bench:1")
    counts["reclaim"] = count(lambda: kb.reclaim_task(conn, d, reason="bench", signal_fn=lambda *a: None))
    conn.close()
    return counts


def sparkops_counts(board_url: str, ops_url: str, workdir: str) -> dict[str, int]:
    sys.path.insert(0, str(ROOT))
    os.environ["PYTHONPATH"] = str(ROOT)  # for the agent's report process
    from sqlalchemy import event

    from sparkops.board import queries
    from sparkops.board import transitions as board
    from sparkops.board.model import FailureLimits, Outcome
    from sparkops.config import load_settings
    from sparkops.storage.store import open_store

    agent = ["{python}", "-m", "sparkops", "task", "complete", "{task_id}", "--run", "{run_id}", "--result", "ok"]
    settings = load_settings(env={"SPARKOPS_STORAGE_BOARD_URL": board_url, "SPARKOPS_STORAGE_OPS_URL": ops_url,
                                  "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(agent)}, cwd=Path(workdir))
    store = open_store(settings, create=True)
    db = store.board
    seen: list[str] = []
    event.listen(db.engine, "before_cursor_execute", lambda *args: seen.append(args[2]))
    event.listen(db.engine, "commit", lambda _conn: seen.append("COMMIT"))
    if not db.is_sqlite:  # SQLite's BEGIN IMMEDIATE is a cursor execute (storage/db.py)
        event.listen(db.engine, "begin", lambda _conn: seen.append("BEGIN"))

    def count(step: Callable[[], object]) -> int:
        seen.clear()
        step()
        return len(seen)

    limits = FailureLimits.from_settings(settings).as_kwargs()
    counts = {}
    made: list[str] = []
    counts["create"] = count(lambda: made.append(board.create_task(db, "t")))
    for _ in range(4):
        made.append(board.create_task(db, "t"))
    runs: dict[str, int] = {}

    def claim(task_id: str) -> None:
        runs[task_id] = board.claim(db, task_id, lock="bench:1").run_id

    a, b, c, d, _ready = made  # the last one is left for claim_next
    counts["claim"] = count(lambda: claim(a))
    counts["complete"] = count(lambda: board.complete(db, a, run_id=runs[a], result="ok"))
    claim(b)
    counts["block"] = count(lambda: board.block(db, b, run_id=runs[b], reason="needs a human"))
    claim(c)
    counts["crash"] = count(lambda: board.fail(db, c, run_id=runs[c], outcome=Outcome.CRASHED,
                                               error="agent exit 1", **limits))
    claim(d)
    counts["reclaim"] = count(lambda: board.reclaim(db, d, run_id=runs[d], reason="bench"))
    counts["claim_next"] = count(lambda: board.claim_next(db, host="bench", lock="bench:1", capacity=8))
    task = board.create_task(db, "a shim's run")
    run = board.claim(db, task, lock="bench:1").run_id
    counts["a shim's run"] = count(lambda: shim_run(settings, store, task, run))
    if queries.get_task(db, task)["status"] != "done":
        raise SystemExit("the shim's run did not complete its task")
    store.dispose()
    return counts


def shim_run(settings, store, task: str, run: int) -> None:
    """A run from its shim's start to its end: the shim records itself and the agent,
    the agent (``python -m sparkops task complete``) hands its report to the shim,
    which makes it. Only the shim's statements are counted (the report process is
    another process; through the shim it makes none)."""
    from sparkops.engine.shim import Shim

    Shim(settings, store, task, run).run()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg", default="postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
                        help="a maintenance database URL ('' to leave PostgreSQL out)")
    args = parser.parse_args()
    columns: dict[str, dict[str, int]] = {}
    with tempfile.TemporaryDirectory(prefix="sparkops-statements-") as tmp:
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); "
                "from bench_statements import hermes_counts; "
                f"print(json.dumps(hermes_counts({str(Path(tmp) / 'hermes.db')!r})))")
        out = subprocess.run([str(HERMES_PYTHON), "-c", code], capture_output=True, text=True, check=True,
                             env=_env(Path(tmp)), cwd=tmp)
        columns["Hermes 0.19 (SQLite)"] = json.loads(out.stdout.strip().splitlines()[-1])
        columns["SparkOps (SQLite)"] = sparkops_counts(f"sqlite:///{tmp}/kanban.db", f"sqlite:///{tmp}/ops.db", tmp)
    if args.pg:
        from sqlalchemy import create_engine, text

        name = f"sparkops_bench_{uuid.uuid4().hex[:12]}"
        admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        url = f"{args.pg.rsplit('/', 1)[0]}/{name}".replace("postgresql+psycopg://", "postgresql://")
        try:
            with tempfile.TemporaryDirectory(prefix="sparkops-statements-") as tmp:
                columns["SparkOps (PostgreSQL)"] = sparkops_counts(url, url, tmp)
        finally:
            with admin.connect() as conn:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
    names = list(columns)
    print("| transition | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for step in (*TRANSITIONS, "claim_next", "a shim's run"):
        print(f"| {step} | " + " | ".join(str(columns[n].get(step, "-")) for n in names) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
