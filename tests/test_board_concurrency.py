"""Concurrent transitions from several real processes on one task: exactly one
wins, the others are refused cleanly, and the board stays consistent."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from conftest import NOW
from sqlalchemy import func, select

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.storage.schema import task_events, task_runs

WORKERS = 8


def _contend(url: str, action: str, task_id: str, run_id: int | None, worker: int,
             barrier, results) -> None:
    """Child process: open its own engine, wait for the others, try once."""
    from sparkops.core.errors import SparkOpsError
    from sparkops.storage.db import Database

    db = Database(url, role="board")
    try:
        barrier.wait(timeout=60)
        if action == "claim":
            change = board.claim(db, task_id, lock=f"host:{worker}", now=NOW + 1)
        elif action == "complete":
            change = board.complete(db, task_id, run_id=run_id, result=f"w{worker}", now=NOW + 2)
        else:
            change = board.block(db, task_id, run_id=run_id, reason=f"w{worker}", now=NOW + 2)
        results.put(("won", worker, change.run_id))
    except SparkOpsError as err:
        results.put(("refused", worker, type(err).__name__))
    except Exception as err:  # noqa: BLE001 - report anything unexpected to the parent
        results.put(("error", worker, repr(err)))
    finally:
        db.dispose()


def _race(url: str, action: str, task_id: str, run_id: int | None = None) -> list[tuple]:
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WORKERS)
    results = ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(url, action, task_id, run_id, i, barrier, results))
             for i in range(WORKERS)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return outcomes


def test_concurrent_claims_one_wins(store, settings):
    task_id = board.create_task(store.board, "Contended", now=NOW)
    outcomes = _race(settings["storage.board_url"], "claim", task_id)
    assert [o for o in outcomes if o[0] == "error"] == []
    winners = [o for o in outcomes if o[0] == "won"]
    assert len(winners) == 1
    assert all(o[2] == "TransitionRefused" for o in outcomes if o[0] == "refused")
    detail = queries.task_detail(store.board, task_id)
    assert detail["task"]["status"] == "running"
    assert len(detail["runs"]) == 1 and detail["runs"][0]["id"] == winners[0][2]
    assert detail["task"]["claim_lock"] == f"host:{winners[0][1]}"
    assert [e["kind"] for e in detail["events"]].count("claimed") == 1


@pytest.mark.parametrize("action", ["complete", "block"])
def test_concurrent_reports_on_one_run_one_wins(store, settings, action):
    task_id = board.create_task(store.board, "Contended", now=NOW)
    run_id = board.claim(store.board, task_id, lock="h:0", now=NOW).run_id
    outcomes = _race(settings["storage.board_url"], action, task_id, run_id)
    assert [o for o in outcomes if o[0] == "error"] == []
    assert len([o for o in outcomes if o[0] == "won"]) == 1
    # losers see the task changed under them (refused or fenced), never an exception
    assert {o[2] for o in outcomes if o[0] == "refused"} <= {"TransitionRefused", "StaleRun"}
    with store.board.read() as conn:
        closed = conn.execute(select(task_runs.c.ended_at).where(task_runs.c.id == run_id)).scalar()
        terminal_events = conn.execute(
            select(func.count()).select_from(task_events)
            .where(task_events.c.task_id == task_id,
                   task_events.c.kind.in_(["completed", "blocked"]))).scalar()
    assert closed == NOW + 2
    assert terminal_events == 1
