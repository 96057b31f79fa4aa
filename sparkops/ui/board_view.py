"""Reads and view helpers for the Board and Runs pages.

Cached reads go through :mod:`sparkops.board.queries` and :mod:`sparkops.board.phases` with
``st.cache_data`` for :data:`sparkops.ui.data.READ_TTL_SECONDS`, keyed by the
database URL like :mod:`sparkops.ui.data` (no SQL here). :func:`forget` drops them
after a button changed the board, so the next render shows the change at once.

The rest are plain functions over the dicts the queries return (filters, cards,
tables, a run's host and pid, a log's last lines), with no Streamlit calls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from sparkops.board import phases as phases_mod
from sparkops.board import queries
from sparkops.engine import runlog
from sparkops.meters import ledger
from sparkops.meters.spend import Prices, Spend, energy_text, money_text, tokens_text
from sparkops.sprint import costs
from sparkops.storage.db import Database
from sparkops.ui import data, views
from sparkops.ui.data import READ_TTL_SECONDS, AppContext

#: Seconds the phase map is kept (explicit phases, title tags and dependency depth
#: change rarely; resolving them reads every task and link).
PHASE_TTL_SECONDS = 30
#: The new-task form offers this many of the newest open tasks as parents.
PARENT_CHOICES = 500
#: Lines of a run log shown by default.
LOG_TAIL_LINES = 100
#: At most this much of the end of a log is read to find those lines.
LOG_TAIL_BYTES = 256 * 1024

ANY = "(any)"
OPEN = "(open)"
NO_OUTCOME = "(none)"

_RESULT_KEY = "sparkops_board_result"


# -- cached reads --------------------------------------------------------------------------


def board_slice(db: Database, filters: Mapping[str, Any], *, show_archived: bool,
                phase_of: Mapping[str, tuple[str, str]],
                per_status: int) -> queries.BoardSlice:
    """The board's columns for these filters (text, assignee, phase, priority):
    counts per status and the first ``per_status`` cards of each."""
    phase = filters.get("phase")
    ids = frozenset(t for t, (p, _source) in phase_of.items() if p == phase) if phase is not None else None
    return _board_slice(db, db.url, filters.get("text") or "", filters.get("assignee"), filters.get("priority"),
                        show_archived, ids, per_status)


def hermes_skips_note(ctx: AppContext) -> str | None:
    """In dispatch.mode = hermes, what Hermes' dispatcher will not start, in words."""
    if ctx.settings["dispatch.mode"] != "hermes":
        return None
    count = _unassigned_ready(ctx.store.board, ctx.store.board.url)
    if not count:
        return None
    return (f"{count:,} ready task(s) have no assignee: Hermes' dispatcher (dispatch.mode = hermes) "
            "skips them. Give each an assignee (a Hermes profile), or set kanban.default_assignee "
            "in Hermes' config.")


@data.cached(READ_TTL_SECONDS)
def board_options(db: Database, *, include_archived: bool = False) -> dict[str, list[Any]]:
    """``{"assignees": [...], "priorities": [...]}`` present on the board."""
    return queries.board_options(db, include_archived=include_archived)


