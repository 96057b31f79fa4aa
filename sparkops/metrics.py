"""Sprint metrics from the board: the numbers behind the review, the pages and the CLI.

:func:`compute` reads the board in one read transaction (one consistent snapshot)
and returns a :class:`Metrics`: plain dataclasses, dicts and pandas DataFrames,
JSON-able through :meth:`Metrics.as_dict`, with :meth:`Metrics.summary_lines` for a
report. The clock is a parameter (``now``, epoch seconds).

How it stays bounded: SQL selects only the columns it needs and does the
counting (``GROUP BY`` status, hour, day, outcome, task) on the server, with
SQLAlchemy Core that renders the same on SQLite and PostgreSQL. Rows come back
only where the answer is per task: the tasks completed in the window (their lead
and cycle times), the blocked tasks, the open tasks run too often, and, when
``phase_of`` is given, the id and status of every live task. ``task_events`` is
read only for the blocked tasks (their latest ``blocked``/``gave_up`` event).

Time is UTC epoch seconds throughout. An hour bucket is ``ts // 3600``, a day
bucket ``ts // 86400``; buckets are shown as ISO-8601 UTC (``...Z``) and local
time is never consulted.

Definitions:

* **Window**: ``[now - window_hours*3600, now]``, both ends included. Rows dated
  after ``now`` are ignored by the time-based metrics. Statuses have no history, so
  the counts, the blocked and ready tasks and the phases' open work are the board
  as it is; ``now`` only dates their ages.
* **Completion**: a task in ``done`` or ``archived`` whose ``completed_at`` is set.
  Throughput counts completions in the window; its mean per hour is completions /
  ``window_hours``. Hour and day tables cover every UTC hour/day the window
  touches, zeros included.
* **Lead time**: ``completed_at - created_at``; **cycle time**: ``completed_at -
  started_at`` (``tasks.started_at`` is the first claim), for the completions in
  the window; a task never started has no cycle time, and a negative duration
  (clock skew from another writer) is left out. **Median and p90** are numpy's
  default linear interpolation: sort the n values, p90 sits at position
  ``0.9 * (n - 1)`` (0-based), interpolated between its neighbours.
* **Runs per task**: the runs *started in the window*, per task that has at least
  one; mean, max and the distribution (how many tasks had 1, 2, ... runs).
  **Retries**: runs started in the window that were not their task's first run
  ever (the first run is the earliest ``started_at``), so a rerun of a task first
  tried before the window counts as a retry.
* **Outcomes**: runs that *ended* in the window, by ``outcome`` (``unknown`` when
  empty); the failure rate is the share whose outcome is a failure (the outcomes
  of ``board.fail`` and ``gave_up``). Blocked, reclaimed and completed runs are
  not failures.
* **WIP**: per UTC hour of the window, ``open_runs``: the runs open at the hour's
  last second (``now`` for the current hour), i.e. started by then and not ended
  by then, the board's concurrency sampled hourly; and ``active_runs``: the runs
  open at some moment of the hour inside the window (short runs one after another
  all count). A run with no end stays open until ``now``.
* **Blocked tasks**: tasks in ``blocked``. Age counts from the latest ``blocked``
  or ``gave_up`` event, else the last run's end, else ``created_at``. Reason:
  ``last_failure_error``, else that event's ``reason`` (or ``error``), else the
  last run's summary, else its error.
* **Burn-up**: per UTC day of the window, at the day's end (``now`` for today):
  ``done`` = completions so far; ``scope`` = tasks created so far, less the
  cancelled ones (archived without ever completing). It is today's view of the
  past: a task cancelled later leaves the scope of every day.
* **ETA per phase**: open tasks of the phase (on the board, not ``done`` and not
  ``archived``) divided by the board's throughput per hour in the window. None
  when the throughput is 0 and work is open; 0 hours when nothing is open. Each
  phase is estimated on its own, as if the whole team worked on it.
* **Stuck signals**: *ready idle* when ready tasks exist and the latest run start
  (any task) is more than ``stuck_ready_minutes`` ago, or no run ever started;
  *over max runs*: open tasks (not done/archived) with more than ``max_reruns``
  runs in all; *no completion* when open work exists (board_stats' ``open``) and
  the latest completion (else the first task's creation) is more than
  ``no_completion_hours`` ago.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, not_, or_, select
from sqlalchemy.engine import Connection

from sparkops.board import FAILURE_OUTCOMES, FINISHED, Outcome, Status
from sparkops.db import Database
from sparkops.errors import InvalidInput
from sparkops.schema import task_events, task_runs, tasks

log = logging.getLogger(__name__)

HOUR = 3600
DAY = 86400

#: Run outcomes counted as failures in the failure rate.
FAILED_OUTCOMES = frozenset({str(o) for o in FAILURE_OUTCOMES} | {str(Outcome.GAVE_UP)})
#: A task in one of these with ``completed_at`` set was delivered.
DELIVERED = (str(Status.DONE), str(Status.ARCHIVED))
#: Event kinds that put a task in ``blocked``.
BLOCK_EVENTS = ("blocked", "gave_up")
#: Default size of the task lists (blocked, over max runs); counts are always exact.
LIST_LIMIT = 100


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC (``2026-03-29T01:00:00Z``), for display only."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def human_seconds(seconds: float | None) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3.2 h``, ``2.1 d``; ``n/a`` for None."""
    if seconds is None:
        return "n/a"
    s = float(seconds)
    if abs(s) < 60:
        return f"{s:.0f} s"
    if abs(s) < HOUR:
        return f"{s / 60:.0f} min"
    if abs(s) < 2 * DAY:
        return f"{s / HOUR:.1f} h"
    return f"{s / DAY:.1f} d"


