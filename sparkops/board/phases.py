"""Phases: which phase a task belongs to, and the moment a phase is finished.

A task's phase is, in this order:

1. an explicit assignment (``python -m sparkops phase set TASK NAME``, the app),
   kept in the ops database (``ops_task_phases``);
2. a tag in its title, read by ``review.phase_patterns`` (``[P2]``, ``Phase 2:``);
3. its depth in the dependency graph (a task with no parents is in P1, its
   children in P2, ...).

Numbered phases are named ``P<n>`` whatever their source, so they sort and "the next
phase" is defined; an explicit name that is not a number sorts after them.

A phase boundary is the moment the last open task of a phase is done or archived.
:func:`record_boundaries` records each once (``ops_phase_boundaries``, keyed by the
phase, so two runners racing cannot record it twice), adds an ``ops_events`` row,
and, with ``review.promote_next_phase``, promotes the next phase's ``todo`` tasks.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import pandas as pd
from sqlalchemy import delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from sparkops.board import transitions as board
from sparkops.board.model import FINISHED, Status
from sparkops.core.clock import epoch
from sparkops.core.errors import InvalidInput, NotFound, Refused
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_events, ops_phase_boundaries, ops_task_phases, task_links, tasks

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^P(\d+)$")


class PhaseOf(NamedTuple):  # a tuple: 100,000 of them are made per resolve
    phase: str
    source: str  # explicit | tag | depth


@dataclass(frozen=True)
class Boundary:
    phase: str
    reached_at: int
    recorded_at: int
    last_task_id: str | None
    tasks: int
    promoted: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "promoted": list(self.promoted)}


def normalise(name: str) -> str:
    """``2``, ``p2``, ``P02`` -> ``P2``; other names are kept (stripped)."""
    return _normalise(str(name))


@functools.lru_cache(maxsize=4096)  # a board has few distinct tags: resolve() calls this per task
def _normalise(name: str) -> str:
    name = name.strip()
    if not name:
        raise InvalidInput("a phase needs a name, e.g. P2")
    digits = re.fullmatch(r"[Pp]?0*(\d+)", name)
    return f"P{int(digits.group(1))}" if digits else name


def order_key(phase: str) -> tuple[int, int, str]:
    """Numbered phases first, by number; then named ones, by name."""
    match = _NUMBERED.match(phase)
    return (0, int(match.group(1)), "") if match else (1, 0, phase)


def next_phase(phase: str, known: Iterable[str]) -> str | None:
    later = sorted((p for p in set(known) if order_key(p) > order_key(phase)), key=order_key)
    return later[0] if later else None


# -- assignments -----------------------------------------------------------------------


def assign(board_db: Database, ops: Database, task_id: str, phase: str, *, by: str = "user",
           now: float | None = None) -> str:
    """Put ``task_id`` in ``phase`` explicitly (wins over tags and depth)."""
    ts = epoch(now)
    name = normalise(phase)
    with board_db.read() as conn:
        if conn.execute(select(tasks.c.id).where(tasks.c.id == task_id)).first() is None:
            raise NotFound("task", task_id)
    with ops.write() as conn:
        done = conn.execute(update(ops_task_phases).where(ops_task_phases.c.task_id == task_id)
                            .values(phase=name, assigned_by=by, assigned_at=ts)).rowcount
        if not done:
            conn.execute(insert(ops_task_phases).values(task_id=task_id, phase=name, assigned_by=by,
                                                        assigned_at=ts))
        conn.execute(insert(ops_events).values(created_at=ts, kind="phase_assigned", subject=task_id,
                                               payload=json.dumps({"phase": name, "by": by})))
    return name


def unassign(ops: Database, task_id: str, *, by: str = "user", now: float | None = None) -> bool:
    """Drop an explicit assignment (the tag or the depth decides again)."""
    ts = epoch(now)
    with ops.write() as conn:
        gone = conn.execute(delete(ops_task_phases).where(ops_task_phases.c.task_id == task_id)).rowcount
        if gone:
            conn.execute(insert(ops_events).values(created_at=ts, kind="phase_unassigned", subject=task_id,
                                                   payload=json.dumps({"by": by})))
    return bool(gone)


# -- resolving ---------------------------------------------------------------------------


def resolve(board_db: Database, ops: Database, patterns: Iterable[str]) -> dict[str, PhaseOf]:
    """Every task's phase (archived tasks included)."""
    compiled = [re.compile(p) for p in patterns]
    with ops.read() as conn:
        explicit = dict(conn.execute(select(ops_task_phases.c.task_id, ops_task_phases.c.phase)).all())
    with board_db.read() as conn:
        titles = conn.execute(select(tasks.c.id, tasks.c.title)).all()
        links = conn.execute(select(task_links.c.parent_id, task_links.c.child_id)).all()
    depth = dependency_depths([t for t, _ in titles], links)
    result: dict[str, PhaseOf] = {}
    for task_id, title in titles:
        if task_id in explicit:
            result[task_id] = PhaseOf(explicit[task_id], "explicit")
            continue
        tagged = _tag(title or "", compiled)
        result[task_id] = PhaseOf(tagged, "tag") if tagged else PhaseOf(f"P{depth[task_id]}", "depth")
    return result