def titles(db: Database, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{id: {"id", "title", "status"}}`` for these tasks."""
    return _titles(db, db.url, tuple(sorted(set(ids))))


@data.cached(READ_TTL_SECONDS)
def open_tasks(db: Database) -> dict[str, str]:
    """``{id: title}`` of the newest :data:`PARENT_CHOICES` open tasks (the new-task form's parents)."""
    return {t["id"]: t["title"] for t in queries.open_tasks(db, limit=PARENT_CHOICES)}


@data.cached(READ_TTL_SECONDS)
def task_detail(db: Database, task_id: str) -> dict[str, Any]:
    """The task with parents, children, comments, events and runs (raises NotFound)."""
    return queries.task_detail(db, task_id)


def phase_map(ctx: AppContext) -> dict[str, tuple[str, str]]:
    """``{task_id: (phase, source)}`` from :func:`sparkops.board.phases.resolve`, kept
    :data:`PHASE_TTL_SECONDS` (phases move slowly; resolving reads every task)."""
    board, ops = ctx.store.board, ctx.store.ops
    patterns = tuple(ctx.settings["review.phase_patterns"])
    return _phase_map(board, ops, board.url, ops.url, patterns)


@data.cached(READ_TTL_SECONDS)
def runs(db: Database, *, active_only: bool = False, limit: int = 200) -> list[dict[str, Any]]:
    """Runs, newest first."""
    return queries.list_runs(db, active_only=active_only, limit=limit)


@data.cached(READ_TTL_SECONDS)
def task_runs(db: Database, task_id: str) -> list[dict[str, Any]]:
    """One task's runs, newest first (raises NotFound)."""
    return queries.list_runs(db, task_id=task_id, limit=1000)


def task_spend(ctx: AppContext, task_ids: Iterable[str]) -> dict[str, Spend]:
    """What each task's runs spent (retries included); tasks never metered are absent."""
    return _task_spend(ctx.store.ops, ctx.store.ops.url, Prices.of(ctx.settings), tuple(sorted(set(task_ids))))


@data.cached(READ_TTL_SECONDS)
def run_spend(ops: Database, prices: Prices, run_ids: tuple[int, ...]) -> dict[int, Spend]:
    """What each of ``run_ids`` spent; runs never metered are absent."""
    return {run_id: Spend.of(usage, prices) for run_id, usage in ledger.of_runs(ops, run_ids).items()}


def forget() -> None:
    """Drop the cached reads of this module (after a write)."""
    for fn in (_board_slice, board_options, _titles, open_tasks, task_detail, _phase_map, runs, task_runs,
               _unassigned_ready, _task_spend, run_spend):
        fn.clear()


# These take arguments the public functions above normalise first (the key must be
# hashable and stable); leading underscores: Streamlit does not hash those, the URL is the key.

@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _board_slice(_db: Database, url: str, text: str, assignee: str | None, priority: int | None,
                 include_archived: bool, ids: frozenset[str] | None, per_status: int) -> queries.BoardSlice:
    return queries.board_slice(_db, text=text, assignee=assignee, priority=priority,
                               include_archived=include_archived,
                               keep=None if ids is None else ids.__contains__, per_status=per_status)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _unassigned_ready(_db: Database, url: str) -> int:
    return queries.unassigned_ready(_db)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _titles(_db: Database, url: str, ids: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return queries.titles(_db, ids)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _task_spend(_ops: Database, url: str, prices: Prices, ids: tuple[str, ...]) -> dict[str, Spend]:
    return costs.task_spend(_ops, prices, list(ids))


@st.cache_data(ttl=PHASE_TTL_SECONDS, show_spinner=False)
def _phase_map(_board: Database, _ops: Database, board_url: str, ops_url: str,
               patterns: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    return {task_id: (p.phase, p.source)
            for task_id, p in phases_mod.resolve(_board, _ops, patterns).items()}


# -- an action's outcome, shown after the rerun it causes ---------------------------------------


def remember_result(result: Any, where: str) -> None:
    """Keep an action's result for the next render (buttons run in callbacks)."""
    st.session_state[_RESULT_KEY] = (where, result)


def pending_result(where: str) -> Any | None:
    """The result kept for ``where``, once; None when there is none."""
    kept = st.session_state.get(_RESULT_KEY)
    if not kept or kept[0] != where:
        return None
    del st.session_state[_RESULT_KEY]
    return kept[1]


# -- the board ---------------------------------------------------------------------------------


def phase_names(phase_of: Mapping[str, tuple[str, str]]) -> list[str]:
    """The phases on the board, in phase order (P1, P2, ..., then named ones)."""
    return sorted({phase for phase, _source in phase_of.values()}, key=phases_mod.order_key)


def text_block(text: str | None) -> str:
    """Agent-written text as escaped markdown that keeps its line breaks."""
    return "  \n".join(views.md_escape(line) for line in (text or "").splitlines())


def task_facts(task: dict[str, Any], phase: tuple[str, str] | None, now: int) -> str:
    """One line about a task for its detail view."""
    facts = [views.code(task['id']), views.status_label(task["status"]),
             f"@{views.md_escape(task.get('assignee') or 'unassigned')}",
             f"priority {task.get('priority') or 0}"]
    if phase:
        facts.append(f"phase {views.md_escape(phase[0])} ({phase[1]})")
    facts.append(f"created {views.since(now, task['created_at'])} ago")
    if task.get("started_at"):
        facts.append(f"started {views.when(task['started_at'])}")
    if task.get("completed_at"):
        facts.append(f"completed {views.when(task['completed_at'])}")
    if task.get("consecutive_failures"):
        facts.append(f"⚠️ {task['consecutive_failures']} failure(s) in a row")
    line = " · ".join(facts)
    note = views.block_note(task, limit=None)
    if note:
        since = f" (since {views.when(task['blocked_at'])})" if task.get("blocked_at") else ""
        line += f"  \n{note}{since}"
    return line


def link_lines(ids: Iterable[str], tasks_by_id: Mapping[str, dict[str, Any]]) -> list[str]:
    """Parents or children as markdown lines: id, status and title."""
    lines = []
    for task_id in ids:
        task = tasks_by_id.get(task_id)
        if task is None:
            lines.append(views.code(task_id))
        else:
            lines.append(f"{views.code(task_id)} {views.status_label(task['status'])} · "
                         f"{views.md_escape(task['title'])}")
    return lines


def log_run_id(detail: dict[str, Any]) -> int | None:
    """The run whose log the detail view shows: the current run, else the last one."""
    current = detail["task"].get("current_run_id")
    if current:
        return int(current)
    return int(detail["runs"][-1]["id"]) if detail["runs"] else None


# -- runs -----------------------------------------------------------------------------------


def _metadata(run: dict[str, Any]) -> dict[str, Any]:
    value = run.get("metadata")
    return value if isinstance(value, dict) else {}


def run_host(run: dict[str, Any]) -> str:
    """Where the run's worker runs: ``metadata.process.host``, else the claim lock's host."""
    process = _metadata(run).get("process")
    if isinstance(process, dict) and process.get("host"):
        return str(process["host"])
    lock = run.get("claim_lock") or ""
    if ":" in lock:
        return lock.rsplit(":", 1)[0]
    return str(_metadata(run).get("host") or lock)


def run_pid(run: dict[str, Any]) -> int | None:
    """The worker's pid: ``worker_pid``, else the recorded agent's or shim's."""
    if run.get("worker_pid"):
        return int(run["worker_pid"])
    process = _metadata(run).get("process")
    if isinstance(process, dict):
        for name in ("agent", "shim"):
            proc = process.get(name)
            if isinstance(proc, dict) and proc.get("pid"):
                return int(proc["pid"])
    return None


def run_duration(run: dict[str, Any], now: int) -> int | None:
    """Seconds from start to end (to ``now`` while it runs)."""
    if not run.get("started_at"):
        return None
    return int((run.get("ended_at") or now) - run["started_at"])


def run_outcome(run: dict[str, Any]) -> str:
    if run.get("ended_at") is None:
        return "running"
    return run.get("outcome") or NO_OUTCOME


def outcomes(runs_: Iterable[dict[str, Any]]) -> list[str]:
    """The outcomes of the ended runs, sorted."""
    return sorted({run_outcome(r) for r in runs_ if r.get("ended_at") is not None})


def filter_runs(runs_: Iterable[dict[str, Any]], *, outcome: str | None = None, task_text: str = "",
                titles: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Runs with that outcome (:data:`OPEN` for those still running) whose task id
    or title contains ``task_text`` (any case)."""
    needle = (task_text or "").strip().lower()
    kept = []
    for run in runs_:
        if outcome == OPEN and run.get("ended_at") is not None:
            continue
        if outcome not in (None, OPEN) and (run.get("ended_at") is None or run_outcome(run) != outcome):
            continue
        title = (titles or {}).get(run["task_id"], "")
        if needle and needle not in run["task_id"].lower() and needle not in title.lower():
            continue
        kept.append(run)
    return kept


RUN_COLUMNS = ["run", "task", "title", "assignee", "outcome", "started", "duration", "host", "pid",
               "summary or error"]


def usage_line(spend: Spend | None, prices: Prices) -> str | None:
    """A card's line about what the task spent; None when it was never metered."""
    if spend is None or not spend.metered:
        return None
    parts = [f"🪙 {tokens_text(spend.tokens)}", f"⚡ {energy_text(spend.energy_wh)}"]
    if spend.cost is not None:
        parts.append(money_text(spend.cost, prices.currency))
    if spend.estimated:
        parts.append("≈ shared")
    return " · ".join(parts)


def usage_summary(spend: Spend | None, prices: Prices) -> str:
    """The detail's markdown line about what the task's runs spent."""
    if spend is None or not spend.metered:
        return ("**Usage**: not measured. No run of this task was metered (the shims meter a run when "
                "`usage.meter` is on and vLLM's /metrics or NVML can be read) and its agent reported none.")
    runs_ = "1 metered run" if spend.metered == 1 else f"{spend.metered} metered runs (retries included)"
    facts = [f"{_count(spend.prompt_tokens)} prompt + {_count(spend.generation_tokens)} generated tokens"
             + (f" in {_count(spend.requests)} requests" if spend.requests is not None else ""),
             f"energy {energy_text(spend.energy_wh)}",
             "GPU busy " + ("not measured" if spend.gpu_seconds is None else views.duration(spend.gpu_seconds))]
    if spend.cost is not None:
        facts.append(f"cost {money_text(spend.cost, prices.currency)}")
    if spend.api_cost is not None:
        facts.append(f"on a hosted API {money_text(spend.api_cost, prices.currency)}")
    notes = []
    if spend.reported:
        notes.append(f"{spend.reported} reported by the agent")
    if spend.estimated:
        notes.append(f"{spend.estimated} estimated (shared with runs at the same time)")
    return f"**Usage** ({runs_}): " + " · ".join(facts) + (f" ({'; '.join(notes)})" if notes else "")


def _count(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f}"


def runs_frame(runs_: Iterable[dict[str, Any]], now: int,
               titles: Mapping[str, str] | None = None,
               spend: Mapping[int, Spend] | None = None) -> pd.DataFrame:
    """Runs for a table: outcome, duration, host, pid and what the run said: its
    error when it failed, else its summary (the outcome says which). With
    ``spend``, each run's tokens and energy too (empty: not measured)."""
    rows = [{
        "run": r["id"],
        "task": r["task_id"],
        "title": (titles or {}).get(r["task_id"], ""),
        "assignee": r.get("profile") or "",
        "outcome": run_outcome(r),
        "started": views.when(r.get("started_at")),
        "duration": views.duration(run_duration(r, now)),
        "host": run_host(r),
        "pid": run_pid(r),
        "summary or error": _first_line(r.get("error") or r.get("summary")),
    } for r in runs_]
    frame = pd.DataFrame(rows, columns=RUN_COLUMNS).astype({"pid": "Int64"})
    if spend is not None:
        used = [spend.get(int(r)) for r in frame["run"]]
        frame["tokens"] = pd.array([u.tokens if u else None for u in used], dtype="Float64")
        frame["energy (Wh)"] = pd.array([u.energy_wh if u else None for u in used], dtype="Float64")
        frame["estimated"] = [("yes" if u.estimated else "no") if u else "" for u in used]
    return frame


def _first_line(text: str | None, limit: int = 200) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:limit] if lines else ""


def run_label(run: dict[str, Any], titles: Mapping[str, str] | None = None) -> str:
    """``#12 · t_ab12cd34 · running · Title`` for a picker."""
    title = (titles or {}).get(run["task_id"], "")
    return f"#{run['id']} · {run['task_id']} · {run_outcome(run)}" + (f" · {title[:60]}" if title else "")


def run_facts(run: dict[str, Any], now: int) -> str:
    """One markdown line about a run."""
    facts = [f"run {run['id']}", f"task {views.code(run['task_id'])}", run_outcome(run),
             f"started {views.when(run.get('started_at'))}",
             ("running for " if run.get("ended_at") is None else "took ")
             + views.duration(run_duration(run, now))]
    host, pid = run_host(run), run_pid(run)
    if host:
        facts.append(f"host {views.md_escape(host)}")
    if pid:
        facts.append(f"pid {pid}")
    if run.get("last_heartbeat_at") and run.get("ended_at") is None:
        facts.append(f"heartbeat {views.since(now, run['last_heartbeat_at'])} ago")
    return " · ".join(facts)


# -- logs ----------------------------------------------------------------------------------


def read_log_tail(path: Path, lines: int = LOG_TAIL_LINES, max_bytes: int = LOG_TAIL_BYTES) -> str | None:
    """The last ``lines`` lines of a log (from at most its last ``max_bytes``), or
    None when the file does not exist or cannot be read."""
    end = runlog.read_log_end(path, max_bytes)
    if end is None:
        return None
    kept, cut = end
    if cut and kept:
        kept = kept[1:]  # the first line read is probably cut
    return "\n".join(kept[-lines:]) if lines > 0 else ""


def missing_log_note(path: Path, run: dict[str, Any] | None = None) -> str:
    """Why a run has no log to show."""
    who = f"run {run['id']}" if run else "this run"
    return (f"No log file for {who}: {path} does not exist. SparkOps' dispatcher writes one for each "
            "run it starts; runs claimed by Hermes workers or made by the demo have none, and the "
            "cleanup job removes old logs.")