# -- the result ------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    start: int  # epoch seconds, included
    end: int  # = now, included
    hours: float

    def as_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "hours": self.hours,
                "start_iso": iso_utc(self.start), "end_iso": iso_utc(self.end)}


@dataclass(frozen=True)
class Durations:
    """Lead or cycle times in seconds; ``seconds`` is the raw series, sorted (one column)."""

    count: int
    median: float | None
    p90: float | None
    seconds: pd.DataFrame

    def as_dict(self, *, series: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"count": self.count, "median": self.median, "p90": self.p90}
        if series:
            out["seconds"] = [int(v) for v in self.seconds["seconds"]]
        return out


@dataclass(frozen=True)
class Throughput:
    completed: int  # completions in the window
    per_hour: float  # completed / window hours
    hourly: pd.DataFrame  # bucket (ISO UTC), start (epoch), count
    daily: pd.DataFrame  # bucket (ISO UTC), start (epoch), count

    def as_dict(self) -> dict[str, Any]:
        return {"completed": self.completed, "per_hour": self.per_hour,
                "hourly": records(self.hourly), "daily": records(self.daily)}


@dataclass(frozen=True)
class RunStats:
    """Runs started in the window, per task that has one (see the module doc)."""

    runs: int  # runs started in the window
    tasks: int  # tasks with at least one of them
    mean: float | None  # runs per task
    max: int | None
    distribution: pd.DataFrame  # runs, tasks: how many tasks had that many runs
    retries: int  # runs that were not their task's first run ever
    retry_rate: float | None  # retries / runs

    def as_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "tasks": self.tasks, "mean": self.mean, "max": self.max,
                "distribution": records(self.distribution), "retries": self.retries,
                "retry_rate": self.retry_rate}


@dataclass(frozen=True)
class Outcomes:
    """Runs that ended in the window."""

    ended: int
    by_outcome: pd.DataFrame  # outcome, count, share (largest first)
    failures: int
    failure_rate: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"ended": self.ended, "by_outcome": records(self.by_outcome),
                "failures": self.failures, "failure_rate": self.failure_rate}


@dataclass(frozen=True)
class Stuck:
    ready_idle: dict[str, Any]
    over_max_runs: dict[str, Any]  # active, count, max_reruns, tasks (DataFrame)
    no_completion: dict[str, Any]

    @property
    def any(self) -> bool:
        return bool(self.ready_idle["active"] or self.over_max_runs["active"]
                    or self.no_completion["active"])

    def as_dict(self) -> dict[str, Any]:
        over = dict(self.over_max_runs)
        over["tasks"] = records(over["tasks"])
        return {"any": self.any, "ready_idle": dict(self.ready_idle), "over_max_runs": over,
                "no_completion": dict(self.no_completion)}


