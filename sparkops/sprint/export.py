"""Export: the board as CSV and JSON files, for sprint review and remote monitoring.

:func:`export` writes five files into ``export.dir`` (``docs/export.md`` documents
every column):

* ``tasks.csv``, ``runs.csv``, ``phases.csv``: the sprint-review tables, with fixed
  columns in a fixed order (:data:`TASK_COLUMNS`, :data:`RUN_COLUMNS`,
  :data:`PHASE_COLUMNS`); ``events.csv`` (:data:`EVENT_COLUMNS`). Each run's and
  each task's usage (tokens, GPU energy and time, costs) is in the columns at the end
  of ``runs.csv`` and ``tasks.csv`` (:mod:`sparkops.sprint.export_usage`);
* ``board.json``: the same tables as ``{"columns": [...], "rows": [[...]]}`` (typed,
  text raw), the metrics, the prices and total usage, when and from which board it
  was made, and each CSV's rows, bytes and SHA-256.

**Format.** UTF-8 without a BOM; the CSV dialect is RFC 4180 as Python's ``csv``
writes it (comma, ``"`` quoting only where needed, ``""`` inside quotes, CRLF between
rows, newlines inside a quoted cell kept as they are). Times are ISO 8601 UTC to the
second (``2026-11-29T04:20:00Z``), empty (``null`` in JSON) when unset; durations are
whole seconds; usage figures are floats as Python writes them, empty when not
measured (never 0). A text cell that a spreadsheet would run as a formula (it starts with
``=``, ``+``, ``-``, ``@``, a tab or a carriage return) is written with a ``'`` in
front (OWASP's advice against CSV injection); so that this stays reversible, a cell
that starts with ``'`` gets one more. :func:`read_csv_rows` undoes it. Numbers and
JSON are never escaped.

**Atomicity.** Every file is written to ``.NAME.tmp-<random>`` in the export
directory, flushed and fsync'ed; only when all five are complete are they renamed over
the old ones (``os.replace``, CSVs first, ``board.json`` last) and the directory is
fsync'ed. So:

1. a reader never sees a partly written file: each name always holds a complete
   file, the previous export's or the new one's;
2. an export that fails or is killed before the renames (a database error, a full
   disk, an exception, SIGKILL) leaves every previous file byte for byte as it was;
   so does a rename that fails (an exception): the renames already done are undone
   from hard links of the previous files made just before. Temporary files are
   removed on an exception, and by the next export after a kill;
3. only a crash in the microseconds between the first and the last rename can leave
   files of two consecutive exports side by side, each whole. ``board.json``, renamed
   last, lists the SHA-256 of each CSV it was exported with, and
   :func:`verify_export` compares them.

All files come from one read transaction (one snapshot of the board), and one export
at a time writes into a directory (an ``flock`` on ``.export.lock`` there). The usage
figures are the ops database's, read chunk by chunk as the rows are written.

**Memory.** Rows are streamed from the database in chunks of :data:`CHUNK_ROWS` and
written as they come, each chunk's usage read with it; what is held whole is per task
(its run count, its parents, the phase summary), never per run or event.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from sparkops.board import phases
from sparkops.board.model import Status
from sparkops.board.phases import order_key
from sparkops.config import mask_url
from sparkops.core.clock import epoch
from sparkops.core.errors import SparkOpsError
from sparkops.jobs.framework import JobContext, JobLock, JobReport
from sparkops.meters.spend import Prices
from sparkops.sprint import cells, file_set
from sparkops.sprint.export_usage import RUN_USAGE, TASK_USAGE, UsageColumns, numbers
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_events, ops_reports, task_events, task_links, task_runs, tasks

log = logging.getLogger(__name__)

#: Rows fetched from the database and written per step.
CHUNK_ROWS = 5000
#: The phase of a task that has none (no ``phase_of`` given, or the task is not in it).
NO_PHASE = "(none)"
#: Written to ``board.json`` as ``format`` and ``version``; raised when a column is
#: removed or changes meaning, not when one is added at the end of a table.
FORMAT, FORMAT_VERSION = "sparkops-board-export", 1
LOCK_NAME = ".export.lock"


@dataclass(frozen=True)
class Column:
    """One exported column. ``kind``: text | integer | number | time | seconds | ids."""

    name: str
    kind: str


def _columns(spec: str) -> tuple[Column, ...]:
    return tuple(Column(*item.split(":")) for item in spec.split())


#: tasks.csv, one row per task, by id.
TASK_COLUMNS = _columns(
    "id:text title:text phase:text status:text assignee:text priority:integer created_by:text "
    "created_at:time started_at:time completed_at:time lead_time_seconds:seconds "
    "cycle_time_seconds:seconds runs:integer parents:ids consecutive_failures:integer "
    "block_kind:text last_failure_error:text result:text body:text " + TASK_USAGE
)
#: runs.csv, one row per run (attempt), by id.
RUN_COLUMNS = _columns(
    "id:integer task_id:text phase:text profile:text step_key:text status:text outcome:text "
    "started_at:time ended_at:time duration_seconds:seconds last_heartbeat_at:time "
    "claim_lock:text worker_pid:integer summary:text error:text metadata:text " + RUN_USAGE
)
#: The usage columns at the end of tasks.csv and runs.csv (empty: not measured).
TASK_USAGE_COLUMNS, RUN_USAGE_COLUMNS = _columns(TASK_USAGE), _columns(RUN_USAGE)
#: events.csv, one row per event, by id.
EVENT_COLUMNS = _columns("id:integer task_id:text run_id:integer kind:text created_at:time payload:text")
#: phases.csv, one row per phase, in phase order (P1, P2, ..., named phases, ``(none)``).
PHASE_COLUMNS = _columns(
    "phase:text total:integer done:integer archived:integer open:integer blocked:integer "
    "running:integer first_created_at:time last_completed_at:time"
)

#: file name -> its columns; also the order in which the files are renamed into place.
CSV_FILES: dict[str, tuple[Column, ...]] = {
    "tasks.csv": TASK_COLUMNS,
    "runs.csv": RUN_COLUMNS,
    "events.csv": EVENT_COLUMNS,
    "phases.csv": PHASE_COLUMNS,
}
JSON_FILE = "board.json"
FILES = (*CSV_FILES, JSON_FILE)


class ExportError(SparkOpsError):
    """The export directory cannot be written."""

    def __init__(self, directory: Path, reason: str):
        self.directory = directory
        super().__init__(f"cannot export to {directory}: {reason}; check export.dir, its permissions "
                         "and the free space there (the previous export is left as it was)")


@dataclass(frozen=True)
class ExportedFile:
    name: str
    rows: int  # data rows (CSV header not counted); for board.json, all rows it holds
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ExportResult:
    directory: Path
    generated_at: int
    files: dict[str, ExportedFile]
    seconds: float
    stale_removed: int = 0  # temporary files of a killed export, removed

    @property
    def bytes(self) -> int:
        return sum(f.bytes for f in self.files.values())

    def rows(self, name: str) -> int:
        return self.files[name].rows

    def summary(self) -> str:
        return (f"exported {self.rows('tasks.csv')} tasks, {self.rows('runs.csv')} runs, "
                f"{self.rows('events.csv')} events, {self.rows('phases.csv')} phases to "
                f"{self.directory} ({_size(self.bytes)} in {self.seconds:.2f} s)")

    def as_dict(self) -> dict[str, Any]:
        return {
            "directory": str(self.directory), "generated_at": self.generated_at,
            "seconds": round(self.seconds, 3), "bytes": self.bytes, "stale_removed": self.stale_removed,
            "files": {n: {"rows": f.rows, "bytes": f.bytes, "sha256": f.sha256} for n, f in self.files.items()},
        }


# -- the job and the library call ----------------------------------------------------


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """The ``export`` job: phases as the review resolves them, the latest review's
    metrics, into ``export.dir``."""

    resolved = phases.resolve(ctx.store.board, ctx.store.ops, ctx.settings["review.phase_patterns"])
    result = export(ctx, now=now, phase_of={t: p.phase for t, p in resolved.items()},
                    metrics=latest_review_metrics(ctx.store.ops))
    return JobReport(result.summary(), details=result.as_dict())


def latest_review_metrics(ops: Database) -> dict | None:
    """The metrics of the newest review report (``ops_reports``), if any."""
    with ops.read() as conn:
        row = conn.execute(select(ops_reports.c.id, ops_reports.c.created_at, ops_reports.c.metrics)
                           .order_by(ops_reports.c.created_at.desc(), ops_reports.c.id.desc()).limit(1)).first()
    if row is None or not row.metrics:
        return None
    try:
        metrics = json.loads(row.metrics)
    except ValueError:
        log.warning("review report %s has metrics that are not JSON; exporting without them", row.id)
        return None
    return {"report_id": row.id, "report_created_at": cells.iso_time(row.created_at), **metrics} \
        if isinstance(metrics, dict) else {"report_id": row.id, "metrics": metrics}


def export(ctx: JobContext, *, now: float | None = None, directory: str | os.PathLike | None = None,
           phase_of: Mapping[str, str] | None = None, metrics: dict | None = None) -> ExportResult:
    """Write tasks.csv, runs.csv, events.csv, phases.csv and board.json (see the
    module docstring for the format and the guarantees). ``phase_of`` maps task ids
    to phase names; without it every task is in the phase ``(none)``. ``metrics``
    goes into board.json as it is."""
    started = time.perf_counter()
    generated_at = epoch(now)
    target = Path(directory if directory is not None else ctx.settings["export.dir"])
    board_db = ctx.store.board
    try:
        target.mkdir(parents=True, exist_ok=True)
        with JobLock(target / LOCK_NAME):
            stale = file_set.remove_stale_temporaries(target, FILES)
            with file_set.FileSet(target, FILES) as staged:
                try:
                    with board_db.snapshot() as conn:
                        _write_all(conn, staged, phase_of or {}, metrics, generated_at, board_db.display_url,
                                   UsageColumns(ctx.store.ops, Prices.of(ctx.settings)))
                except DBAPIError as exc:
                    raise board_db.error("cannot export from", exc) from exc
                staged.commit()
            files = {n: ExportedFile(n, f.rows, f.bytes, f.sha.hexdigest()) for n, f in staged.files.items()}
    except OSError as exc:
        raise ExportError(target, exc.strerror or str(exc)) from exc
    result = ExportResult(target, generated_at, files, time.perf_counter() - started, stale)
    _record(ctx, result)
    return result


# -- reading an export back ---------------------------------------------------------------


def read_csv_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """The rows of an exported CSV as dicts of text (empty for null), with the
    formula escape undone: what the database held, as text."""
    with open(path, encoding="utf-8", newline="") as fh:
        return [{k: cells.unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def verify_export(directory: str | os.PathLike) -> list[str]:
    """What is wrong with the set of files in ``directory``, or ``[]`` for a whole
    set: a file missing, or a CSV that is not the one ``board.json`` was exported
    with (files of two exports side by side, after a crash between the renames; the
    next export repairs it)."""
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        return [f"{name} is missing" for name in missing]
    try:
        manifest = _manifest(directory / JSON_FILE)
    except (OSError, ValueError) as exc:
        return [f"{JSON_FILE} has no readable list of files ({exc})"]
    problems = []
    for name in CSV_FILES:
        expected = manifest.get(name, {}).get("sha256")
        if _sha256(directory / name) != expected:
            problems.append(f"{name} is not the file {JSON_FILE} was exported with; "
                            "files of two exports are mixed (run the export again)")
    return problems


def _manifest(path: Path) -> dict[str, Any]:
    """The ``files`` member at the end of board.json, without reading the rest."""
    with open(path, "rb") as fh:
        size = fh.seek(0, os.SEEK_END)
        fh.seek(max(0, size - 65536))
        tail = fh.read().decode("utf-8", "replace")
    marker = '\n"files": '
    at = tail.rfind(marker)
    if at < 0:
        raise ValueError('no "files" member at its end')
    files, _ = json.JSONDecoder().raw_decode(tail, at + len(marker))
    return files


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


# -- writing ------------------------------------------------------------------------------


class _Table:
    """One table being written to its CSV file and to its array in board.json."""

    def __init__(self, staged: file_set.FileSet, name: str, key: str):
        self.columns = CSV_FILES[name]
        self.names = [c.name for c in self.columns]
        self.csv_file = staged[name]
        self.json_file = staged[JSON_FILE]
        self.buffer = io.StringIO()
        self.writer = csv.writer(self.buffer)
        self.writer.writerow(self.names)
        self.first = True
        self.json_file.write(f',\n"{key}": {{"columns": {json.dumps(self.names)},\n"rows": [')

    def write(self, columns: list[list[Any]]) -> None:
        """``columns``: one list per column, in order, of JSON values (times already
        as ISO text, ids as lists)."""
        count = len(columns[0]) if columns else 0
        if not count:
            return
        for_csv = []
        for i, (column, values) in enumerate(zip(self.columns, columns)):
            if column.kind == "number":  # finite floats or None, in both files
                values = columns[i] = numbers(values)
            elif column.kind == "text":
                values = cells.escaped(values)
            elif column.kind == "ids":
                values = cells.escaped([" ".join(v) if v else None for v in values])
            for_csv.append(values)
        self.writer.writerows(zip(*for_csv))
        text = json.dumps(list(zip(*columns)), ensure_ascii=False, separators=(",", ":"), default=str)
        self.json_file.write(("\n" if self.first else ",\n") + text[1:-1])
        self.first = False
        self.csv_file.rows += count
        self.json_file.rows += count
        self.flush()

    def flush(self) -> None:
        self.csv_file.write(self.buffer.getvalue())
        self.buffer.seek(0)
        self.buffer.truncate()

    def close(self) -> None:
        self.flush()
        self.json_file.write("\n]}")


def _chunks(conn: Connection, statement) -> Iterator[list[list[Any]]]:
    """The rows of ``statement``, streamed, as lists of columns per chunk."""
    result = conn.execute(statement.execution_options(yield_per=CHUNK_ROWS))
    for part in result.partitions():
        yield list(zip(*part))


def _write_all(conn: Connection, staged: file_set.FileSet, phase_of: Mapping[str, str], metrics: dict | None,
               generated_at: int, board_url: str, usage: UsageColumns) -> None:
    head = {"format": FORMAT, "version": FORMAT_VERSION, "generated_at": cells.iso_time(generated_at),
            "board": mask_url(board_url), "metrics": metrics}
    body = json.dumps(head, ensure_ascii=False, indent=1, default=str)
    staged[JSON_FILE].write(body[:-2])  # without "\n}": the tables follow
    phases = _write_tasks(conn, staged, phase_of, usage)
    _write_runs(conn, staged, phase_of, usage)
    _write_events(conn, staged)
    _write_phases(staged, phases)
    staged[JSON_FILE].write(',\n"usage": ' + json.dumps(usage.summary(), ensure_ascii=False, allow_nan=False))
    files = {name: {"rows": staged[name].rows, "bytes": staged[name].bytes, "sha256": staged[name].sha.hexdigest()}
             for name in CSV_FILES}
    staged[JSON_FILE].write(',\n"files": ' + json.dumps(files) + "\n}\n")


def _write_tasks(conn: Connection, staged: file_set.FileSet, phase_of: Mapping[str, str],
                 usage: UsageColumns) -> dict[str, dict]:
    run_counts = dict(conn.execute(select(task_runs.c.task_id, func.count()).group_by(task_runs.c.task_id)).all())
    parents: dict[str, list[str]] = {}
    for parent, child in conn.execute(select(task_links.c.parent_id, task_links.c.child_id)):
        parents.setdefault(child, []).append(parent)
    for ids in parents.values():
        ids.sort()
    t = tasks.c
    query = select(
        t.id, t.title, t.status, t.assignee, t.priority, t.created_by, t.created_at, t.started_at,
        t.completed_at, (t.completed_at - t.created_at).label("lead"),
        (t.completed_at - t.started_at).label("cycle"), t.consecutive_failures, t.block_kind,
        t.last_failure_error, t.result, t.body,
    ).order_by(t.id)
    phases: dict[str, dict[str, Any]] = {}
    table = _Table(staged, "tasks.csv", "tasks")
    for (ids, title, status, assignee, priority, created_by, created, started, completed, lead, cycle,
         failures, block_kind, last_error, result, body) in _chunks(conn, query):
        phase = [phase_of.get(i, NO_PHASE) for i in ids]
        for p, s, c, d in zip(phase, status, created, completed):
            _count_phase(phases, p, s, c, d)
        table.write([
            ids, title, phase, status, assignee, priority, created_by, cells.times(created), cells.times(started),
            cells.times(completed), lead, cycle, [run_counts.get(i, 0) for i in ids],
            [parents.get(i, []) for i in ids], failures, block_kind, last_error, result, body,
            *usage.of_tasks(conn, ids),
        ])
    table.close()
    return phases


def _count_phase(phases: dict[str, dict[str, Any]], phase: str, status: str, created: Any,
                 completed: Any) -> None:
    entry = phases.get(phase)
    if entry is None:
        entry = phases[phase] = {"phase": phase, "total": 0, "done": 0, "archived": 0, "open": 0,
                                 "blocked": 0, "running": 0, "first_created_at": None,
                                 "last_completed_at": None}
    entry["total"] += 1
    if status == Status.DONE:
        entry["done"] += 1
    elif status == Status.ARCHIVED:
        entry["archived"] += 1
    else:
        entry["open"] += 1
    if status == Status.BLOCKED:
        entry["blocked"] += 1
    elif status == Status.RUNNING:
        entry["running"] += 1
    if created is not None and (entry["first_created_at"] is None or created < entry["first_created_at"]):
        entry["first_created_at"] = created
    if completed is not None and (entry["last_completed_at"] is None or completed > entry["last_completed_at"]):
        entry["last_completed_at"] = completed


def _write_runs(conn: Connection, staged: file_set.FileSet, phase_of: Mapping[str, str],
                usage: UsageColumns) -> None:
    r = task_runs.c
    query = select(
        r.id, r.task_id, r.profile, r.step_key, r.status, r.outcome, r.started_at, r.ended_at,
        (r.ended_at - r.started_at).label("duration"), r.last_heartbeat_at, r.claim_lock, r.worker_pid,
        r.summary, r.error, r.metadata,
    ).order_by(r.id)
    table = _Table(staged, "runs.csv", "runs")
    for (ids, task_ids, profile, step_key, status, outcome, started, ended, duration, heartbeat, claim_lock,
         worker_pid, summary, error, metadata) in _chunks(conn, query):
        table.write([
            ids, task_ids, [phase_of.get(t, NO_PHASE) for t in task_ids], profile, step_key, status,
            outcome, cells.times(started), cells.times(ended), duration, cells.times(heartbeat), claim_lock, worker_pid,
            summary, error, metadata, *usage.of_runs(ids),
        ])
    table.close()


def _write_events(conn: Connection, staged: file_set.FileSet) -> None:
    e = task_events.c
    query = select(e.id, e.task_id, e.run_id, e.kind, e.created_at, e.payload).order_by(e.id)
    table = _Table(staged, "events.csv", "events")
    for ids, task_ids, run_ids, kinds, created, payload in _chunks(conn, query):
        table.write([ids, task_ids, run_ids, kinds, cells.times(created), payload])
    table.close()


def _write_phases(staged: file_set.FileSet, phases: dict[str, dict[str, Any]]) -> None:
    table = _Table(staged, "phases.csv", "phases")
    rows = [phases[p] for p in sorted(phases, key=lambda p: (p == NO_PHASE, order_key(p)))]
    if rows:
        columns = [[row[c.name] for row in rows] for c in PHASE_COLUMNS]
        columns[-2], columns[-1] = cells.times(columns[-2]), cells.times(columns[-1])
        table.write(columns)
    table.close()


def _record(ctx: JobContext, result: ExportResult) -> None:
    """An ``export`` row in ops_events; bookkeeping never fails a good export."""
    try:
        with ctx.store.ops.write() as conn:
            conn.execute(insert(ops_events).values(
                created_at=result.generated_at, kind="export", subject=str(result.directory),
                payload=json.dumps({n: {"rows": f.rows, "bytes": f.bytes} for n, f in result.files.items()}
                                   | {"seconds": round(result.seconds, 3)}),
            ))
    except Exception as exc:  # noqa: BLE001
        log.warning("could not record the export in the ops database: %s", exc)


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")

