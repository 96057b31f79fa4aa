"""A small demo sprint, so a fresh install has something to show.

:func:`seed_demo` fills an *empty* board with ten tasks of a made-up brokerage
sprint in three phases (``[P1]``..``[P3]`` title tags), with dependencies,
assignees and priorities: two tasks done (with their runs), one ready, one
blocked on a human, the rest waiting in ``todo`` for their parents. Everything
goes through :mod:`sparkops.board.transitions`, so the events and runs look exactly like a
real sprint's. A board that already has a task (archived ones included) is left
alone.

``up --demo`` keeps that sprint alive (a *living demo*, on the demo's own board
only: :func:`is_demo_board`): the :class:`Planner` adds work as tasks finish and
asks a person a question now and then, the demo agent works (and sometimes fails),
a simulated vLLM answers (:mod:`sparkops.demo.vllm`) and a simulated GB10 shows on
the GPU page (:func:`sparkops.meters.nvml_fake.demo_gb10`).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from sqlalchemy import select

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.clock import epoch
from sparkops.storage.db import Database
from sparkops.storage.schema import tasks

log = logging.getLogger(__name__)

HOUR = 3600
DEMO_LOCK = "demo:0"  # the claim lock of the demo's made-up runs (``host:pid``)
DEMO_CREATOR = "sparkops-demo"  # ``created_by`` of the demo sprint's tasks


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
    start = ts - 5 * HOUR  # the sprint began five hours ago; its last completion an hour ago
    ids: dict[str, str] = {}
    for n, task in enumerate(DEMO_TASKS):
        ids[task.key] = board.create_task(
            db, task.title, body=task.body, assignee=task.assignee, priority=task.priority,
            parents=[ids[p] for p in task.parents], created_by=DEMO_CREATOR,
            idempotency_key=f"sparkops-demo:{task.key}", now=start + n * 60,
        )

    _work(db, ids["repo"], started=start + 1 * HOUR, hours=1,
          summary="Repository, CI workflow and pre-commit hooks in place; 4 tests pass.")
    _work(db, ids["schema"], started=start + 2 * HOUR, hours=2,
          summary="orders, accounts and fills tables with migrations; 18 tests pass.")
    board.block(db, ids["feed"], kind="needs_input",
                reason="Needs an API key for the market data vendor; ask the operator.",
                now=start + 4 * HOUR + 15 * 60)
    return [ids[task.key] for task in DEMO_TASKS]


def is_demo_board(db: Database) -> bool:
    """Was this board made by :func:`seed_demo` (the living demo may add work to it)?"""
    with db.read() as conn:
        return conn.execute(select(tasks.c.id).where(tasks.c.created_by == DEMO_CREATOR).limit(1)).first() is not None


def _work(db: Database, task_id: str, *, started: int, hours: float, summary: str) -> None:
    """A finished run: claim at ``started``, complete ``hours`` later."""
    change = board.claim(db, task_id, lock=DEMO_LOCK, now=started)
    board.complete(db, task_id, run_id=change.run_id, summary=summary,
                   now=started + int(hours * HOUR))


# -- the living demo: new work arrives, some of it needs a person -----------------------

#: The planner's backlog: (phase tag, title, assignee, priority), added in turn, round after round.
BACKLOG: tuple[tuple[str, str, str, int], ...] = (
    ("P3", "Rate limiter for the order endpoints", "builder", 2),
    ("P3", "Audit log of order state changes", "builder", 1),
    ("P3", "Alert when the matching queue backs up", "integrator", 1),
    ("P4", "Settlement batch job (T+1)", "builder", 2),
    ("P4", "Reconcile fills against the exchange report", "tester", 2),
    ("P4", "Fee schedule per account tier", "builder", 1),
    ("P4", "Dashboard: P&L per account", "frontend", 1),
    ("P4", "Chaos test: kill the matching engine mid-order", "tester", 0),
)
#: ``created_by`` of the planner's tasks.
PLANNER = "sparkops-demo-planner"
#: A question the planner attaches to some new tasks: they need a person first.
QUESTIONS = (
    "Which exchange calendar applies (NYSE or LSE)? Needs the product owner.",
    "Needs credentials for the staging exchange sandbox; ask the operator.",
    "Two specs disagree on rounding (banker's or half-up); needs a decision.",
)


@dataclass
class Planner:
    """The living demo's planner (``python -m sparkops demo-planner``, started by
    ``up --demo``): it keeps about ``target_open`` tasks open by adding work from
    :data:`BACKLOG`, asks a person a question on one task in ``question_every``
    (blocked ``needs_input``), and answers those questions ``answer_after`` seconds
    later (a comment, then unblock) as the operator would. The demo sprint's own
    blocked task is left for the real operator. :meth:`step` is one look at the
    board, with the clock as a parameter."""

    target_open: int = 8
    question_every: int = 4
    answer_after: float = 240.0
    added: int = 0

    def step(self, db: Database, *, now: float | None = None) -> list[str]:
        """One pass: what it did, in words."""
        ts = epoch(now)
        done: list[str] = []
        asked = [t["id"] for t in queries.list_tasks(db, status="blocked", limit=500) if t["created_by"] == PLANNER]
        with db.read() as conn:
            notes = queries.block_notes(conn, asked)
        for task_id in asked:
            blocked_at = notes.get(task_id, {}).get("blocked_at")
            if blocked_at is not None and ts - blocked_at >= self.answer_after:
                board.comment(db, task_id, "Answered: go ahead with the first option.", author="operator (demo)",
                              now=ts)
                board.unblock(db, task_id, now=ts)
                done.append(f"answered {task_id}")
        open_now = queries.board_stats(db, now=ts)["open"]
        while open_now < self.target_open:
            phase, title, assignee, priority = BACKLOG[self.added % len(BACKLOG)]
            round_ = self.added // len(BACKLOG) + 1
            task_id = board.create_task(db, f"[{phase}] {title}" + (f" (round {round_})" if round_ > 1 else ""),
                                        assignee=assignee, priority=priority, created_by=PLANNER, now=ts,
                                        body="Added by the demo planner while the sprint runs.")
            self.added += 1
            open_now += 1
            if self.added % self.question_every == 0:
                board.block(db, task_id, kind="needs_input", reason=QUESTIONS[self.added % len(QUESTIONS)], now=ts)
                done.append(f"added {task_id}, blocked on a question")
            else:
                done.append(f"added {task_id}")
        return done


def run_planner(db: Database, stop: threading.Event, *, every: float = 20.0, planner: Planner | None = None) -> None:
    """The planner's loop, until ``stop``: a step every ``every`` seconds."""
    planner = planner or Planner()
    while not stop.is_set():
        try:
            for line in planner.step(db):
                log.info("demo planner: %s", line)
        except Exception as exc:  # noqa: BLE001 - a demo keeps going (a locked moment, an operator's edit)
            log.warning("demo planner: %s", exc)
        stop.wait(every)