@dataclass(frozen=True)
class Metrics:
    now: int
    window: Window
    counts: dict[str, Any]  # by_status, by_assignee, archived, open, total, active_runs
    throughput: Throughput
    lead_time: Durations
    cycle_time: Durations
    runs: RunStats
    outcomes: Outcomes
    wip: pd.DataFrame  # bucket, start, open_runs (at the hour's end), active_runs (during it)
    blocked: pd.DataFrame  # id, title, age_seconds, since, reason (oldest first)
    blocked_count: int
    oldest_ready: dict[str, Any] | None  # id, title, created_at, age_seconds
    burnup: pd.DataFrame  # bucket, start, done, scope
    phases: pd.DataFrame | None  # phase, tasks, done, open, eta_hours, eta; None without phase_of
    stuck: Stuck
    settings: dict[str, Any] = field(default_factory=dict)

    def as_dict(self, *, series: bool = True) -> dict[str, Any]:
        """Everything as JSON-able values; ``series=False`` leaves out the raw lead
        and cycle time series (the histograms), which grow with the window."""
        return {
            "now": self.now,
            "now_iso": iso_utc(self.now),
            "window": self.window.as_dict(),
            "settings": dict(self.settings),
            "counts": self.counts,
            "throughput": self.throughput.as_dict(),
            "lead_time": self.lead_time.as_dict(series=series),
            "cycle_time": self.cycle_time.as_dict(series=series),
            "runs": self.runs.as_dict(),
            "outcomes": self.outcomes.as_dict(),
            "wip": records(self.wip),
            "blocked": records(self.blocked),
            "blocked_count": self.blocked_count,
            "oldest_ready": self.oldest_ready,
            "burnup": records(self.burnup),
            "phases": None if self.phases is None else records(self.phases),
            "stuck": self.stuck.as_dict(),
        }

    def summary_lines(self, *, risks: bool = True) -> list[str]:
        """A few lines for people (the review's deterministic summary), ending with
        :meth:`risk_lines` unless ``risks=False``."""
        w, tp = self.window, self.throughput
        lines = [(
            f"Window {_hours(w.hours)} ({iso_utc(w.start)} to {iso_utc(w.end)}): "
            f"{tp.completed} task{'' if tp.completed == 1 else 's'} completed, "
            f"{tp.per_hour:.2f}/h; {self.counts['open']} open, "
            f"{self.counts['by_status'].get(Status.DONE, 0)} done on the board."
        )]
        if self.lead_time.count:
            cycle = (f"cycle time median {human_seconds(self.cycle_time.median)}, "
                     f"p90 {human_seconds(self.cycle_time.p90)}" if self.cycle_time.count
                     else "no cycle time")
            lines.append(f"Lead time median {human_seconds(self.lead_time.median)}, p90 "
                         f"{human_seconds(self.lead_time.p90)}; {cycle}.")
        r, o = self.runs, self.outcomes
        if r.runs or o.ended:
            worst = ", ".join(f"{row.outcome} {row.count}" for row in o.by_outcome.itertuples()
                              if row.outcome in FAILED_OUTCOMES)
            lines.append(
                f"Runs: {r.runs} started by {r.tasks} tasks (mean {_num(r.mean)}, max {r.max or 0}), "
                f"{r.retries} retries; failure rate {_pct(o.failure_rate)} of {o.ended} ended"
                + (f" ({worst})." if worst else "."))
        if len(self.wip):
            lines.append(f"WIP: {int(self.wip['open_runs'].iloc[-1])} runs open now, at most "
                         f"{int(self.wip['open_runs'].max())} at an hour's end in the window.")
        if self.blocked_count:
            top = self.blocked.iloc[0]
            lines.append(f"Blocked: {self.blocked_count} task{'' if self.blocked_count == 1 else 's'}, "
                         f"oldest {top['id']} for {human_seconds(top['age_seconds'])}"
                         + (f" ({_short(top['reason'])})." if top["reason"] else "."))
        if self.oldest_ready:
            lines.append(f"Oldest ready task: {self.oldest_ready['id']}, waiting "
                         f"{human_seconds(self.oldest_ready['age_seconds'])}.")
        if self.phases is not None and len(self.phases):
            parts = []
            for row in self.phases.itertuples():
                if row.open == 0:
                    parts.append(f"{row.phase}: done")
                elif row.eta_hours is None or pd.isna(row.eta_hours):
                    parts.append(f"{row.phase}: {row.open} open, no ETA (no throughput)")
                else:
                    parts.append(f"{row.phase}: {row.open} open, ETA {_hours(row.eta_hours)} ({row.eta})")
            lines.append("Phases: " + "; ".join(parts) + ".")
        return lines + (self.risk_lines() if risks else [])

    def risk_lines(self) -> list[str]:
        """One line per active stuck signal (empty when none)."""
        lines: list[str] = []
        s = self.stuck
        if s.ready_idle["active"]:
            since = s.ready_idle["idle_seconds"]
            lines.append(f"Stuck: {s.ready_idle['ready_tasks']} ready tasks but "
                         + ("no run ever started." if since is None
                            else f"no run started for {human_seconds(since)}."))
        if s.over_max_runs["active"]:
            ids = ", ".join(f"{t} ({n})" for t, n in
                            zip(s.over_max_runs["tasks"]["id"][:5], s.over_max_runs["tasks"]["runs"][:5]))
            lines.append(f"Stuck: {s.over_max_runs['count']} open tasks run more than "
                         f"{s.over_max_runs['max_reruns']} times: {ids}"
                         + (" ..." if s.over_max_runs["count"] > 5 else "") + ".")
        if s.no_completion["active"]:
            lines.append(f"Stuck: open work but no task completed for "
                         f"{human_seconds(s.no_completion['idle_seconds'])}.")
        return lines


