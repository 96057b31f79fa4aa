"""Opening the two databases SparkOps works on: the board and the ops store.

``open_store(settings)`` is what the CLI, the runner and the app call. It checks
before it writes: a SQLite file that is not a database, a database of a newer
schema, or an unreachable PostgreSQL gives one :class:`StorageError` and leaves
everything as it was. Only ``create=True`` (``sparkops init``, ``up``, the
runner) creates databases; other commands ask you to run ``init`` first.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from sparkops.config import Settings
from sparkops.core import clock
from sparkops.core.errors import StorageError
from sparkops.storage import schema
from sparkops.storage.db import Database

log = logging.getLogger(__name__)


@dataclass
class Store:
    board: Database
    ops: Database

    def dispose(self) -> None:
        self.board.dispose()
        self.ops.dispose()


def open_store(settings: Settings, *, create: bool = False, now: int | None = None) -> Store:
    busy = settings["storage.busy_timeout_ms"]
    board = Database(settings["storage.board_url"], role="board", busy_timeout_ms=busy)
    ops = Database(settings["storage.ops_url"], role="ops", busy_timeout_ms=busy)
    now = int(time.time()) if now is None else now
    open_database(board, "board", create=create, now=now)
    open_database(ops, "ops", create=create, now=now)
    if not board.is_sqlite:
        clock.follow_database(board)  # hosts compare timestamps: use the database's clock
    return Store(board=board, ops=ops)


def open_database(db: Database, component: str, *, create: bool, now: int) -> None:
    """Validate ``db`` and bring its schema up to date (see module docstring)."""
    db.check_file()
    if db.is_sqlite and not db.exists() and not create:
        raise StorageError(
            f"the {component} database {db.path} does not exist yet; "
            "run `python -m sparkops init` (or check storage.%s_url)" % component
        )
    if not db.is_sqlite:
        db.ping()
    version, tables = schema.inspect_database(db, component)
    schema.refuse_newer(db, component, version)
    missing = [t for t in schema.required_tables(component) if t not in tables]
    if missing and tables and component == "board" and not _looks_like_board(tables):
        raise StorageError(
            f"{db.display_url} holds tables but no kanban board (missing {', '.join(missing)}); "
            "SparkOps will not add a board to another application's database. "
            "Point storage.board_url at a Hermes kanban.db or a new file"
        )
    if missing and not create:
        raise StorageError(
            f"the {component} database {db.display_url} has no SparkOps schema "
            f"(missing {', '.join(missing)}); run `python -m sparkops init`"
        )
    if create:
        db.prepare_location()
        db.check_integrity()
    latest = schema.BOARD_SCHEMA_VERSION if component == "board" else schema.OPS_SCHEMA_VERSION
    if version < latest or missing:
        for migration in schema.migrate(db, component, now=now):
            log.info("%s database %s: applied migration v%d (%s)", component,
                     db.display_url, migration.version, migration.description)


def _looks_like_board(tables: set[str]) -> bool:
    """True for an empty database, a board, or one that holds only SparkOps' own tables."""
    foreign = {t for t in tables if t != "sqlite_sequence" and not t.startswith("ops_")}
    return "tasks" in tables or not foreign
