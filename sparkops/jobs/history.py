"""What the jobs did: ``ops_job_runs``, one row per recorded run (start, end,
duration, outcome, summary, error, problems). This module writes and reads it;
:func:`sparkops.jobs.framework.run_job` records through :func:`record`, the pages
and the CLI read through :func:`runs` and :func:`latest_per_job`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from sqlalchemy import desc, func, insert, select

from sparkops.core.clock import epoch
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_job_runs


def record(ops: Database, *, job: str, host: str, trigger: str, started_at: float, duration_seconds: float,
           outcome: str, summary: str, error: str | None, problems: int) -> None:
    """Add one run of ``job`` on ``host`` (this process's pid)."""
    with ops.write() as conn:
        conn.execute(insert(ops_job_runs).values(
            job=job, host=host, pid=os.getpid(), trigger=trigger,
            started_at=epoch(started_at), ended_at=epoch(started_at + duration_seconds),
            duration_ms=int(duration_seconds * 1000), outcome=outcome,
            summary=summary[:2000], error=error, problems=problems,
        ))


def runs(ops: Database, *, jobs: Sequence[str] = (), outcomes: Sequence[str] = (), host: str | None = None,
         since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Recorded runs, newest first, filtered by job, outcome, host and start time."""
    query = select(ops_job_runs)
    if jobs:
        query = query.where(ops_job_runs.c.job.in_(list(jobs)))
    if outcomes:
        query = query.where(ops_job_runs.c.outcome.in_(list(outcomes)))
    if host is not None:
        query = query.where(ops_job_runs.c.host == host)
    if since is not None:
        query = query.where(ops_job_runs.c.started_at >= since)
    query = query.order_by(desc(ops_job_runs.c.id)).limit(limit)
    with ops.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def latest_per_job(ops: Database, host: str) -> dict[str, dict[str, Any]]:
    """The latest recorded run of each job on ``host``: job -> row."""
    latest = (select(func.max(ops_job_runs.c.id).label("id"))
              .where(ops_job_runs.c.host == host).group_by(ops_job_runs.c.job).subquery())
    query = select(ops_job_runs).join(latest, ops_job_runs.c.id == latest.c.id)
    with ops.read() as conn:
        return {r.job: dict(r._mapping) for r in conn.execute(query)}