# -- computing -------------------------------------------------------------------------


def compute(
    db: Database,
    *,
    now: float,
    window_hours: float,
    phase_of: Mapping[str, str] | None = None,
    stuck_ready_minutes: float = 30,
    max_reruns: int = 3,
    no_completion_hours: float = 4,
    list_limit: int | None = LIST_LIMIT,
) -> Metrics:
    """All sprint metrics for the window ``[now - window_hours, now]`` (see the module doc).

    ``phase_of`` maps task id -> phase name (None: no phases, ``phases`` is None).
    ``list_limit`` caps the blocked and over-max-runs task lists (None: no cap); their
    counts are always exact.
    """
    if window_hours is None or not (window_hours > 0) or math.isinf(window_hours):
        raise InvalidInput(f"review.window_hours must be a positive number of hours, got {window_hours!r}")
    if max_reruns is None or max_reruns < 0:
        raise InvalidInput(f"review.max_reruns must be >= 0, got {max_reruns!r}")
    began = time.perf_counter()
    now = int(now)
    window = Window(start=now - round(window_hours * HOUR), end=now, hours=float(window_hours))
    with db.read() as conn:
        counts = _counts(conn)
        completed, lead, cycle = _completions(conn, window)
        run_stats, latest_start = _runs_per_task(conn, window)
        outcomes, ends_by_hour = _outcomes(conn, window)
        wip, active_runs = _wip(conn, window, ends_by_hour)
        blocked, blocked_count = _blocked(conn, now, counts["by_status"].get(Status.BLOCKED, 0),
                                          list_limit)
        oldest_ready = _oldest_ready(conn, now)
        burnup, last_completed, first_created = _burnup(conn, window)
        over = _over_max_runs(conn, now, max_reruns, list_limit)
        statuses = _live_statuses(conn) if phase_of is not None else None
    counts["active_runs"] = active_runs
    throughput = _throughput(window, completed)
    phases = None if phase_of is None else _phases(phase_of, statuses or [], throughput.per_hour, now)
    stuck = _stuck(counts, now, latest_start, last_completed, first_created, over,
                   stuck_ready_minutes=stuck_ready_minutes, max_reruns=max_reruns,
                   no_completion_hours=no_completion_hours)
    log.debug("metrics for %s h to %s computed in %.3f s", window_hours, iso_utc(now),
              time.perf_counter() - began)
    return Metrics(
        now=now, window=window, counts=counts, throughput=throughput,
        lead_time=_durations(lead), cycle_time=_durations(cycle), runs=run_stats,
        outcomes=outcomes, wip=wip, blocked=blocked, blocked_count=blocked_count,
        oldest_ready=oldest_ready, burnup=burnup, phases=phases, stuck=stuck,
        settings={"window_hours": float(window_hours), "stuck_ready_minutes": stuck_ready_minutes,
                  "max_reruns": max_reruns, "no_completion_hours": no_completion_hours},
    )


def options_from(settings: Any) -> dict[str, Any]:
    """The ``review.*`` settings as keyword arguments of :func:`compute`."""
    return {
        "window_hours": settings["review.window_hours"],
        "stuck_ready_minutes": settings["review.stuck_ready_minutes"],
        "max_reruns": settings["review.max_reruns"],
        "no_completion_hours": settings["review.no_completion_hours"],
    }


# -- the queries -----------------------------------------------------------------------

_LIVE = tasks.c.status != Status.ARCHIVED
_DELIVERED = and_(tasks.c.status.in_(DELIVERED), tasks.c.completed_at.is_not(None))
#: archived without ever completing: out of the burn-up's scope
_CANCELLED = and_(tasks.c.status == Status.ARCHIVED, tasks.c.completed_at.is_(None))


