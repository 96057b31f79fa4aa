"""Presentation helpers for the pages: formatting, tables, kanban columns.

Plain functions over the dicts :mod:`sparkops.queries` returns, with no
Streamlit calls, so they are easy to test and the pages stay short.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pandas as pd

from sparkops import queries
from sparkops.board import Status

#: Kanban columns, left to right. Those in :data:`SHOWN_WHEN_EMPTY` are always
#: shown; the others only when they hold a task.
BOARD_ORDER: tuple[Status, ...] = (
    Status.TRIAGE, Status.TODO, Status.SCHEDULED, Status.READY, Status.RUNNING,
    Status.BLOCKED, Status.REVIEW, Status.DONE, Status.ARCHIVED,
)
SHOWN_WHEN_EMPTY = frozenset({Status.TODO, Status.READY, Status.RUNNING, Status.BLOCKED, Status.DONE})

STATUS_ICON = {
    "triage": "❔", "todo": "⏳", "scheduled": "⏲️", "ready": "▶️", "running": "🟢",
    "blocked": "⛔", "review": "🔍", "done": "✅", "archived": "🗄️",
}

UNASSIGNED = queries.UNASSIGNED

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|<>~$])")


def duration(seconds: float | None) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def when(ts: int | None) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for None."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def md_escape(text: str | None) -> str:
    """Task text is written by agents: show it as text, never as markup."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", text or "")


def status_label(status: str) -> str:
    return f"{STATUS_ICON.get(status, '')} {status.capitalize()}".strip()


# -- tables -----------------------------------------------------------------------------


def runs_frame(runs: list[dict[str, Any]], now: int) -> pd.DataFrame:
    """Active runs for a table: newest first, with their age and heartbeat age."""
    rows = [{
        "run": r["id"],
        "task": r["task_id"],
        "assignee": r.get("profile") or "",
        "started": when(r["started_at"]),
        "running for": duration(now - r["started_at"]),
        "last heartbeat": duration(now - r["last_heartbeat_at"]) + " ago"
        if r.get("last_heartbeat_at") else "-",
        "worker": r.get("claim_lock") or "",
    } for r in runs]
    return pd.DataFrame(rows, columns=["run", "task", "assignee", "started", "running for",
                                       "last heartbeat", "worker"])


def events_frame(events: list[dict[str, Any]]) -> pd.DataFrame:
    """Recent events for a table, newest first."""
    rows = [{
        "time": when(e["created_at"]),
        "task": e["task_id"],
        "event": e["kind"],
        "run": e.get("run_id"),
        "details": _details(e.get("payload")),
    } for e in events]
    frame = pd.DataFrame(rows, columns=["time", "task", "event", "run", "details"])
    return frame.astype({"run": "Int64"})  # nullable: most events have no run


def _details(payload: Any) -> str:
    if not payload:
        return ""
    if isinstance(payload, dict):
        return ", ".join(f"{k}={v}" for k, v in payload.items() if v not in (None, "", [], {}))
    return payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)


# -- the kanban board -----------------------------------------------------------------------


def board_statuses(counts: dict[str, int], *, show_archived: bool = False) -> list[str]:
    """The kanban columns to show, in :data:`BOARD_ORDER` (then any other status
    present): the ones with tasks and the ones in :data:`SHOWN_WHEN_EMPTY`."""
    order = [s.value for s in BOARD_ORDER]
    order += [s for s in counts if s not in order]
    return [s for s in order
            if (s != Status.ARCHIVED or show_archived) and (counts.get(s) or s in SHOWN_WHEN_EMPTY)]


def card_markdown(task: dict[str, Any], now: int) -> str:
    """One task card: title, then id, assignee, priority and age or failures."""
    facts = [f"`{task['id']}`", f"@{md_escape(task.get('assignee') or 'unassigned')}"]
    if task.get("priority"):
        facts.append(f"p{task['priority']}")
    if task["status"] == Status.RUNNING and task.get("started_at"):
        facts.append(f"running {duration(now - task['started_at'])}")
    elif task["status"] == Status.DONE and task.get("completed_at"):
        facts.append(f"done {duration(now - task['completed_at'])} ago")
    else:
        facts.append(f"age {duration(now - task['created_at'])}")
    if task.get("consecutive_failures"):
        facts.append(f"⚠️ {task['consecutive_failures']} failure(s)")
    return f"**{md_escape(task['title'])}**  \n" + " · ".join(facts)
