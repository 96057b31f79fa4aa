"""Each run's usage, kept in the ops database beside the board (whose tables stay
Hermes'): every sample a run's shim takes (``ops_meter_samples``, per host) and the
run's share of the meters' increase up to its latest one (``ops_run_usage``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Collection
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError

from sparkops.config import Settings
from sparkops.core import clock, json_text
from sparkops.core.errors import SparkOpsError
from sparkops.meters.reported import Reported
from sparkops.meters.sample import Meter, Sample
from sparkops.meters.usage import Usage, attribute
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_meter_samples, ops_run_usage

log = logging.getLogger(__name__)


def record(db: Database, *, run_id: int, task_id: str, host: str, sample: Sample,
           ended: bool = False, stale_after: float | None = None) -> Usage:
    """Keep ``sample`` (the host's meters now, taken for ``run_id``: at its start, a
    heartbeat or its end) and bring the run's usage up to it. A run's first sample
    opens its row; the usage is shared with the other runs of ``host`` open at the
    same time, as their rows say. A run whose row was not ended but whose latest
    sample is more than ``stale_after`` seconds old (its worker died with it, or
    another tool closed it) counts as having ended there.

    A heartbeat adds the stretches since the run's previous sample to what its row
    holds (its cost does not grow with the run's length); the end counts the whole
    run again from its samples, so a sample another shim wrote a moment late is
    counted right in the end."""
    with db.write() as conn:
        conn.execute(insert(ops_meter_samples).values(host=host, at=sample.at,
                                                      data=json.dumps(sample.as_dict())))
        mine = conn.execute(select(ops_run_usage.c.first_at, ops_run_usage.c.last_at, ops_run_usage.c.data)
                            .where(ops_run_usage.c.run_id == run_id)).first()
        first_at = sample.at if mine is None else float(mine.first_at)
        if mine is None:
            conn.execute(insert(ops_run_usage).values(run_id=run_id, task_id=task_id, host=host,
                                                      first_at=first_at, last_at=sample.at, ended=0))
        so_far = Usage.from_dict(json_text.object_of(mine.data)) if mine is not None and mine.data else None
        start = float(mine.last_at) if so_far is not None and not ended else first_at
        others = conn.execute(
            select(ops_run_usage.c.run_id, ops_run_usage.c.first_at, ops_run_usage.c.last_at, ops_run_usage.c.ended)
            .where(ops_run_usage.c.host == host, ops_run_usage.c.run_id != run_id,
                   ops_run_usage.c.first_at < sample.at,
                   or_(ops_run_usage.c.ended == 0, ops_run_usage.c.last_at > start))).all()
        samples = [Sample.from_dict(json_text.object_of(data)) for (data,) in conn.execute(
            select(ops_meter_samples.c.data).where(ops_meter_samples.c.host == host,
                                                   ops_meter_samples.c.at >= start,
                                                   ops_meter_samples.c.at <= sample.at))]

        def ended_at(row) -> float | None:
            last = float(row.last_at)
            stale = stale_after is not None and last < sample.at - stale_after
            return last if row.ended or stale else None
        runs: dict[int, tuple[float, float | None]] = {
            int(r.run_id): (float(r.first_at), ended_at(r)) for r in others}
        runs[run_id] = (first_at, sample.at if ended else None)
        usage = attribute(samples, runs)[run_id]
        if start != first_at and so_far is not None:
            usage = so_far.plus(usage)
        conn.execute(update(ops_run_usage).where(ops_run_usage.c.run_id == run_id).values(
            last_at=sample.at, ended=int(ended), data=json.dumps(usage.as_dict())))
    return usage


def prune(db: Database, *, before: float) -> int:
    """Delete the samples taken before ``before`` that no open run still needs (an
    open run's usage is counted again from its first sample at its end); an ended
    run's usage is kept in its row. A row not ended whose latest sample is older
    than ``before`` (its worker died unseen) pins nothing. Returns how many went."""
    samples, usage = ops_meter_samples.c, ops_run_usage.c
    oldest_open = (select(func.min(usage.first_at))
                   .where(usage.host == samples.host, usage.ended == 0, usage.last_at >= before)
                   .scalar_subquery())
    with db.write() as conn:
        return conn.execute(delete(ops_meter_samples).where(
            samples.at < before, or_(oldest_open.is_(None), samples.at < oldest_open))).rowcount


def close(db: Database, run_id: int) -> bool:
    """The run ended without a last sample (its worker died): its usage stays what
    its latest sample made it, and it no longer shares the host's later samples."""
    with db.write() as conn:
        return conn.execute(update(ops_run_usage).where(ops_run_usage.c.run_id == run_id,
                                                        ops_run_usage.c.ended == 0)
                            .values(ended=1)).rowcount > 0


def report(db: Database, *, run_id: int, task_id: str, host: str, reported: Reported,
           now: float | None = None) -> None:
    """Keep what the agent of ``run_id`` said it used, beside what was measured. A run
    that was not metered gets a row of its own, ended (it shares no samples)."""
    text = json.dumps(reported.as_dict())
    with db.write() as conn:
        if conn.execute(update(ops_run_usage).where(ops_run_usage.c.run_id == run_id)
                        .values(reported=text)).rowcount:
            return
        at = clock.now() if now is None else float(now)
        conn.execute(insert(ops_run_usage).values(run_id=run_id, task_id=task_id, host=host, first_at=at,
                                                  last_at=at, ended=1, reported=text))


def of_runs(db: Database, run_ids: Collection[int]) -> dict[int, Usage]:
    """The stored usage of each of ``run_ids`` that has any: measured, reported or both."""
    if not run_ids:
        return {}
    return {run_id: usage for run_id, (_task, usage) in
            _read(db, ops_run_usage.c.run_id.in_(sorted(int(r) for r in run_ids))).items()}


def hosts_of(db: Database, run_ids: Collection[int]) -> dict[int, str]:
    """The host each of ``run_ids`` was metered on (its shim's)."""
    if not run_ids:
        return {}
    with db.read() as conn:
        return {int(r): str(h) for r, h in conn.execute(
            select(ops_run_usage.c.run_id, ops_run_usage.c.host)
            .where(ops_run_usage.c.run_id.in_(sorted(int(r) for r in run_ids))))}


def of_tasks(db: Database, task_ids: Collection[str] | None = None) -> dict[str, dict[int, Usage]]:
    """Each task's runs' usage (retries included), for ``task_ids`` or every task."""
    found: dict[str, dict[int, Usage]] = {}
    where = None if task_ids is None else ops_run_usage.c.task_id.in_(sorted(set(task_ids)))
    if task_ids is not None and not task_ids:
        return found
    for run_id, (task_id, usage) in _read(db, where).items():
        found.setdefault(task_id, {})[run_id] = usage
    return found


def _read(db: Database, where: Any) -> dict[int, tuple[str, Usage]]:
    query = select(ops_run_usage.c.run_id, ops_run_usage.c.task_id, ops_run_usage.c.data, ops_run_usage.c.reported)
    with db.read() as conn:
        rows = conn.execute(query if where is None else query.where(where)).all()
    found = {}
    for row in rows:
        usage = Usage.from_dict(json_text.object_of(row.data)) if row.data else Usage()
        usage.reported = Reported.from_dict(json_text.object_of(row.reported)) if row.reported else None
        if row.data or usage.reported:
            found[int(row.run_id)] = (str(row.task_id), usage)
    return found


class RunMeter:
    """One run's metering by its shim: a sample of the host's meters at the run's
    start, heartbeats and end, and what the agent reported. Nothing is kept until
    a source could be read; metering never fails a run (a failure is logged)."""

    def __init__(self, settings: Settings, db: Database, *, run_id: int, task_id: str, host: str):
        self.meter = Meter.of(settings)
        self.db, self.run_id, self.task_id, self.host = db, run_id, task_id, host
        self.stale_after = 3 * settings["dispatch.heartbeat_seconds"]
        self.retention = float(settings["gpu.sample_retention_days"]) * 86400
        self.lock = threading.Lock()  # the shim's listener thread ends it at the agent's report
        self.kept = False  # a sample of this run is kept
        self.ended = False

    def read(self) -> Sample | None:
        if self.meter is None:
            return None
        try:
            return self.meter.read()
        except Exception as exc:  # noqa: BLE001 - the readers say in the sample what failed; this
            # is a surprise, and metering never fails a run
            log.warning("reading the meters failed: %s: %s", type(exc).__name__, exc)
            return None

    def keep(self, *, ended: bool = False, taken: Sample | None = None) -> None:
        """Keep a sample (``taken``, or one read now) for the run; after its end, nothing."""
        with self.lock:
            if self.ended:
                return
            self.ended = ended
            taken = taken or self.read()
            if taken is None or not (taken.measured or self.kept):
                return
            try:
                record(self.db, run_id=self.run_id, task_id=self.task_id, host=self.host, sample=taken,
                       ended=ended, stale_after=self.stale_after)
                self.kept = True
                if ended:  # the host's samples that no open run needs any more, past their retention
                    prune(self.db, before=taken.at - self.retention)
            except (DBAPIError, SparkOpsError) as exc:
                log.warning("keeping run %d's usage failed: %s", self.run_id, exc)

    def report(self, reported: Reported) -> None:
        try:
            report(self.db, run_id=self.run_id, task_id=self.task_id, host=self.host, reported=reported)
        except (DBAPIError, SparkOpsError) as exc:  # the report itself stands
            log.warning("keeping the usage run %d's agent reported failed: %s", self.run_id, exc)
