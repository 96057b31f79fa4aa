"""What the Sprint review page reads and draws: cached reads through the
library, tables and altair charts built from the DataFrames it returns, and the
export files offered as downloads. No SQL here, and no decisions the library makes.

Reads are cached with :func:`sparkops.ui.data.cached` (a ``Database`` keyed by its
URL); :func:`forget` drops them after a button changed the data.

**Downloads.** The CSV downloads are the files of the latest export in ``export.dir``
(``tasks.csv``, ``runs.csv``, ``phases.csv``), byte for byte: the columns, the
formula escape and the atomic replacement of ``docs/export.md`` come with them, and
they are read only when a download is clicked ("Export now" makes them current).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from sparkops.board import phases
from sparkops.config import Settings
from sparkops.core import formatting
from sparkops.sprint import measure, metrics, review
from sparkops.storage.db import Database
from sparkops.ui import data, views
from sparkops.ui.data import READ_TTL_SECONDS

#: The sprint metrics are reused this long (seconds): they cost more than a count
#: and change slowly.
METRICS_TTL_SECONDS = 10

#: How often the slower parts of the page (metrics, reports) refresh.
SLOW_REFRESH_SECONDS = 30

#: Choices of the review window, in hours.
WINDOW_HOURS = (6, 24, 72, 168)

#: How many review reports the page offers.
REPORT_LIMIT = 10

#: The export files offered as downloads (columns: docs/export.md).
DOWNLOADS = ("tasks.csv", "runs.csv", "phases.csv")

HOUR = 3600


def window_choices(settings: Settings) -> tuple[list[float], int]:
    """The review windows offered, shortest first, and the index of the configured
    one (``review.window_hours``), the default."""
    configured = float(settings["review.window_hours"])
    choices = sorted({float(h) for h in WINDOW_HOURS} | {configured})
    return choices, choices.index(configured)


def forget() -> None:
    """Drop the cached reads of these pages (after a button changed the data)."""
    for cached in (_sprint, _reports, data.boundaries):
        cached.clear()


@dataclass(frozen=True)
class Sprint:
    """The metrics of one window and the phase summary (:func:`sparkops.board.phases.summary`)."""

    metrics: metrics.Metrics
    phase_rows: list[dict[str, Any]]
    phase_of: dict[str, str]  # each task's phase, as the review resolved it


def sprint(board_db: Database, ops: Database, settings: Settings, window_hours: float) -> Sprint:
    """The review's metrics over ``window_hours`` with each task's phase as the
    review resolves it (the other ``review.*`` options from settings)."""
    options = measure.options_from(settings)
    options["window_hours"] = float(window_hours)
    return _sprint(board_db, ops, board_db.url, ops.url, tuple(settings["review.phase_patterns"]),
                   tuple(sorted(options.items())))


@st.cache_data(ttl=METRICS_TTL_SECONDS, show_spinner=False)
def _sprint(_board: Database, _ops: Database, board_url: str, ops_url: str, patterns: tuple[str, ...],
            options: tuple[tuple[str, Any], ...]) -> Sprint:
    mapping = phases.resolve(_board, _ops, patterns)
    # Two independent reads of the board: side by side, as SQLite and psycopg release
    # the GIL while they work (0.3 s less on a 100,000-task board).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="phase-summary") as pool:
        summary = pool.submit(phases.summary, _board, mapping)
        phase_of = {t: p.phase for t, p in mapping.items()}
        computed = measure.compute(_board, now=time.time(), phase_of=phase_of, **dict(options))
        return Sprint(computed, summary.result(), phase_of)


def tiles(m: metrics.Metrics) -> list[tuple[str, str, str]]:
    """``(label, value, help)`` for the headline numbers of the window."""
    w, tp, o = m.window, m.throughput, m.outcomes
    wip_now = int(m.wip["open_runs"].iloc[-1]) if len(m.wip) else 0
    return [
        ("Completed", f"{tp.completed}", f"Tasks completed in the last {views.hours_label(w.hours)}"),
        ("Throughput", f"{tp.per_hour:.2f}/h", "Completions per hour over the window"),
        ("Open", f"{m.counts['open']}", "Tasks on the board neither done nor archived"),
        ("Lead time (median)", formatting.human_seconds(m.lead_time.median),
         f"Created to completed; p90 {formatting.human_seconds(m.lead_time.p90)}"),
        ("Cycle time (median)", formatting.human_seconds(m.cycle_time.median),
         f"First claim to completed; p90 {formatting.human_seconds(m.cycle_time.p90)}"),
        ("Failure rate", "n/a" if o.failure_rate is None else f"{o.failure_rate:.0%}",
         f"Of the {formatting.plural(o.ended, 'run')} that ended in the window"),
        ("Blocked", f"{m.blocked_count}", "Tasks waiting for a person"),
        ("Runs open now", f"{wip_now}", "Work in progress: runs started and not ended"),
    ]


def summary_markdown(m: metrics.Metrics) -> str:
    """The review's summary lines (risks apart) as a markdown list; task text escaped."""
    return "\n".join(f"- {views.md_escape(line)}" for line in m.summary_lines(risks=False))