def _counts(conn: Connection) -> dict[str, Any]:
    """Per status and per assignee as ``queries.board_stats`` (archived apart)."""
    by_status = {s: int(n) for s, n in conn.execute(
        select(tasks.c.status, func.count()).where(_LIVE)
        .group_by(tasks.c.status).order_by(tasks.c.status))}
    by_assignee: dict[str, dict[str, int]] = {}
    for assignee, status, n in conn.execute(
            select(tasks.c.assignee, tasks.c.status, func.count())
            .where(_LIVE, tasks.c.assignee.is_not(None))
            .group_by(tasks.c.assignee, tasks.c.status)
            .order_by(tasks.c.assignee, tasks.c.status)):
        by_assignee.setdefault(assignee, {})[status] = int(n)
    archived = int(conn.execute(select(func.count()).select_from(tasks).where(~_LIVE)).scalar() or 0)
    return {
        "by_status": by_status,
        "by_assignee": by_assignee,
        "archived": archived,
        "open": sum(n for s, n in by_status.items() if s not in FINISHED),
        "total": sum(by_status.values()) + archived,
    }


def _columns(rows: list, n: int, dtype: Any = np.float64) -> list[np.ndarray]:
    """Row tuples as ``n`` numpy columns (None becomes NaN for floats)."""
    if not rows:
        return [np.empty(0, dtype=dtype) for _ in range(n)]
    return [np.asarray(col, dtype=dtype) for col in zip(*rows)]


def _completions(conn: Connection, w: Window) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """completed_at, lead and cycle times (seconds) of the completions in the window."""
    rows = conn.execute(
        select(tasks.c.completed_at, tasks.c.created_at, tasks.c.started_at)
        .where(_DELIVERED, tasks.c.completed_at >= w.start, tasks.c.completed_at <= w.end)
    ).all()
    completed, created, started = _columns(rows, 3)
    lead = completed - created
    cycle = completed - started  # NaN where never started
    lead = lead[lead >= 0]
    cycle = cycle[cycle >= 0]
    return completed.astype(np.int64), lead.astype(np.int64), cycle.astype(np.int64)


def _runs_per_task(conn: Connection, w: Window) -> tuple[RunStats, int | None]:
    """Runs started in the window per task, retries, and the latest run start ever."""
    r = task_runs.c
    per_task = (
        select(func.sum(case((r.started_at >= w.start, 1), else_=0)).label("n"),
               case((func.min(r.started_at) >= w.start, 1), else_=0).label("first_in"),
               func.max(r.started_at).label("last"))
        .where(r.started_at <= w.end)
        .group_by(r.task_id)
        .subquery()
    )
    rows = conn.execute(
        select(per_task.c.n, per_task.c.first_in, func.count(), func.max(per_task.c.last))
        .group_by(per_task.c.n, per_task.c.first_in)
    ).all()
    dist: Counter[int] = Counter()
    first_runs = 0
    latest: int | None = None
    for n, first_in, n_tasks, last in rows:
        n, n_tasks = int(n or 0), int(n_tasks)
        if last is not None:
            latest = int(last) if latest is None else max(latest, int(last))
        if n > 0:
            dist[n] += n_tasks
            if int(first_in):
                first_runs += n_tasks
    runs = sum(n * k for n, k in dist.items())
    n_tasks = sum(dist.values())
    retries = runs - first_runs
    distribution = pd.DataFrame({"runs": sorted(dist), "tasks": [dist[n] for n in sorted(dist)]},
                                columns=["runs", "tasks"]).astype("int64")
    return RunStats(
        runs=runs, tasks=n_tasks, mean=(runs / n_tasks) if n_tasks else None,
        max=max(dist) if dist else None, distribution=distribution, retries=retries,
        retry_rate=(retries / runs) if runs else None,
    ), latest


