"""Presentation helpers for the pages: formatting, tables, kanban columns.

Plain functions over the dicts :mod:`sparkops.board.queries` returns, with no
Streamlit calls, so they are easy to test and the pages stay short.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import pandas as pd

from sparkops.board import phases, queries
from sparkops.board.model import Status
from sparkops.core.formatting import duration, when

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
#: A URL in text, without the punctuation that usually follows one in a sentence.
_URL = re.compile(r"(https?://[^\s`<>\"']*[^\s`<>\"'.,;:)\]])")


def since(now: float, then: float | None) -> str:
    """:func:`duration` from ``then`` to ``now``; ``?`` when ``then`` is unreadable
    (another writer put something else than a time in the row)."""
    return "?" if then is None else duration(now - then)


def md_escape(text: str | None, *, code_spans: bool = False) -> str:
    """Task text is written by agents: show it as text, never as markup. A URL in it
    is shown as code (escaped, it would read ``http://127\\.0\\.0\\.1`` with a broken
    link). ``code_spans``: the text is ours (a hint naming a setting) and its
    backtick-quoted parts are shown as code; their content stays literal."""
    text = text or ""
    if code_spans:
        parts = text.split("`")
        if len(parts) % 2 == 1:  # balanced
            return "".join(code(part) if i % 2 else _escape_plain(part) for i, part in enumerate(parts))
    return _escape_plain(text)


def _escape_plain(text: str) -> str:
    return "".join(code(part) if i % 2 else _MARKDOWN_SPECIAL.sub(r"\\\1", part)
                   for i, part in enumerate(_URL.split(text)))


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def code(text: Any) -> str:
    """``text`` (an id, a path, a URL from a row or a setting) as inline code that
    cannot break out: control characters become ``?``; text with a backtick is
    shown escaped instead of as code."""
    value = _CONTROL.sub("?", str(text if text is not None else ""))
    if "`" in value or not value:
        return md_escape(value)
    return f"`{value}`"


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
        "running for": since(now, r["started_at"]),
        "last heartbeat": duration(now - r["last_heartbeat_at"]) + " ago"
        if r.get("last_heartbeat_at") else "-",
        "worker": r.get("claim_lock") or "",
    } for r in runs]
    return pd.DataFrame(rows, columns=["run", "task", "assignee", "started", "running for",
                                       "last heartbeat", "worker"])


def events_frame(events: list[dict[str, Any]]) -> pd.DataFrame:
    """Recent events for a table, newest first: local time, the task and its title,
    and what happened in words (:func:`event_words`)."""
    rows = [{
        "time": when(e["created_at"]),
        "task": e["task_id"],
        "title": e.get("task_title") or "",
        "event": e["kind"].replace("_", " ") if isinstance(e["kind"], str) else e["kind"],
        "run": e.get("run_id"),
        "details": event_words(e["kind"], e.get("payload")),
    } for e in events]
    frame = pd.DataFrame(rows, columns=["time", "task", "title", "event", "run", "details"])
    return frame.astype({"run": "Int64"})  # nullable: most events have no run


#: Payload keys that hold epoch seconds (shown as local times).
_TIME_KEYS = frozenset({"expires", "until", "at", "since", "started_at", "ended_at", "retry_at"})
#: Payload keys that say nothing to an operator (ids repeated from the row, Hermes' empty fields).
_QUIET_KEYS = frozenset({"run_id", "tenant", "branch_name", "skills", "goal_mode"})


def event_words(kind: Any, payload: Any) -> str:
    """An event's payload in words: ``claimed by h:123, lease until 10:42:07``,
    ``a result of 108 characters: <summary>``, ``reason: needs a key``. Unknown
    keys stay ``key: value``; empty values and ids repeated from the row are left out."""
    if not payload:
        return ""
    if not isinstance(payload, dict):
        return payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    data = {k: v for k, v in payload.items() if v not in (None, "", [], {}) and k not in _QUIET_KEYS}
    words: list[str] = []
    if kind == "claimed" and "lock" in data:
        words.append(f"by {data.pop('lock')}")
    if kind == "completed" and "result_len" in data:
        length = data.pop("result_len")
        summary = data.pop("summary", None)
        words.append(f"a result of {length} characters" + (f": {summary}" if summary else "")
                     if length else (summary or "no result text"))
    if kind == "created" and data.get("status") == "ready":
        data.pop("status")
    if "failures" in data and "effective_limit" in data:
        words.append(f"{data.pop('failures')} failures in a row, the limit {data.pop('effective_limit')}")
        data.pop("limit_source", None)
    for key, value in data.items():
        if key in _TIME_KEYS and isinstance(value, (int, float)) and not isinstance(value, bool):
            words.append(f"{key.replace('_', ' ')} {when(int(value))}")
        elif isinstance(value, bool):
            words.append(key.replace("_", " ") if value else f"not {key.replace('_', ' ')}")
        elif isinstance(value, list):
            words.append(f"{key}: {', '.join(str(v) for v in value)}")
        else:
            words.append(f"{key.replace('_', ' ')}: {value}")
    return "; ".join(words)


# -- the kanban board -----------------------------------------------------------------------


def board_statuses(counts: dict[str, int], *, show_archived: bool = False) -> list[str]:
    """The kanban columns to show, in :data:`BOARD_ORDER` (then any other status
    present): the ones with tasks and the ones in :data:`SHOWN_WHEN_EMPTY`."""
    order = [s.value for s in BOARD_ORDER]
    order += [s for s in counts if s not in order]
    return [s for s in order
            if (s != Status.ARCHIVED or show_archived) and (counts.get(s) or s in SHOWN_WHEN_EMPTY)]


def card_markdown(task: dict[str, Any], now: int, phase: str | None = None, usage: str | None = None) -> str:
    """One task card: title, then id, assignee, priority, age or failures and the
    phase; what its runs spent (``usage``, a line made from numbers); for a blocked
    task, why (:func:`block_note`)."""
    facts = [code(task['id']), f"@{md_escape(task.get('assignee') or 'unassigned')}"]
    if task.get("priority"):
        facts.append(f"p{task['priority']}")
    if task["status"] == Status.RUNNING and task.get("started_at"):
        facts.append(f"running {since(now, task['started_at'])}")
    elif task["status"] == Status.DONE and task.get("completed_at"):
        facts.append(f"done {since(now, task['completed_at'])} ago")
    else:
        facts.append(f"age {since(now, task['created_at'])}")
    if task.get("created_at") is None:
        facts.append("⚠️ its creation time is not a time (written by another tool)")
    if task.get("consecutive_failures"):
        facts.append(f"⚠️ {task['consecutive_failures']} failure(s)")
    if phase:
        facts.append(md_escape(phase))
    card = f"**{md_escape(task['title'])}**  \n" + " · ".join(facts)
    if usage:
        card += f"  \n{usage}"
    note = block_note(task)
    return card + (f"  \n{note}" if note else "")


#: A block's kind (the tasks row's ``block_kind``) in words.
BLOCK_KIND_WORDS = {"needs_input": "needs input", "capability": "needs a capability",
                    "transient": "transient", "dependency": "waits for a dependency"}
#: How much of a block reason a card shows (the detail shows all of it).
CARD_REASON_CHARS = 160


def block_note(task: dict[str, Any], *, limit: int | None = CARD_REASON_CHARS) -> str:
    """``⛔ needs input: the reason`` for a blocked task whose block was read
    (:func:`sparkops.board.queries.block_notes`); empty otherwise."""
    if task.get("status") != Status.BLOCKED or not ({"block_kind", "block_reason"} & task.keys()):
        return ""
    kind = task.get("block_kind")
    reason = " ".join(str(task.get("block_reason") or "no reason given").split())
    if limit is not None and len(reason) > limit:
        reason = reason[:limit - 1] + "…"
    words = BLOCK_KIND_WORDS.get(kind, kind) if kind else "blocked"
    return f"⛔ **{md_escape(words)}**: {md_escape(reason)}"


def hours_label(hours: float) -> str:
    """``1 hour``, ``6 hours``, ``3 days``."""
    hours = float(hours)
    if hours >= 48 and hours % 24 == 0:
        return f"{hours / 24:g} days"
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def boundaries_frame(items: Iterable[phases.Boundary], *, recorded: bool = False) -> pd.DataFrame:
    """Phase boundaries as a table (``recorded``: with when SparkOps noticed each)."""
    columns = ["phase", "finished", "tasks", "last task", "promoted"] + (["recorded"] if recorded else [])
    rows = [{"phase": b.phase, "finished": when(b.reached_at), "tasks": b.tasks, "last task": b.last_task_id or "",
             "promoted": ", ".join(b.promoted), "recorded": when(b.recorded_at)} for b in items]
    return pd.DataFrame(rows, columns=columns)