def phase_frame(sprint_: Sprint) -> pd.DataFrame:
    """Per phase: the summary's counts, the last completion and the ETA."""
    eta = {}
    if sprint_.metrics.phases is not None:
        eta = {row["phase"]: row for row in metrics.records(sprint_.metrics.phases)}
    rows = []
    for row in sprint_.phase_rows:
        estimate = eta.get(row["phase"], {})
        rows.append({
            "phase": row["phase"], "total": row["total"], "done": row["done"], "archived": row["archived"],
            "open": row["open"], "blocked": row["blocked"], "running": row["running"],
            "last completed": views.when(row["last_completed_at"]),
            "ETA": _eta_text(row["open"], estimate.get("eta_hours"), sprint_.metrics.now, estimate.get("eta_basis")),
        })
    columns = ["phase", "total", "done", "archived", "open", "blocked", "running", "last completed", "ETA"]
    return pd.DataFrame(rows, columns=columns)


def _eta_text(open_: int, eta_hours: float | None, now: int, basis: str | None = None) -> str:
    if not open_:
        return "done"
    if eta_hours is None:
        return f"no ETA ({basis or 'not enough completions yet'})"
    return f"in {formatting.human_seconds(eta_hours * HOUR)}, ~{views.when(now + round(eta_hours * HOUR))} ({basis})"


def blocked_frame(m: metrics.Metrics) -> pd.DataFrame:
    b = m.blocked
    return pd.DataFrame({
        "task": b["id"].astype(object), "title": b["title"].astype(object),
        "blocked for": [views.duration(s) for s in b["age_seconds"]],
        "since": b["since"].astype(object), "reason": b["reason"].fillna("").astype(object),
    })


def over_max_runs_frame(m: metrics.Metrics) -> pd.DataFrame:
    return m.stuck.over_max_runs["tasks"].rename(columns={"id": "task"})


def _with_time(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["time"] = pd.to_datetime(out["start"], unit="s", utc=True)
    return out


def burnup_chart(burnup: pd.DataFrame) -> alt.Chart:
    """Done against scope at the end of each UTC hour (or day, on long windows)."""
    long = _with_time(burnup).melt(id_vars=["time", "bucket"], value_vars=["scope", "done"],
                                   var_name="series", value_name="tasks")
    hourly = len(burnup) > 1 and int(burnup["start"].iloc[1] - burnup["start"].iloc[0]) == HOUR
    return (alt.Chart(long).mark_line(point=not hourly)
            .encode(x=alt.X("time:T", title="hour (UTC)" if hourly else "day (UTC)"), y=alt.Y("tasks:Q", title="tasks"),
                    color=alt.Color("series:N", title=None, sort=["scope", "done"]),
                    tooltip=["bucket", "series", "tasks"])
            .properties(title="Burn-up: done vs scope", height=240))


def throughput_chart(frame: pd.DataFrame, per: str) -> alt.Chart:
    """Completions per hour or per day (``per``: ``hour`` | ``day``)."""
    data = _with_time(frame)
    unit = "yearmonthdatehours" if per == "hour" else "yearmonthdate"
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X(f"{unit}(time):T", title=f"{per} (UTC)"), y=alt.Y("count:Q", title="completed"),
                    tooltip=["bucket", "count"])
            .properties(title=f"Throughput per {per}", height=220))


def duration_histogram(durations: metrics.Durations, title: str) -> alt.Chart:
    """A histogram of lead or cycle times, in hours."""
    data = pd.DataFrame({"hours": durations.seconds["seconds"].astype("float64") / HOUR})
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X("hours:Q", bin=alt.Bin(maxbins=20), title="hours"),
                    y=alt.Y("count():Q", title="tasks"))
            .properties(title=title, height=200))


def wip_chart(wip: pd.DataFrame) -> alt.Chart:
    """Runs open at each hour's end, and runs active during it."""
    long = _with_time(wip).melt(id_vars=["time", "bucket"], value_vars=["open_runs", "active_runs"],
                                var_name="series", value_name="runs")
    long["series"] = long["series"].map({"open_runs": "open at the hour's end",
                                         "active_runs": "active during the hour"})
    return (alt.Chart(long).mark_line(interpolate="step-after")
            .encode(x=alt.X("time:T", title="hour (UTC)"), y=alt.Y("runs:Q", title="runs"),
                    color=alt.Color("series:N", title=None), tooltip=["bucket", "series", "runs"])
            .properties(title="Work in progress", height=220))


def reports(ops: Database) -> list[dict[str, Any]]:
    """The latest review reports, newest first: id, created_at, host, path,
    narrative (its status) and markdown."""
    return _reports(ops, ops.url, REPORT_LIMIT)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _reports(_ops: Database, url: str, limit: int) -> list[dict[str, Any]]:
    keep = ("id", "created_at", "host", "path", "narrative", "markdown")
    return [{k: r.get(k) for k in keep} for r in review.latest(_ops, limit=limit)]


def report_label(report: dict[str, Any]) -> str:
    return f"#{report['id']} · {views.when(report['created_at'])} · narrative: {report['narrative']}"


@dataclass(frozen=True)
class ExportFile:
    name: str
    path: Path
    size: int
    modified: float


def export_files(settings: Settings) -> list[ExportFile]:
    """The export's CSV files that exist now in ``export.dir`` (of :data:`DOWNLOADS`)."""
    directory = Path(settings["export.dir"])
    found = []
    for name in DOWNLOADS:
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append(ExportFile(name, path, stat.st_size, stat.st_mtime))
    return found


def file_bytes(path: Path) -> Callable[[], bytes]:
    """What a download button calls when it is clicked: the file's bytes then."""
    return functools.partial(Path.read_bytes, Path(path))


def size_text(size: int) -> str:
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
