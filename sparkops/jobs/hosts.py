"""The fleet: the hosts that run jobs runners on one shared board.

* Every runner heartbeats its row in ``ops_hosts`` (name, pid, capacity, version,
  labels and a GPU summary in ``info``) every :data:`HEARTBEAT_SECONDS`
  (:func:`heartbeat`); a host whose heartbeat is older than :data:`STALE_SECONDS`
  (three missed beats) is **down**, or **stopped** when its runner said so on the
  way out (:func:`state_of`, the one rule: Home, Jobs, Fleet and ``sparkops hosts``).
  A down host's runs are reclaimed by the other hosts' reclaimers through the run
  heartbeats (``reclaim.heartbeat_timeout_seconds``), never by a PID check (see
  :mod:`sparkops.engine.reclaim`).
* A host has labels (``host.labels``, ``key=value``) that tasks may require
  (:mod:`sparkops.board.requirements`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, insert, select, update

from sparkops.board import model
from sparkops.core import json_text
from sparkops.core.clock import epoch
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_hosts, task_runs

#: How often a runner heartbeats its row.
HEARTBEAT_SECONDS = 30.0
#: A runner whose heartbeat is older than this is down (three missed beats).
STALE_SECONDS = 3 * HEARTBEAT_SECONDS

# -- hosts ---------------------------------------------------------------------------------


def state_of(heartbeat_at: int, stopped_at: int | None, now: float, *,
             stale_after: float = STALE_SECONDS) -> str:
    """``up``, ``down`` (no heartbeat for ``stale_after`` seconds) or ``stopped``."""
    if stopped_at is not None:
        return "stopped"
    return "down" if now - int(heartbeat_at) > stale_after else "up"


def heartbeat(ops: Database, host: str, *, pid: int, boot_id: str, version: str, capacity: int,
              info: Mapping[str, Any], now: float, stopping: bool = False) -> None:
    """Register ``host``'s runner, or say it is still alive (or, ``stopping``, that it stopped)."""
    ts = epoch(now)
    values: dict[str, Any] = {"pid": pid, "boot_id": boot_id, "version": version, "capacity": capacity,
                              "heartbeat_at": ts, "info": json_text.text_of(dict(info)),
                              "stopped_at": ts if stopping else None}
    with ops.write() as conn:
        if not conn.execute(update(ops_hosts).where(ops_hosts.c.host == host).values(**values)).rowcount:
            conn.execute(insert(ops_hosts).values(host=host, started_at=ts, **values))


def rows(ops: Database) -> list[dict[str, Any]]:
    """Every runner's row, by host, ``info`` decoded (a malformed one as ``{}``)."""
    with ops.read() as conn:
        found = [dict(r._mapping) for r in conn.execute(select(ops_hosts).order_by(ops_hosts.c.host))]
    for row in found:
        row["info"] = json_text.object_of(row.get("info"))
    return found


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


def hosts(ops: Database, board_db: Database, *, timeout_seconds: float = STALE_SECONDS,
          now: float | None = None) -> list[Host]:
    """Every host that ever ran a runner here, with its state and open runs."""
    ts = epoch(now)
    with ops.read() as conn:
        rows = conn.execute(select(ops_hosts).order_by(ops_hosts.c.host)).all()
    runs = open_runs_by_host(board_db)
    found = []
    for row in rows:
        info = json_text.object_of(row.info)
        age = ts - int(row.heartbeat_at)
        state = state_of(row.heartbeat_at, row.stopped_at, ts, stale_after=timeout_seconds)
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
            host = model.host_of_lock(lock)
            counts[host] = counts.get(host, 0) + int(n)
    return counts


