"""The fleet: the hosts that run jobs runners on one shared board, their labels,
and what tasks require of the host that runs them.

* Every runner heartbeats its row in ``ops_hosts`` (name, pid, capacity, version,
  labels and a GPU summary in ``info``) every 30 s; a host whose heartbeat is older
  than ``reclaim.heartbeat_timeout_seconds`` is **down** (or **stopped** when its
  runner said so on the way out). Its runs are reclaimed by the other hosts'
  reclaimers through the run heartbeats, never by a PID check (see
  :mod:`sparkops.reclaim`).
* A host has labels (``host.labels``, ``key=value``); a task may require labels
  (``ops_task_requirements``). The dispatcher of a host claims only tasks whose
  requirements its labels satisfy: :func:`excluded_for` gives the others.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

from sqlalchemy import delete, func, insert, select

from sparkops import board as board_mod
from sparkops.clock import epoch
from sparkops.db import Database
from sparkops.errors import InvalidInput, NotFound
from sparkops.schema import ops_hosts, ops_task_requirements, task_runs, tasks

_LABEL = re.compile(r"^[A-Za-z0-9_.-]+=[A-Za-z0-9_.:/-]+$")


def parse_label(text: str, *, what: str = "label") -> str:
    """``key=value``, trimmed; :class:`InvalidInput` naming the problem otherwise."""
    label = str(text).strip()
    if not _LABEL.match(label):
        raise InvalidInput(f"{what} {text!r} is not key=value (letters, digits, . _ - ; e.g. gpu=gb10)")
    return label


def parse_labels(values: Iterable[str], *, what: str = "label") -> list[str]:
    return sorted({parse_label(v, what=what) for v in values})


# -- task requirements ----------------------------------------------------------------


def require(board_db: Database, ops: Database, task_id: str, labels: Iterable[str], *,
            now: float | None = None) -> list[str]:
    """Add ``labels`` to what ``task_id`` requires; returns all its requirements."""
    wanted = parse_labels(labels, what="requirement")
    _check_task(board_db, task_id)
    ts = epoch(now)
    with ops.write() as conn:
        have = set(conn.execute(select(ops_task_requirements.c.label)
                                .where(ops_task_requirements.c.task_id == task_id)).scalars())
        for label in wanted:
            if label not in have:
                conn.execute(insert(ops_task_requirements).values(task_id=task_id, label=label, created_at=ts))
    return requirements_of(ops, task_id)


def unrequire(ops: Database, task_id: str, labels: Iterable[str] | None = None) -> list[str]:
    """Drop ``labels`` (all when None) from ``task_id``'s requirements; returns what is left."""
    with ops.write() as conn:
        query = delete(ops_task_requirements).where(ops_task_requirements.c.task_id == task_id)
        if labels is not None:
            query = query.where(ops_task_requirements.c.label.in_(parse_labels(labels, what="requirement")))
        conn.execute(query)
    return requirements_of(ops, task_id)


def requirements_of(ops: Database, task_id: str) -> list[str]:
    with ops.read() as conn:
        return sorted(conn.execute(select(ops_task_requirements.c.label)
                                   .where(ops_task_requirements.c.task_id == task_id)).scalars())


def all_requirements(ops: Database) -> dict[str, set[str]]:
    """``{task_id: {label, ...}}`` for every task that requires something."""
    found: dict[str, set[str]] = {}
    with ops.read() as conn:
        for task_id, label in conn.execute(select(ops_task_requirements.c.task_id, ops_task_requirements.c.label)):
            found.setdefault(task_id, set()).add(label)
    return found


def excluded_for(ops: Database, labels: Iterable[str]) -> set[str]:
    """The tasks a host with ``labels`` must not claim (it lacks one they require)."""
    have = set(labels)
    return {task_id for task_id, need in all_requirements(ops).items() if not need <= have}


def _check_task(board_db: Database, task_id: str) -> None:
    with board_db.read() as conn:
        if conn.execute(select(tasks.c.id).where(tasks.c.id == task_id)).first() is None:
            raise NotFound("task", task_id)


# -- hosts ---------------------------------------------------------------------------------


@dataclass
class Host:
    host: str
    state: str  # up | down | stopped
    pid: int
    version: str | None
    capacity: int | None
    started_at: int
    heartbeat_at: int
    stopped_at: int | None
    heartbeat_age: int
    labels: list[str] = field(default_factory=list)
    gpu: dict[str, Any] = field(default_factory=dict)
    open_runs: int = 0

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def hosts(ops: Database, board_db: Database, *, timeout_seconds: int,
          now: float | None = None) -> list[Host]:
    """Every host that ever ran a runner here, with its state and open runs."""
    ts = epoch(now)
    with ops.read() as conn:
        rows = conn.execute(select(ops_hosts).order_by(ops_hosts.c.host)).all()
    runs = open_runs_by_host(board_db)
    found = []
    for row in rows:
        info = _json(row.info)
        age = ts - int(row.heartbeat_at)
        state = "stopped" if row.stopped_at else ("down" if age > timeout_seconds else "up")
        found.append(Host(host=row.host, state=state, pid=row.pid, version=row.version, capacity=row.capacity,
                          started_at=int(row.started_at), heartbeat_at=int(row.heartbeat_at),
                          stopped_at=row.stopped_at, heartbeat_age=age, labels=list(info.get("labels") or []),
                          gpu=dict(info.get("gpu") or {}), open_runs=runs.pop(row.host, 0)))
    return found


def open_runs_by_host(board_db: Database) -> dict[str, int]:
    """Open runs per host, from their claim locks (``host:pid``)."""
    counts: dict[str, int] = {}
    with board_db.read() as conn:
        for lock, n in conn.execute(select(task_runs.c.claim_lock, func.count())
                                    .where(task_runs.c.ended_at.is_(None)).group_by(task_runs.c.claim_lock)):
            host = board_mod.host_of_lock(lock)
            counts[host] = counts.get(host, 0) + int(n)
    return counts


def _json(text: str | None) -> dict[str, Any]:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
