"""What a task requires of the host that runs it: ``key=value`` labels in
``ops_task_requirements``. The dispatcher of a host claims only tasks whose
requirements its labels (``host.labels``) satisfy: :func:`excluded_for` gives the others.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import delete, insert, select

from sparkops.core.clock import epoch
from sparkops.core.errors import InvalidInput, NotFound
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_task_requirements, tasks

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
