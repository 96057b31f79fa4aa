"""What the Events and alerts page shows: task events, job runs, alerts and the audit, with
their filters and CSV downloads (cells escaped as in the export).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from sparkops.board import queries
from sparkops.control import actions
from sparkops.core.clock import epoch
from sparkops.jobs import history
from sparkops.sprint import cells
from sparkops.storage.db import Database
from sparkops.ui import data
from sparkops.ui.views import when
from sparkops.watch import alerts

TTL = data.READ_TTL_SECONDS


#: The "since" filter of the Events page: label -> seconds back (None: everything).
SINCE_CHOICES: dict[str, int | None] = {
    "last hour": 3600, "last 6 hours": 6 * 3600, "last 24 hours": 86400,
    "last 7 days": 7 * 86400, "last 30 days": 30 * 86400, "all time": None,
}


JOB_OUTCOMES = ("ok", "error", "skipped")


ALERT_OUTCOMES = tuple(o.value for o in alerts.Outcome)


ALERT_LEVELS = tuple(lv.value for lv in alerts.Level)


AUDIT_RESULTS = ("ok", "refused", "error")


#: Event kinds the board writes (Hermes writes the same ones); more are added
#: from the data as they appear.
EVENT_KINDS = ("created", "linked", "claimed", "commented", "completed", "blocked", "unblocked",
               "promoted", "promoted_manual", "reprioritized", "archived", "reclaimed", "crashed",
               "timed_out", "spawn_failed", "protocol_violation", "rate_limited", "gave_up")


@data.cached()
def job_runs(ops: Database, *, jobs_: Sequence[str] = (), outcomes: Sequence[str] = (),
             host: str | None = None, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Recorded job runs, newest first (:func:`sparkops.jobs.history.runs`)."""
    return history.runs(ops, jobs=jobs_, outcomes=outcomes, host=host, since=since, limit=limit)


@data.cached(TTL)
def audit(ops: Database, *, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    return actions.audit_log(ops, since=since, limit=limit)


@data.cached()
def task_events(board_db: Database, *, kinds: Sequence[str] = (), since: int | None = None,
                limit: int = 500) -> list[dict[str, Any]]:
    return queries.list_events(board_db, kinds=list(kinds) or None, since=since, limit=limit)


def alerts_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["time", "level", "key", "title", "message", "outcome", "channels", "host"]
    out = [{"time": when(r["created_at"]), "level": r["level"], "key": r["key"], "title": r["title"],
            "message": r.get("message") or "", "outcome": r["outcome"],
            "channels": _channels(r.get("channels")), "host": r["host"]} for r in rows]
    return pd.DataFrame(out, columns=columns)


def job_runs_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["started", "job", "trigger", "outcome", "duration s", "summary", "error", "host", "pid"]
    out = [{"started": when(r["started_at"]), "job": r["job"], "trigger": r["trigger"],
            "outcome": r["outcome"], "duration s": round(r["duration_ms"] / 1000, 3),
            "summary": r.get("summary") or "", "error": r.get("error") or "", "host": r["host"],
            "pid": r["pid"]} for r in rows]
    return pd.DataFrame(out, columns=columns)


def audit_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["time", "who", "action", "target", "result", "message", "params"]
    out = [{"time": when(r["created_at"]), "who": r["actor"], "action": r["action"],
            "target": r.get("target") or "", "result": r["result"], "message": r.get("message") or "",
            "params": r.get("params") or ""} for r in rows]
    return pd.DataFrame(out, columns=columns)


def filter_text(frame: pd.DataFrame, text: str) -> pd.DataFrame:
    """Rows with ``text`` (any case) in any column."""
    needle = (text or "").strip().lower()
    if not needle or frame.empty:
        return frame
    hay = frame.astype(str).apply(lambda col: col.str.lower().str.contains(needle, regex=False))
    return frame[hay.any(axis=1)]


def filter_in(frame: pd.DataFrame, column: str, allowed: Sequence[str]) -> pd.DataFrame:
    """Rows whose ``column`` is one of ``allowed`` (all rows when nothing is chosen)."""
    if not allowed or frame.empty:
        return frame
    return frame[frame[column].isin(list(allowed))]


def since_epoch(label: str, *, at: int | None = None) -> int | None:
    """The start of a :data:`SINCE_CHOICES` period (to the minute, so that the cached
    reads keyed by it are shared for a minute), or None for all time."""
    seconds = SINCE_CHOICES.get(label)
    return None if seconds is None else (epoch(at) - seconds) // 60 * 60


def options(known: Iterable[str], present: Iterable[str], chosen: Iterable[str] = ()) -> list[str]:
    """Choices for a filter: the known values, those in the data, and those already
    chosen (so a choice never disappears from under the operator)."""
    return sorted(set(known) | {p for p in present if p} | set(chosen or ()))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as UTF-8 CSV for a download, every text cell that a spreadsheet would
    run as a formula prefixed with ``'`` (:func:`sparkops.sprint.cells.escape_cell`)."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(cells.escape_cell)
    buffer = io.StringIO()
    safe.to_csv(buffer, index=False)
    return buffer.getvalue().encode("utf-8")


def _channels(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(value.items()) if v != "off")
    return str(value or "")
