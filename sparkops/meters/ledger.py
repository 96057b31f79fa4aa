"""Each run's usage, kept in the ops database beside the board (whose tables stay
Hermes'): every sample a run's shim takes (``ops_meter_samples``, per host) and the
run's share of the meters' increase up to its latest one (``ops_run_usage``).
"""

from __future__ import annotations

import json
from collections.abc import Collection

from sqlalchemy import insert, or_, select, update

from sparkops.core import json_text
from sparkops.meters.sample import Sample
from sparkops.meters.usage import Usage, attribute
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_meter_samples, ops_run_usage


def record(db: Database, *, run_id: int, task_id: str, host: str, sample: Sample,
           ended: bool = False, stale_after: float | None = None) -> Usage:
    """Keep ``sample`` (the host's meters now, taken for ``run_id``: at its start, a
    heartbeat or its end) and bring the run's usage up to it. A run's first sample
    opens its row; the usage is shared with the other runs of ``host`` open at the
    same time, as their rows say. A run whose row was not ended but whose latest
    sample is more than ``stale_after`` seconds old (its worker died with it, or
    another tool closed it) counts as having ended there."""
    with db.write() as conn:
        conn.execute(insert(ops_meter_samples).values(host=host, at=sample.at,
                                                      data=json.dumps(sample.as_dict())))
        mine = conn.execute(select(ops_run_usage.c.first_at).where(ops_run_usage.c.run_id == run_id)).first()
        first_at = sample.at if mine is None else float(mine.first_at)
        if mine is None:
            conn.execute(insert(ops_run_usage).values(run_id=run_id, task_id=task_id, host=host,
                                                      first_at=first_at, last_at=sample.at, ended=0))
        others = conn.execute(
            select(ops_run_usage.c.run_id, ops_run_usage.c.first_at, ops_run_usage.c.last_at, ops_run_usage.c.ended)
            .where(ops_run_usage.c.host == host, ops_run_usage.c.run_id != run_id,
                   ops_run_usage.c.first_at < sample.at,
                   or_(ops_run_usage.c.ended == 0, ops_run_usage.c.last_at > first_at))).all()
        samples = [Sample.from_dict(json_text.object_of(data)) for (data,) in conn.execute(
            select(ops_meter_samples.c.data).where(ops_meter_samples.c.host == host,
                                                   ops_meter_samples.c.at >= first_at,
                                                   ops_meter_samples.c.at <= sample.at))]
        def ended_at(row) -> float | None:
            last = float(row.last_at)
            stale = stale_after is not None and last < sample.at - stale_after
            return last if row.ended or stale else None
        runs: dict[int, tuple[float, float | None]] = {
            int(r.run_id): (float(r.first_at), ended_at(r)) for r in others}
        runs[run_id] = (first_at, sample.at if ended else None)
        usage = attribute(samples, runs)[run_id]
        conn.execute(update(ops_run_usage).where(ops_run_usage.c.run_id == run_id).values(
            last_at=sample.at, ended=int(ended), data=json.dumps(usage.as_dict())))
    return usage


def close(db: Database, run_id: int) -> bool:
    """The run ended without a last sample (its worker died): its usage stays what
    its latest sample made it, and it no longer shares the host's later samples."""
    with db.write() as conn:
        return conn.execute(update(ops_run_usage).where(ops_run_usage.c.run_id == run_id,
                                                        ops_run_usage.c.ended == 0)
                            .values(ended=1)).rowcount > 0


def of_runs(db: Database, run_ids: Collection[int]) -> dict[int, Usage]:
    """The stored usage of each of ``run_ids`` that has any."""
    if not run_ids:
        return {}
    with db.read() as conn:
        rows = conn.execute(select(ops_run_usage.c.run_id, ops_run_usage.c.data)
                            .where(ops_run_usage.c.run_id.in_(sorted(int(r) for r in run_ids)))).all()
    return {int(r.run_id): Usage.from_dict(json_text.object_of(r.data)) for r in rows if r.data}