def _outcomes(conn: Connection, w: Window) -> tuple[Outcomes, dict[int, int]]:
    """Runs ended in the window by outcome, and their ends per hour (for WIP)."""
    r = task_runs.c
    ended = (select((r.ended_at // HOUR).label("hour"), r.outcome)
             .where(r.ended_at >= w.start, r.ended_at <= w.end).subquery())
    by_outcome: Counter[str] = Counter()
    ends_by_hour: Counter[int] = Counter()
    for hour, outcome, n in conn.execute(
            select(ended.c.hour, ended.c.outcome, func.count())
            .group_by(ended.c.hour, ended.c.outcome)):
        by_outcome[outcome or "unknown"] += int(n)
        ends_by_hour[int(hour)] += int(n)
    total = sum(by_outcome.values())
    ordered = sorted(by_outcome.items(), key=lambda kv: (-kv[1], kv[0]))
    table = pd.DataFrame({
        "outcome": pd.Series([k for k, _ in ordered], dtype=object),
        "count": pd.Series([v for _, v in ordered], dtype="int64"),
        "share": pd.Series([v / total for _, v in ordered], dtype="float64"),
    })
    failures = sum(v for k, v in by_outcome.items() if k in FAILED_OUTCOMES)
    return Outcomes(ended=total, by_outcome=table, failures=failures,
                    failure_rate=(failures / total) if total else None), ends_by_hour


def _hours_of(w: Window) -> np.ndarray:
    return np.arange(w.start // HOUR, w.end // HOUR + 1, dtype=np.int64)


def _wip(conn: Connection, w: Window, ends_by_hour: Mapping[int, int]) -> tuple[pd.DataFrame, int]:
    """Open runs per hour of the window (at its end; during it), and the runs with no end."""
    r = task_runs.c
    hours = _hours_of(w)
    first = int(hours[0])
    # Runs that overlap the window; a start before it counts in its first hour.
    started = (
        select(case((r.started_at < w.start, first), else_=r.started_at // HOUR).label("hour"),
               case((r.ended_at.is_(None), 1), else_=0).label("no_end"))
        .where(r.started_at <= w.end, or_(r.ended_at.is_(None), r.ended_at >= w.start))
        .subquery()
    )
    starts = np.zeros(len(hours), dtype=np.int64)
    active = 0
    for hour, n, no_end in conn.execute(
            select(started.c.hour, func.count(), func.sum(started.c.no_end)).group_by(started.c.hour)):
        starts[int(hour) - first] += int(n)
        active += int(no_end or 0)
    ends = np.zeros(len(hours), dtype=np.int64)
    for hour, n in ends_by_hour.items():
        ends[hour - first] += n
    started_by, ended_by = np.cumsum(starts), np.cumsum(ends)
    # at the end of hour h: started by then - ended by then
    open_runs = started_by - ended_by
    # during hour h: started by its end - ended before its start
    active_runs = started_by - np.concatenate(([0], ended_by[:-1]))
    return _buckets(hours * HOUR, open_runs=open_runs, active_runs=active_runs), active


def _blocked(conn: Connection, now: int, expected: int,
             limit: int | None) -> tuple[pd.DataFrame, int]:
    """Blocked tasks with their age and reason, oldest first."""
    columns = ["id", "title", "age_seconds", "since", "reason"]
    if not expected:
        return _empty(columns, age_seconds="int64"), 0
    rows = conn.execute(
        select(tasks.c.id, tasks.c.title, tasks.c.created_at, tasks.c.last_failure_error)
        .where(tasks.c.status == Status.BLOCKED)).all()
    blocked_ids = select(tasks.c.id).where(tasks.c.status == Status.BLOCKED)
    e, r = task_events.c, task_runs.c
    latest_event = (
        select(e.task_id, e.created_at, e.payload,
               func.row_number().over(partition_by=e.task_id,
                                      order_by=(e.created_at.desc(), e.id.desc())).label("rn"))
        .where(e.kind.in_(BLOCK_EVENTS), e.task_id.in_(blocked_ids), e.created_at <= now)
        .subquery()
    )
    events = {tid: (at, payload) for tid, at, payload in conn.execute(
        select(latest_event.c.task_id, latest_event.c.created_at, latest_event.c.payload)
        .where(latest_event.c.rn == 1))}
    last_run = (
        select(r.task_id, r.ended_at, r.summary, r.error,
               func.row_number().over(partition_by=r.task_id, order_by=r.id.desc()).label("rn"))
        .where(r.task_id.in_(blocked_ids), r.started_at <= now)
        .subquery()
    )
    runs = {tid: (ended, summary, error) for tid, ended, summary, error in conn.execute(
        select(last_run.c.task_id, last_run.c.ended_at, last_run.c.summary, last_run.c.error)
        .where(last_run.c.rn == 1))}
    out = []
    for task_id, title, created_at, last_failure in rows:
        ev_at, payload = events.get(task_id, (None, None))
        run_end, summary, error = runs.get(task_id, (None, None, None))
        since = next(t for t in (ev_at, run_end, created_at) if t is not None)
        reason = _text(last_failure) or _payload_reason(payload) or _text(summary) or _text(error)
        out.append((task_id, title, now - int(since), iso_utc(since), reason))
    out.sort(key=lambda row: (-row[2], row[0]))
    if limit is not None:
        out = out[:limit]
    return _table(out, columns, ints=("age_seconds",)), len(rows)


def _oldest_ready(conn: Connection, now: int) -> dict[str, Any] | None:
    row = conn.execute(
        select(tasks.c.id, tasks.c.title, tasks.c.created_at)
        .where(tasks.c.status == Status.READY)
        .order_by(tasks.c.created_at, tasks.c.id).limit(1)).first()
    if row is None:
        return None
    return {"id": row.id, "title": row.title, "created_at": int(row.created_at),
            "age_seconds": now - int(row.created_at)}


def _burnup(conn: Connection, w: Window) -> tuple[pd.DataFrame, int | None, int | None]:
    """Cumulative done and scope at the end of each day of the window; also the
    latest completion and the first task's creation (for the stuck signals)."""
    t = tasks.c
    created = (select((t.created_at // DAY).label("day"), t.created_at)
               .where(t.created_at <= w.end, not_(_CANCELLED)).subquery())
    created_days = conn.execute(
        select(created.c.day, func.count(), func.min(created.c.created_at))
        .group_by(created.c.day)).all()
    done = (select((t.completed_at // DAY).label("day"), t.completed_at)
            .where(_DELIVERED, t.completed_at <= w.end).subquery())
    done_days = conn.execute(
        select(done.c.day, func.count(), func.max(done.c.completed_at)).group_by(done.c.day)).all()
    days = np.arange(w.start // DAY, w.end // DAY + 1, dtype=np.int64)
    first_created = min((int(r[2]) for r in created_days), default=None)
    last_completed = max((int(r[2]) for r in done_days), default=None)
    return (_buckets(days * DAY, done=_cumulative_at(done_days, days),
                     scope=_cumulative_at(created_days, days)),
            last_completed, first_created)


def _cumulative_at(day_counts: list, days: np.ndarray) -> np.ndarray:
    """For each day, the sum of the counts of that day and all days before it."""
    if not day_counts:
        return np.zeros(len(days), dtype=np.int64)
    keys, counts = _columns([(r[0], r[1]) for r in day_counts], 2, np.int64)
    order = np.argsort(keys)
    keys, cum = keys[order], np.cumsum(counts[order])
    idx = np.searchsorted(keys, days, side="right")
    return np.where(idx > 0, cum[np.maximum(idx - 1, 0)], 0).astype(np.int64)


def _over_max_runs(conn: Connection, now: int, max_reruns: int,
                   limit: int | None) -> tuple[pd.DataFrame, int]:
    """Open tasks with more than ``max_reruns`` runs in all, most runs first."""
    runs = func.count().label("runs")
    rows = conn.execute(
        select(tasks.c.id, tasks.c.title, tasks.c.status, runs)
        .select_from(tasks.join(task_runs, task_runs.c.task_id == tasks.c.id))
        .where(tasks.c.status.not_in([str(s) for s in FINISHED]), task_runs.c.started_at <= now)
        .group_by(tasks.c.id, tasks.c.title, tasks.c.status)
        .having(func.count() > max_reruns)).all()
    ordered = sorted(((tid, title, status, int(n)) for tid, title, status, n in rows),
                     key=lambda row: (-row[3], row[0]))
    if limit is not None:
        ordered = ordered[:limit]
    return _table(ordered, ["id", "title", "status", "runs"], ints=("runs",)), len(rows)


def _live_statuses(conn: Connection) -> list:
    """(id, status) of every task not archived (for the phases)."""
    return conn.execute(select(tasks.c.id, tasks.c.status).where(_LIVE)).all()


# -- from the rows to the answers ------------------------------------------------------


def _throughput(w: Window, completed: np.ndarray) -> Throughput:
    hours = _hours_of(w)
    days = np.arange(w.start // DAY, w.end // DAY + 1, dtype=np.int64)
    per_hour = np.bincount(completed // HOUR - hours[0], minlength=len(hours)) if len(completed) \
        else np.zeros(len(hours), dtype=np.int64)
    per_day = np.bincount(completed // DAY - days[0], minlength=len(days)) if len(completed) \
        else np.zeros(len(days), dtype=np.int64)
    return Throughput(completed=len(completed), per_hour=len(completed) / w.hours,
                      hourly=_buckets(hours * HOUR, count=per_hour),
                      daily=_buckets(days * DAY, count=per_day))


def _durations(values: np.ndarray) -> Durations:
    frame = pd.DataFrame({"seconds": np.sort(np.asarray(values, dtype=np.int64))})
    if not len(values):
        return Durations(count=0, median=None, p90=None, seconds=frame)
    median, p90 = np.percentile(values, [50, 90])  # linear interpolation
    return Durations(count=len(values), median=float(median), p90=float(p90), seconds=frame)


def _phases(phase_of: Mapping[str, str], statuses: list, per_hour: float, now: int) -> pd.DataFrame:
    total: Counter[str] = Counter()
    done: Counter[str] = Counter()
    for task_id, status in statuses:
        phase = phase_of.get(task_id)
        if phase is None:
            continue
        total[phase] += 1
        if status == Status.DONE:
            done[phase] += 1
    out = []
    for phase in sorted(total, key=_natural):
        open_ = total[phase] - done[phase]
        if open_ == 0:
            eta_hours: float | None = 0.0
        elif per_hour > 0:
            eta_hours = open_ / per_hour
        else:
            eta_hours = None
        eta = None if eta_hours is None else iso_utc(now + round(eta_hours * HOUR))
        out.append((str(phase), total[phase], done[phase], open_, eta_hours, eta))
    return _table(out, ["phase", "tasks", "done", "open", "eta_hours", "eta"],
                  ints=("tasks", "done", "open"))


def _stuck(counts: dict, now: int, latest_start: int | None, last_completed: int | None,
           first_created: int | None, over: tuple[pd.DataFrame, int], *,
           stuck_ready_minutes: float, max_reruns: int, no_completion_hours: float) -> Stuck:
    ready = counts["by_status"].get(Status.READY, 0)
    idle = None if latest_start is None else now - latest_start
    ready_limit = round(stuck_ready_minutes * 60)
    ready_idle = {
        "active": bool(ready and (idle is None or idle > ready_limit)),
        "ready_tasks": ready, "latest_start": latest_start, "latest_start_iso": iso_utc(latest_start),
        "idle_seconds": idle, "threshold_seconds": ready_limit,
    }
    table, count = over
    over_max = {"active": count > 0, "count": count, "max_reruns": max_reruns, "tasks": table}
    since = last_completed if last_completed is not None else first_created
    waited = None if since is None else now - since
    completion_limit = round(no_completion_hours * HOUR)
    no_completion = {
        "active": bool(counts["open"] and waited is not None and waited > completion_limit),
        "open_tasks": counts["open"], "last_completed_at": last_completed,
        "last_completed_iso": iso_utc(last_completed), "idle_seconds": waited,
        "threshold_seconds": completion_limit,
    }
    return Stuck(ready_idle=ready_idle, over_max_runs=over_max, no_completion=no_completion)


# -- small helpers ---------------------------------------------------------------------


def _buckets(starts: np.ndarray, **values: np.ndarray) -> pd.DataFrame:
    """A table of UTC buckets: bucket (ISO), start (epoch) and the value columns."""
    frame = pd.DataFrame({"bucket": pd.Series([iso_utc(s) for s in starts], dtype=object),
                          "start": np.asarray(starts, dtype=np.int64)})
    for name, column in values.items():
        frame[name] = np.asarray(column, dtype=np.int64)
    return frame


def _empty(columns: list[str], **dtypes: str) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=dtypes.get(c, object)) for c in columns})


def _table(rows: list[tuple], columns: list[str], *, ints: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows as a DataFrame: ``ints`` as int64, the rest as Python objects, so a
    None stays None (pandas would make a text column's None a NaN)."""
    cols = list(zip(*rows)) if rows else [()] * len(columns)
    return pd.DataFrame({name: pd.Series(list(values), dtype="int64" if name in ints else object)
                         for name, values in zip(columns, cols)})


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text_ = str(value).strip()
    return text_ or None


def _payload_reason(payload: Any) -> str | None:
    """The ``reason`` (else ``error``) of a block event's JSON payload."""
    if not payload:
        return None
    try:
        data = json.loads(payload) if isinstance(payload, str) else payload
    except ValueError:
        return _text(payload)
    if not isinstance(data, dict):
        return _text(data)
    return _text(data.get("reason")) or _text(data.get("error"))


def _natural(phase: Any) -> tuple:
    """Sort ``P2`` before ``P10``: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part)
                 for part in re.split(r"(\d+)", str(phase)) if part)


def records(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    """A DataFrame as JSON-able records (numpy scalars made plain, NaN made None)."""
    if frame is None:
        return []
    return [{k: _plain(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _hours(hours: float) -> str:
    return human_seconds(hours * HOUR)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _short(text_: str, limit: int = 80) -> str:
    line = text_.strip().splitlines()[0] if text_.strip() else ""
    return line if len(line) <= limit else line[:limit - 1] + "…"
