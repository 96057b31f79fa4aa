"""Where the GPU went: each run's spend with its task's phase, assignee and outcome,
and the sums a sprint review asks for.

The runs are the board's (every run that started in the window, or is still open);
their usage is the ops database's (:mod:`sparkops.meters.ledger`), priced with the
``usage.*`` settings (:class:`sparkops.meters.spend.Prices`). A run that was not
metered is a row with its figures unknown (NaN in the frame, "not measured" in
words), so a sum says how many of its runs it could count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import pandas as pd
from sqlalchemy import or_, select

from sparkops.board.model import Status, host_of_lock
from sparkops.core.clock import epoch
from sparkops.meters import ledger
from sparkops.meters.spend import Prices, Spend, total
from sparkops.storage.db import Database
from sparkops.storage.schema import task_runs, tasks

NO_PHASE = "(none)"
NO_ASSIGNEE = "(unassigned)"
RUNNING = "running"
#: The spend columns of a frame, summed by :func:`by`.
FIGURES = ("prompt_tokens", "generation_tokens", "tokens", "requests", "energy_wh", "gpu_seconds",
           "energy_cost", "paid", "api_cost", "cost")
COUNTS = ("runs", "metered", "estimated", "reported")
#: The keys the review sums by.
KEYS = ("phase", "assignee", "outcome", "host")
NO_HOST = "(unknown host)"


@dataclass(frozen=True)
class Costs:
    """The runs of a window with their spend (``frame``), and their total."""

    frame: pd.DataFrame
    total: Spend
    prices: Prices
    since: int

    @property
    def measured_any(self) -> bool:
        return self.total.metered > 0


def compute(board_db: Database, ops: Database, prices: Prices, *, phase_of: Mapping[str, str],
            since: float, now: float | None = None) -> Costs:
    """Every run that started at ``since`` or later (or is still open) with its spend."""
    since = epoch(since)
    r, t = task_runs.c, tasks.c
    query = (select(r.id, r.task_id, t.title, t.assignee, t.status, t.completed_at, r.outcome, r.started_at,
                    r.ended_at, r.claim_lock)
             .select_from(task_runs.join(tasks, tasks.c.id == r.task_id))
             .where(or_(r.started_at >= since, r.ended_at.is_(None))).order_by(r.id))
    with board_db.read() as conn:
        runs = conn.execute(query).all()
    usage = ledger.of_runs(ops, [row.id for row in runs])
    hosts = ledger.hosts_of(ops, list(usage))
    rows, spends = [], []
    for row in runs:
        spend = Spend.of(usage.get(int(row.id)), prices)
        spends.append(spend)
        figures = spend.as_dict()
        rows.append({
            "run_id": int(row.id), "task_id": row.task_id, "title": row.title,
            "phase": phase_of.get(row.task_id, NO_PHASE), "assignee": row.assignee or NO_ASSIGNEE,
            "outcome": row.outcome or (RUNNING if row.ended_at is None else "ended"),
            "host": hosts.get(int(row.id)) or host_of_lock(row.claim_lock) or NO_HOST,
            "task_status": row.status, "started_at": row.started_at, "ended_at": row.ended_at,
            "task_completed_at": row.completed_at if row.status == Status.DONE else None,
            **{k: figures[k] for k in (*FIGURES, *COUNTS)},
        })
    columns = ["run_id", "task_id", "title", "phase", "assignee", "outcome", "host", "task_status", "started_at",
               "ended_at", "task_completed_at", *FIGURES, *COUNTS]
    frame = pd.DataFrame(rows, columns=columns)
    for name in FIGURES:
        frame[name] = pd.to_numeric(frame[name], errors="coerce").astype("float64")
    return Costs(frame=frame, total=total(spends), prices=prices, since=since)


def by(costs: Costs, key: str) -> pd.DataFrame:
    """The window's spend summed by ``key`` (phase, assignee, outcome or host), the
    costliest first; a sum of only unknown figures stays unknown (NaN)."""
    if key not in KEYS:
        raise ValueError(f"costs are summed by one of {', '.join(KEYS)}, not {key!r}")
    frame = costs.frame
    if frame.empty:
        return pd.DataFrame(columns=[key, *COUNTS, *FIGURES])
    grouped = frame.groupby(key, sort=False)
    summed = grouped[list(FIGURES)].sum(min_count=1).join(grouped[list(COUNTS)].sum()).reset_index()
    return summed.sort_values(_rank(costs), ascending=False, na_position="last", kind="stable") \
        .reset_index(drop=True)[[key, *COUNTS, *FIGURES]]


def most_expensive(costs: Costs, n: int = 10) -> pd.DataFrame:
    """The ``n`` tasks that spent most in the window (all their runs, retries
    included), by cost where there is a price, else by tokens, else by energy."""
    frame = costs.frame
    if frame.empty:
        return pd.DataFrame(columns=["task_id", "title", "phase", "assignee", *COUNTS, *FIGURES])
    grouped = frame.groupby("task_id", sort=False)
    summed = grouped[list(FIGURES)].sum(min_count=1).join(grouped[list(COUNTS)].sum())
    summed = summed.join(grouped[["title", "phase", "assignee"]].first()).reset_index()
    rank = _rank(costs)
    summed = summed[summed[rank].notna()]
    return summed.sort_values([rank, "task_id"], ascending=[False, True], kind="stable").head(n) \
        .reset_index(drop=True)[["task_id", "title", "phase", "assignee", *COUNTS, *FIGURES]]


def tokens_per_completed_task(costs: Costs, bucket_seconds: int = 86400) -> pd.DataFrame:
    """For each day (``bucket_seconds``) in which tasks were completed: the tokens
    their runs used (retries included), per completed task. ``tasks`` counts the
    completed tasks whose tokens are known."""
    done = costs.frame[costs.frame["task_completed_at"].notna()]
    columns = ["bucket", "tasks", "tokens", "tokens_per_task"]
    if done.empty:
        return pd.DataFrame(columns=columns)
    per_task = done.groupby("task_id").agg(completed_at=("task_completed_at", "first"),
                                            tokens=("tokens", lambda s: s.sum(min_count=1)))
    per_task = per_task[per_task["tokens"].notna()]
    if per_task.empty:
        return pd.DataFrame(columns=columns)
    per_task["bucket"] = (per_task["completed_at"].astype("int64") // bucket_seconds) * bucket_seconds
    found = per_task.groupby("bucket").agg(tasks=("tokens", "size"), tokens=("tokens", "sum")).reset_index()
    found["tokens_per_task"] = found["tokens"] / found["tasks"]
    return found[columns]


def task_spend(ops: Database, prices: Prices, task_ids: list[str]) -> dict[str, Spend]:
    """Each task's spend over all its metered runs (retries included), for the board."""
    return {task_id: total(Spend.of(u, prices) for u in runs.values())
            for task_id, runs in ledger.of_tasks(ops, task_ids).items()}


def _rank(costs: Costs) -> str:
    """What "most" means: money where a price is set, else tokens, else energy."""
    if costs.total.cost is not None:
        return "cost"
    if costs.total.tokens is not None:
        return "tokens"
    return "energy_wh"

