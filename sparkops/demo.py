"""A small demo sprint, so a fresh install has something to show.

:func:`seed_demo` fills an *empty* board with ten tasks of a made-up brokerage
sprint in three phases (``[P1]``..``[P3]`` title tags), with dependencies,
assignees and priorities: two tasks done (with their runs), one ready, one
blocked on a human, the rest waiting in ``todo`` for their parents. Everything
goes through :mod:`sparkops.board`, so the events and runs look exactly like a
real sprint's. A board that already has a task (archived ones included) is left
alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from sparkops import board, queries
from sparkops.clock import epoch
from sparkops.db import Database

HOUR = 3600
DEMO_LOCK = "demo:0"  # the claim lock of the demo's made-up runs (``host:pid``)


@dataclass(frozen=True)
class DemoTask:
    key: str
    title: str
    assignee: str
    priority: int
    parents: tuple[str, ...] = ()
    body: str | None = None


#: The sprint, parents before children.
DEMO_TASKS: tuple[DemoTask, ...] = (
    DemoTask("repo", "[P1] Set up the repository, CI and pre-commit hooks", "builder", 3,
             body="Python 3.11, ruff, pytest; CI runs the tests on every push."),
    DemoTask("schema", "[P1] Design the orders and accounts schema", "builder", 3, ("repo",)),
    DemoTask("api", "[P1] FastAPI skeleton with a /health endpoint", "builder", 2, ("repo",)),
    DemoTask("matching", "[P2] Order matching engine (price-time priority)", "builder", 3,
             ("schema", "api")),
    DemoTask("endpoints", "[P2] REST endpoints to place and cancel orders", "builder", 2,
             ("schema", "api")),
    DemoTask("feed", "[P2] Market data feed integration", "integrator", 1, ("schema",)),
    DemoTask("integration", "[P2] Integration tests for the order flow", "tester", 2,
             ("matching", "endpoints")),
    DemoTask("dashboard", "[P3] Trading dashboard page", "frontend", 1, ("endpoints",)),
    DemoTask("loadtest", "[P3] Load test at 1,000 orders per second", "tester", 1, ("matching",)),
    DemoTask("runbook", "[P3] Deployment runbook and rollback drill", "builder", 0,
             ("integration", "dashboard")),
)


def seed_demo(db: Database, now: float | None = None) -> list[str]:
    """Add the demo sprint to an empty board; return the new ids in
    :data:`DEMO_TASKS` order, or ``[]`` when the board already has tasks."""
    if queries.list_tasks(db, include_archived=True, limit=1):
        return []
    ts = epoch(now)
    start = ts - 8 * HOUR  # the sprint began eight hours ago
    ids: dict[str, str] = {}
    for n, task in enumerate(DEMO_TASKS):
        ids[task.key] = board.create_task(
            db, task.title, body=task.body, assignee=task.assignee, priority=task.priority,
            parents=[ids[p] for p in task.parents], created_by="sparkops-demo",
            idempotency_key=f"sparkops-demo:{task.key}", now=start + n * 60,
        )

    _work(db, ids["repo"], started=start + 1 * HOUR, hours=1,
          summary="Repository, CI workflow and pre-commit hooks in place; 4 tests pass.")
    _work(db, ids["schema"], started=start + 2 * HOUR, hours=2,
          summary="orders, accounts and fills tables with migrations; 18 tests pass.")
    board.block(db, ids["feed"], kind="needs_input",
                reason="Needs an API key for the market data vendor; ask the operator.",
                now=start + 4 * HOUR + 30 * 60)
    return [ids[task.key] for task in DEMO_TASKS]


def _work(db: Database, task_id: str, *, started: int, hours: float, summary: str) -> None:
    """A finished run: claim at ``started``, complete ``hours`` later."""
    change = board.claim(db, task_id, lock=DEMO_LOCK, now=started)
    board.complete(db, task_id, run_id=change.run_id, summary=summary,
                   now=started + int(hours * HOUR))
