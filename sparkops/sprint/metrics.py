"""Sprint metrics from the board: the numbers behind the review, the pages and the CLI.

:func:`sparkops.sprint.measure.compute` reads the board in one read transaction (one consistent snapshot)
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
* **Burn-up**: per UTC hour of the window (windows up to 48 h) or per UTC day
  (longer ones), at the bucket's end (``now`` for the current one):
  ``done`` = completions so far; ``scope`` = tasks created so far, less the
  cancelled ones (archived without ever completing). It is today's view of the
  past: a task cancelled later leaves the scope of every day.
* **ETA per phase**: the phase's open tasks that are not blocked (blocked work waits
  for a person, not for agents) divided by the phase's recent pace: its last
  ``ETA_RECENT`` completions (at least ``ETA_MIN_COMPLETIONS``) over the time since
  the first of them, else the board's last completions the same way. None when the
  open work is all blocked or there are too few completions; 0 hours when nothing
  is open. ``eta_basis`` says which.
* **Stuck signals**: *ready idle* when ready tasks exist and the latest run start
  (any task) is more than ``stuck_ready_minutes`` ago, or no run ever started;
  *over max runs*: open tasks (not done/archived) with more than ``max_reruns``
  runs in all; *no completion* when open work exists (board_stats' ``open``) and
  the latest completion (else the first task's creation) is more than
  ``no_completion_hours`` ago; *waiting on a person*: tasks ``blocked`` (Hermes'
  state for work that needs a human: an answer, a decision, a capability) for more
  than ``stuck_blocked_minutes`` (age as for the blocked tasks above).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from sparkops.board.model import FAILURE_OUTCOMES, Outcome, Status
from sparkops.core.formatting import human_seconds, iso_utc, plural

log = logging.getLogger(__name__)

HOUR = 3600
DAY = 86400

#: Run outcomes counted as failures in the failure rate.
FAILED_OUTCOMES = frozenset({str(o) for o in FAILURE_OUTCOMES} | {str(Outcome.GAVE_UP)})
#: A task in one of these with ``completed_at`` set was delivered.
DELIVERED = (str(Status.DONE), str(Status.ARCHIVED))
#: Event kinds that put a task in ``blocked``.
BLOCK_EVENTS = ("blocked", "gave_up")
#: Windows up to this many hours get an hourly burn-up; longer ones a daily one.
BURNUP_HOURLY_UP_TO = 48
#: An ETA rests on this many recent completions (of the phase, else of the board) ...
ETA_RECENT = 10
#: ... and on at least this many.
ETA_MIN_COMPLETIONS = 3
#: Default size of the task lists (blocked, over max runs); counts are always exact.
LIST_LIMIT = 100


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
    #: active, count, threshold_seconds, oldest {id, title, age_seconds, reason}
    waiting_on_person: dict[str, Any] = field(default_factory=lambda: {"active": False, "count": 0})

    @property
    def any(self) -> bool:
        return bool(self.ready_idle["active"] or self.over_max_runs["active"]
                    or self.no_completion["active"] or self.waiting_on_person["active"])

    def as_dict(self) -> dict[str, Any]:
        over = dict(self.over_max_runs)
        over["tasks"] = records(over["tasks"])
        return {"any": self.any, "ready_idle": dict(self.ready_idle), "over_max_runs": over,
                "no_completion": dict(self.no_completion), "waiting_on_person": dict(self.waiting_on_person)}


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
    oldest_ready: dict[str, Any] | None  # id, title, ready_since, age_seconds (waiting since ready)
    burnup: pd.DataFrame  # bucket, start, done, scope (hourly up to 48 h, else daily)
    phases: pd.DataFrame | None  # phase, tasks, done, open, blocked, eta_hours, eta, eta_basis; None without phase_of
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
            f"{plural(tp.completed, 'task')} completed, "
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
                f"Runs: {plural(r.runs, 'run')} started by {plural(r.tasks, 'task')} (mean {_num(r.mean)}, "
                f"max {r.max or 0}), {plural(r.retries, 'retry', 'retries')}; failure rate "
                f"{_pct(o.failure_rate)} of {o.ended} ended"
                + (f" ({worst})." if worst else "."))
        if len(self.wip):
            lines.append(f"WIP: {plural(int(self.wip['open_runs'].iloc[-1]), 'run')} open now, at most "
                         f"{int(self.wip['open_runs'].max())} at an hour's end in the window.")
        if self.blocked_count:
            top = self.blocked.iloc[0]
            lines.append(f"Blocked: {plural(self.blocked_count, 'task')}, "
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
                    parts.append(f"{row.phase}: {row.open} open, no ETA ({row.eta_basis})")
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
        waiting = s.waiting_on_person
        if waiting["active"]:
            oldest = waiting["oldest"]
            lines.append(f"Stuck: {plural(waiting['count'], 'blocked task')} "
                         f"waiting on a person for more than {human_seconds(waiting['threshold_seconds'])}; "
                         f"the oldest, {oldest['id']} ({oldest['title']}), for "
                         f"{human_seconds(oldest['age_seconds'])}: {oldest['reason'] or 'no reason given'}.")
        return lines


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