def _tag(title: str, compiled: list[re.Pattern]) -> str | None:
    for pattern in compiled:
        match = pattern.search(title)
        if match:
            return normalise(match.group(1) if match.groups() else match.group(0))
    return None


def dependency_depths(ids: list[str], links: Iterable[tuple[str, str]]) -> dict[str, int]:
    """1 for a task without parents, else 1 + its deepest parent.

    Kahn's topological order over the linked tasks, O(tasks + links); the tasks of a
    cycle (which the board refuses) keep the depth their other parents give them
    rather than loop.
    """
    depth = dict.fromkeys(ids, 1)
    children: dict[str, list[str]] = {}
    waiting: dict[str, int] = {}  # parents not yet placed, per child
    for parent, child in links:
        children.setdefault(parent, []).append(child)
        waiting[child] = waiting.get(child, 0) + 1
    ready = [node for node in children if node not in waiting]
    for node in ready:  # grows while it is walked
        below = depth.setdefault(node, 1) + 1
        for child in children.get(node, ()):
            if depth.get(child, 1) < below:
                depth[child] = below
            waiting[child] -= 1
            if not waiting[child]:
                ready.append(child)
    return depth


def summary(board_db: Database, mapping: Mapping[str, PhaseOf]) -> list[dict[str, Any]]:
    """Per phase, in order: total, done, archived, open, blocked, running, first created,
    last completed."""
    with board_db.read() as conn:
        rows = [tuple(r) for r in conn.execute(
            select(tasks.c.id, tasks.c.status, tasks.c.created_at, tasks.c.completed_at))]
    frame = pd.DataFrame(rows, columns=["id", "status", "created_at", "completed_at"])
    frame["phase"] = frame["id"].map({t: p.phase for t, p in mapping.items()}).fillna("(none)")
    for name, status in (("done", Status.DONE), ("archived", Status.ARCHIVED), ("blocked", Status.BLOCKED),
                         ("running", Status.RUNNING)):
        frame[name] = frame["status"] == status
    frame["open"] = ~(frame["done"] | frame["archived"])
    grouped = frame.groupby("phase").agg(
        total=("id", "size"), done=("done", "sum"), archived=("archived", "sum"), open=("open", "sum"),
        blocked=("blocked", "sum"), running=("running", "sum"), first_created_at=("created_at", "min"),
        last_completed_at=("completed_at", "max"))
    result = []
    for phase in sorted(grouped.index, key=order_key):
        row = grouped.loc[phase]
        entry: dict[str, Any] = {"phase": phase}
        for column in ("total", "done", "archived", "open", "blocked", "running"):
            entry[column] = int(row[column])
        for column in ("first_created_at", "last_completed_at"):
            entry[column] = None if pd.isna(row[column]) else int(row[column])
        result.append(entry)
    return result


