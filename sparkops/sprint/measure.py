"""Measuring the sprint: :func:`compute` reads the board and returns the
:class:`~sparkops.sprint.metrics.Metrics` (what each number means is in
:mod:`sparkops.sprint.metrics`). One read transaction, aggregates in SQL, pandas
only where the answer is per task.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import and_, case, func, not_, or_, select
from sqlalchemy.engine import Connection

from sparkops.board.model import FINISHED, Outcome, Status
from sparkops.board.queries import longest_ready_wait, status_counts
from sparkops.core.errors import InvalidInput
from sparkops.core.formatting import iso_utc
from sparkops.sprint.metrics import (
    BLOCK_EVENTS,
    BURNUP_HOURLY_UP_TO,
    DAY,
    DELIVERED,
    ETA_MIN_COMPLETIONS,
    ETA_RECENT,
    FAILED_OUTCOMES,
    HOUR,
    LIST_LIMIT,
    Durations,
    Metrics,
    Outcomes,
    RunStats,
    Stuck,
    Throughput,
    Window,
)
from sparkops.storage.db import Database
from sparkops.storage.schema import task_events, task_runs, tasks

log = logging.getLogger(__name__)


def compute(
    db: Database,
    *,
    now: float,
    window_hours: float,
    phase_of: Mapping[str, str] | None = None,
    stuck_ready_minutes: float = 30,
    max_reruns: int = 3,
    no_completion_hours: float = 4,
    stuck_blocked_minutes: float = 60,
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
        blocked, blocked_count, waiting = _blocked(conn, now, counts["by_status"].get(Status.BLOCKED, 0),
                                                   list_limit, waiting_after=round(stuck_blocked_minutes * 60))
        oldest_ready = _oldest_ready(conn, now)
        burnup, last_completed, first_created = _burnup(conn, window)
        over = _over_max_runs(conn, now, max_reruns, list_limit)
        statuses = _live_statuses(conn) if phase_of is not None else None
        recent = _recent_completions(conn, now) if phase_of is not None else []
    counts["active_runs"] = active_runs
    throughput = _throughput(window, completed)
    phases = None if phase_of is None else _phases(phase_of, statuses or [], recent, now)
    stuck = _stuck(counts, now, latest_start, last_completed, first_created, over,
                   stuck_ready_minutes=stuck_ready_minutes, max_reruns=max_reruns,
                   no_completion_hours=no_completion_hours, waiting_on_person=waiting)
    log.debug("metrics for %s h to %s computed in %.3f s", window_hours, iso_utc(now),
              time.perf_counter() - began)
    return Metrics(
        now=now, window=window, counts=counts, throughput=throughput,
        lead_time=_durations(lead), cycle_time=_durations(cycle), runs=run_stats,
        outcomes=outcomes, wip=wip, blocked=blocked, blocked_count=blocked_count,
        oldest_ready=oldest_ready, burnup=burnup, phases=phases, stuck=stuck,
        settings={"window_hours": float(window_hours), "stuck_ready_minutes": stuck_ready_minutes,
                  "max_reruns": max_reruns, "no_completion_hours": no_completion_hours,
                  "stuck_blocked_minutes": stuck_blocked_minutes},
    )


def options_from(settings: Any) -> dict[str, Any]:
    """The ``review.*`` settings as keyword arguments of :func:`compute`."""
    return {
        "window_hours": settings["review.window_hours"],
        "stuck_ready_minutes": settings["review.stuck_ready_minutes"],
        "max_reruns": settings["review.max_reruns"],
        "no_completion_hours": settings["review.no_completion_hours"],
        "stuck_blocked_minutes": settings["review.stuck_blocked_minutes"],
    }


# -- the queries -----------------------------------------------------------------------

_LIVE = tasks.c.status != Status.ARCHIVED
_DELIVERED = and_(tasks.c.status.in_(DELIVERED), tasks.c.completed_at.is_not(None))
#: archived without ever completing: out of the burn-up's scope
_CANCELLED = and_(tasks.c.status == Status.ARCHIVED, tasks.c.completed_at.is_(None))


def _counts(conn: Connection) -> dict[str, Any]:
    """:func:`sparkops.board.queries.status_counts` and the total, archived included."""
    counts = status_counts(conn)
    return {**counts, "total": sum(counts["by_status"].values()) + counts["archived"]}


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
    # A protocol violation is booked as Hermes books it (crashed, "protocol violation"
    # in the error); it is counted under its own name.
    outcome = case((and_(r.outcome == str(Outcome.CRASHED), r.error.like("%protocol violation%")),
                    str(Outcome.PROTOCOL_VIOLATION)), else_=r.outcome).label("outcome")
    ended = (select((r.ended_at // HOUR).label("hour"), outcome)
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


def _blocked(conn: Connection, now: int, expected: int, limit: int | None, *,
             waiting_after: int) -> tuple[pd.DataFrame, int, dict[str, Any]]:
    """Blocked tasks with their age and reason, oldest first; and the stuck signal
    of those blocked longer than ``waiting_after`` seconds."""
    columns = ["id", "title", "age_seconds", "since", "reason"]
    waiting: dict[str, Any] = {"active": False, "count": 0, "threshold_seconds": waiting_after, "oldest": None}
    if not expected:
        return _empty(columns, age_seconds="int64"), 0, waiting
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
        since = next((t for t in (ev_at, run_end, created_at) if t is not None), now)  # an unreadable time: now
        reason = _text(last_failure) or _payload_reason(payload) or _text(summary) or _text(error)
        out.append((task_id, title, now - int(since), iso_utc(since), reason))
    out.sort(key=lambda row: (-row[2], row[0]))
    over = [row for row in out if row[2] > waiting_after]
    if over:
        waiting.update(active=True, count=len(over),
                       oldest={"id": over[0][0], "title": over[0][1], "age_seconds": over[0][2],
                               "reason": over[0][4]})
    if limit is not None:
        out = out[:limit]
    return _table(out, columns, ints=("age_seconds",)), len(rows), waiting


def _oldest_ready(conn: Connection, now: int) -> dict[str, Any] | None:
    """The ready task waiting longest, counted from when it became ready."""
    waiting = longest_ready_wait(conn, now)
    if waiting is None:
        return None
    return {"id": waiting["id"], "title": waiting["title"], "ready_since": waiting["ready_since"],
            "age_seconds": waiting["wait_seconds"]}


def _burnup(conn: Connection, w: Window) -> tuple[pd.DataFrame, int | None, int | None]:
    """Cumulative done and scope at the end of each bucket of the window (an hour
    for windows up to :data:`BURNUP_HOURLY_UP_TO` hours, else a day); also the latest
    completion and the first task's creation (for the stuck signals)."""
    size = burnup_bucket(w.hours)
    t = tasks.c
    created = (select((t.created_at // size).label("bucket"), t.created_at)
               .where(t.created_at <= w.end, not_(_CANCELLED)).subquery())
    created_buckets = conn.execute(
        select(created.c.bucket, func.count(), func.min(created.c.created_at))
        .group_by(created.c.bucket)).all()
    done = (select((t.completed_at // size).label("bucket"), t.completed_at)
            .where(_DELIVERED, t.completed_at <= w.end).subquery())
    done_buckets = conn.execute(
        select(done.c.bucket, func.count(), func.max(done.c.completed_at)).group_by(done.c.bucket)).all()
    buckets = np.arange(w.start // size, w.end // size + 1, dtype=np.int64)
    first_created = min((int(r[2]) for r in created_buckets), default=None)
    last_completed = max((int(r[2]) for r in done_buckets), default=None)
    return (_buckets(buckets * size, done=_cumulative_at(done_buckets, buckets),
                     scope=_cumulative_at(created_buckets, buckets)),
            last_completed, first_created)


def burnup_bucket(window_hours: float) -> int:
    """The burn-up's bucket for a window: an hour up to two days, else a day."""
    return HOUR if window_hours <= BURNUP_HOURLY_UP_TO else DAY


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
    """(id, status, completed_at) of every task not archived (for the phases)."""
    return conn.execute(select(tasks.c.id, tasks.c.status, tasks.c.completed_at).where(_LIVE)).all()


def _recent_completions(conn: Connection, now: int, count: int = ETA_RECENT) -> list[int]:
    """The times of the board's last ``count`` completions (any phase), oldest first."""
    return sorted(int(t) for (t,) in conn.execute(
        select(tasks.c.completed_at).where(_DELIVERED, tasks.c.completed_at <= now)
        .order_by(tasks.c.completed_at.desc()).limit(count)))


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


def _phases(phase_of: Mapping[str, str], statuses: list, board_recent: list[int], now: int) -> pd.DataFrame:
    """Per phase: tasks, done, open, blocked, and the ETA of its open work (see
    :func:`_eta`)."""
    total: Counter[str] = Counter()
    done: Counter[str] = Counter()
    blocked: Counter[str] = Counter()
    completions: dict[str, list[int]] = {}
    for task_id, status, completed_at in statuses:
        phase = phase_of.get(task_id)
        if phase is None:
            continue
        total[phase] += 1
        if status == Status.DONE:
            done[phase] += 1
            if completed_at is not None and completed_at <= now:
                completions.setdefault(phase, []).append(int(completed_at))
        elif status == Status.BLOCKED:
            blocked[phase] += 1
    out = []
    for phase in sorted(total, key=_natural):
        open_ = total[phase] - done[phase]
        eta_hours, basis = _eta(str(phase), open_, blocked[phase], sorted(completions.get(phase, []))[-ETA_RECENT:],
                                board_recent, now)
        eta = None if eta_hours is None else iso_utc(now + round(eta_hours * HOUR))
        out.append((str(phase), total[phase], done[phase], open_, blocked[phase], eta_hours, eta, basis))
    return _table(out, ["phase", "tasks", "done", "open", "blocked", "eta_hours", "eta", "eta_basis"],
                  ints=("tasks", "done", "open", "blocked"))


def _eta(phase: str, open_: int, blocked: int, recent: list[int], board_recent: list[int],
         now: int) -> tuple[float | None, str]:
    """Hours until the phase's open work is done, and what that rests on.

    The pace is the phase's own recent completions (its last :data:`ETA_RECENT`,
    at least :data:`ETA_MIN_COMPLETIONS`): ``k`` completions since the first of
    them; else the board's last completions the same way. Time with nothing
    completed counts, so a stalled phase's ETA grows. Blocked tasks wait for a
    person and are not estimated: a phase whose open work is all blocked has no ETA.
    """
    if open_ == 0:
        return 0.0, "done"
    workable = open_ - blocked
    if workable <= 0:
        return None, f"all {open_} open blocked on a person"
    for pace_of, times in ((f"the last {len(recent)} completions of {phase}", recent),
                           (f"the board's last {len(board_recent)} completions", board_recent)):
        if len(times) >= ETA_MIN_COMPLETIONS:
            per_hour = len(times) / max((now - times[0]) / HOUR, 1 / 60)
            waiting = f"; {blocked} blocked not counted" if blocked else ""
            return workable / per_hour, f"from {pace_of}{waiting}"
    return None, "not enough completions yet"


def _stuck(counts: dict, now: int, latest_start: int | None, last_completed: int | None,
           first_created: int | None, over: tuple[pd.DataFrame, int], *,
           stuck_ready_minutes: float, max_reruns: int, no_completion_hours: float,
           waiting_on_person: dict[str, Any]) -> Stuck:
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
    return Stuck(ready_idle=ready_idle, over_max_runs=over_max, no_completion=no_completion,
                 waiting_on_person=waiting_on_person)


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
