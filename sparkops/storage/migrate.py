"""Copying a board (and the ops data) from one database to another, verified.

``python -m sparkops migrate --from sqlite:///data/kanban.db --to postgresql://...``
is how an operator moves from the embedded SQLite files to a shared PostgreSQL
(issue 7). The rules:

* The source is only read, in one read transaction (a consistent snapshot), and
  must have exactly this SparkOps' schema version (run ``sparkops init`` against an
  older one first); nothing is written to it.
* The target gets the schema if it has none, and must hold no rows in any table
  being copied: a migrate never merges into or overwrites a board.
* Every row is copied with its ids, table by table in dependency order, in one
  transaction on the target. Before that transaction commits, each table's row
  count and checksum (SHA-256 over the rows in primary-key order, each value in a
  canonical text form) are computed on both sides and compared; any difference
  rolls the whole copy back, so the target is left as it was.
* On PostgreSQL the id sequences are moved past the copied ids.

Stop the jobs runner while migrating: work done on the source after its snapshot
is not copied (the report says if the source changed meanwhile).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, Table, func, select, text
from sqlalchemy.exc import DBAPIError

from sparkops.core.errors import StorageError
from sparkops.storage import schema
from sparkops.storage.db import Database
from sparkops.storage.store import open_database

log = logging.getLogger(__name__)

#: Rows per INSERT batch.
BATCH = 2000


@dataclass
class TableCopy:
    component: str
    table: str
    rows: int
    checksum: str


@dataclass
class MigrationReport:
    source: dict[str, str]
    target: dict[str, str]
    tables: list[TableCopy] = field(default_factory=list)
    seconds: float = 0.0
    source_changed: bool = False

    @property
    def rows(self) -> int:
        return sum(t.rows for t in self.tables)

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "rows": self.rows,
                "seconds": round(self.seconds, 3), "source_changed": self.source_changed,
                "tables": [t.__dict__ for t in self.tables]}


class MigrationMismatch(StorageError):
    """The copy's counts or checksums differ from the source's (it was rolled back)."""

    def __init__(self, table: str, source: tuple[int, str], target: tuple[int, str]):
        self.table, self.source, self.target = table, source, target
        super().__init__(
            f"table {table}: the copy has {target[0]} rows (sha256 {target[1][:12]}) but the source has "
            f"{source[0]} (sha256 {source[1][:12]}); the copy was rolled back, the target is unchanged")


def tables_of(component: str) -> list[Table]:
    """The tables of a component in dependency order (parents before children),
    without ``ops_schema_version`` (each side keeps its own)."""
    metadata = schema.board_metadata if component == "board" else schema.ops_metadata
    return [t for t in metadata.sorted_tables if t.name != "ops_schema_version"]


def canonical(value: Any) -> str:
    """One text form per value, the same whichever database it was read from."""
    if value is None:
        return "\x00"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    return str(value)


def table_digest(conn: Connection, table: Table) -> tuple[int, str]:
    """(row count, sha256) of ``table``, rows in primary-key order."""
    order = list(table.primary_key.columns) or list(table.columns)
    digest, count = hashlib.sha256(), 0
    for row in conn.execute(select(table).order_by(*order).execution_options(stream_results=True)):
        digest.update("\x1f".join(canonical(v) for v in row).encode("utf-8", "surrogatepass"))
        digest.update(b"\x1e")
        count += 1
    return count, digest.hexdigest()


def _check_source(db: Database, component: str) -> None:
    version, tables = schema.inspect_database(db, component)
    missing = [t for t in schema.required_tables(component) if t not in tables]
    if missing:
        raise StorageError(f"the source {component} database {db.display_url} has no SparkOps "
                           f"{component} schema (missing {', '.join(missing)}); check --from")
    latest = schema.BOARD_SCHEMA_VERSION if component == "board" else schema.OPS_SCHEMA_VERSION
    if version != latest:
        schema.refuse_newer(db, component, version)
        raise StorageError(f"the source {component} database {db.display_url} has schema version {version}, "
                           f"this SparkOps copies version {latest}; run `python -m sparkops init` with it "
                           "as storage first (it migrates in place). Nothing was changed")
    absent = [t.name for t in tables_of(component) if t.name not in tables]
    if absent:
        raise StorageError(f"the source {component} database {db.display_url} lacks {', '.join(absent)}; "
                           "run `python -m sparkops init` with it as storage first. Nothing was changed")


def _check_target_empty(db: Database, component: str) -> None:
    version, tables = schema.inspect_database(db, component)
    schema.refuse_newer(db, component, version)
    if not tables:
        return
    busy = []
    with db.read() as conn:
        for table in tables_of(component):
            if table.name in tables and conn.execute(select(func.count()).select_from(table)).scalar_one():
                busy.append(table.name)
    if busy:
        raise StorageError(f"the target {component} database {db.display_url} is not empty ({', '.join(busy)} "
                           "hold rows); migrate copies only into an empty database. Nothing was changed")


def migrate(pairs: Iterable[tuple[str, Database, Database]], *, now: int | None = None,
            progress: Callable[[str], None] = lambda _line: None) -> MigrationReport:
    """Copy each ``(component, source, target)``; see the module docstring."""
    pairs = list(pairs)
    started = time.perf_counter()
    now = int(time.time()) if now is None else now
    for component, source, target in pairs:
        if source.url == target.url:
            raise StorageError(f"--from and --to name the same {component} database ({source.display_url})")
        _check_source(source, component)
        _check_target_empty(target, component)
    report = MigrationReport(source={c: s.display_url for c, s, _ in pairs},
                             target={c: t.display_url for c, _, t in pairs})
    for component, source, target in pairs:
        open_database(target, component, create=True, now=now)  # the schema, if it has none
        before = _row_counts(source, component)
        try:
            with source.read() as src, target.write() as dst:
                for table in tables_of(component):
                    copied = _copy_table(src, dst, table)
                    source_digest = table_digest(src, table)
                    target_digest = table_digest(dst, table)
                    if source_digest != target_digest or copied != source_digest[0]:
                        raise MigrationMismatch(table.name, source_digest, target_digest)
                    if not target.is_sqlite:
                        _advance_sequences(dst, table)
                    report.tables.append(TableCopy(component, table.name, *source_digest))
                    progress(f"{component}.{table.name}: {source_digest[0]:,} rows, "
                             f"sha256 {source_digest[1][:16]} (same on both sides)")
        except DBAPIError as exc:
            raise StorageError(f"copying the {component} database to {target.display_url} failed and was "
                               f"rolled back (the target is unchanged): {str(exc.orig).strip().splitlines()[0]}"
                               ) from exc
        report.source_changed = report.source_changed or before != _row_counts(source, component)
    report.seconds = time.perf_counter() - started
    return report


def _row_counts(db: Database, component: str) -> dict[str, int]:
    """Rows per table, read apart from the copy's snapshot: a change after it shows."""
    with db.read() as conn:
        return {t.name: conn.execute(select(func.count()).select_from(t)).scalar_one() for t in tables_of(component)}


def _copy_table(src: Connection, dst: Connection, table: Table) -> int:
    order = list(table.primary_key.columns) or list(table.columns)
    names = [c.name for c in table.columns]
    copied, batch = 0, []
    for row in src.execute(select(table).order_by(*order).execution_options(stream_results=True)):
        batch.append(dict(zip(names, row)))
        if len(batch) >= BATCH:
            dst.execute(table.insert(), batch)
            copied, batch = copied + len(batch), []
    if batch:
        dst.execute(table.insert(), batch)
        copied += len(batch)
    return copied


def _advance_sequences(dst: Connection, table: Table) -> None:
    """Move each serial column's sequence past the copied ids (PostgreSQL)."""
    for column in table.primary_key.columns:
        if not column.autoincrement or column.type.python_type is not int:
            continue
        sequence = dst.execute(text("SELECT pg_get_serial_sequence(:t, :c)"),
                               {"t": table.name, "c": column.name}).scalar()
        if sequence:
            dst.execute(text(f"SELECT setval(:s, coalesce((SELECT max({column.name}) FROM {table.name}), 0) + 1, "
                             "false)"), {"s": sequence})