# -- boundaries ------------------------------------------------------------------------------


def recorded(ops: Database, *, after: int | None = None) -> list[Boundary]:
    """Recorded boundaries, by when they were reached; only those recorded strictly
    after ``after`` when given (a review shows those since the previous one)."""
    query = select(ops_phase_boundaries).order_by(ops_phase_boundaries.c.reached_at)
    if after is not None:
        query = query.where(ops_phase_boundaries.c.recorded_at > after)
    with ops.read() as conn:
        return [Boundary(r.phase, r.reached_at, r.recorded_at, r.last_task_id, r.tasks or 0,
                         tuple(json.loads(r.promoted or "[]"))) for r in conn.execute(query)]


def record_boundaries(board_db: Database, ops: Database, mapping: Mapping[str, PhaseOf], *,
                      promote_next: bool = False, now: float | None = None) -> list[Boundary]:
    """Record every phase whose tasks are all done or archived and that was not
    recorded yet; returns the ones this call recorded (a racing caller gets none)."""
    ts = epoch(now)
    done_before = {b.phase for b in recorded(ops)}
    with board_db.read() as conn:
        rows = conn.execute(select(tasks.c.id, tasks.c.status, tasks.c.completed_at)).all()
    by_phase: dict[str, list[tuple[str, str, int | None]]] = {}
    for task_id, status, completed in rows:
        if task_id in mapping:
            by_phase.setdefault(mapping[task_id].phase, []).append((task_id, status, completed))
    new: list[Boundary] = []
    for phase in sorted(by_phase, key=order_key):
        members = by_phase[phase]
        if phase in done_before or any(status not in FINISHED for _, status, _ in members):
            continue
        finished = [(completed or 0, task_id) for task_id, _, completed in members]
        reached, last = max(finished)
        boundary = Boundary(phase, reached or ts, ts, last, len(members))
        if not _insert_once(ops, boundary):
            continue
        if promote_next:
            boundary = _promote_next(board_db, ops, boundary, mapping, ts)
        new.append(boundary)
        log.info("phase %s finished (%d tasks; last %s)", phase, len(members), last)
    return new


def _insert_once(ops: Database, boundary: Boundary) -> bool:
    try:
        with ops.write() as conn:
            conn.execute(insert(ops_phase_boundaries).values(
                phase=boundary.phase, reached_at=boundary.reached_at, recorded_at=boundary.recorded_at,
                last_task_id=boundary.last_task_id, tasks=boundary.tasks, promoted="[]"))
            conn.execute(insert(ops_events).values(
                created_at=boundary.recorded_at, kind="phase_boundary", subject=boundary.phase,
                payload=json.dumps({"reached_at": boundary.reached_at, "last_task_id": boundary.last_task_id,
                                    "tasks": boundary.tasks})))
        return True
    except IntegrityError:
        return False  # another runner recorded it first


def _promote_next(board_db: Database, ops: Database, boundary: Boundary,
                  mapping: Mapping[str, PhaseOf], now: int) -> Boundary:
    following = next_phase(boundary.phase, (p.phase for p in mapping.values()))
    if following is None:
        return boundary
    with board_db.read() as conn:
        todo = [t for t, in conn.execute(select(tasks.c.id).where(tasks.c.status == Status.TODO))
                if t in mapping and mapping[t].phase == following]
    promoted = []
    for task_id in sorted(todo):
        try:
            board.promote(board_db, task_id, actor="review",
                          reason=f"phase {boundary.phase} finished; promoting {following}", now=now)
            promoted.append(task_id)
        except Refused as refused:
            log.info("not promoting %s: %s", task_id, refused)
    with ops.write() as conn:
        conn.execute(update(ops_phase_boundaries).where(ops_phase_boundaries.c.phase == boundary.phase)
                     .values(promoted=json.dumps(promoted)))
    return Boundary(boundary.phase, boundary.reached_at, boundary.recorded_at, boundary.last_task_id,
                    boundary.tasks, tuple(promoted))
