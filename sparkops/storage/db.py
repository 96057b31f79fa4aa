"""Storage: SQLAlchemy engines for SQLite and PostgreSQL, and the transactions.

This is the only module that knows SQLite specifics (pragmas, ``BEGIN IMMEDIATE``,
the file header). Everything else writes dialect-neutral SQLAlchemy Core and asks
for a connection with :meth:`Database.read` or :meth:`Database.write`.

SQLite settings, set once per connection:

* ``journal_mode=WAL`` so readers (the UI) never block the writer;
* ``busy_timeout`` so a writer waits for the lock instead of failing;
* ``synchronous=NORMAL`` (safe with WAL: a crash can lose the last commits, never
  corrupt the file);
* ``foreign_keys=ON``;
* every writing transaction starts with ``BEGIN IMMEDIATE``, so the write lock is
  taken up front and two writers never deadlock upgrading a read lock; SparkOps'
  own writers take turns before that (:mod:`sparkops.storage.turns`).
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError

from sparkops.config import mask_url
from sparkops.core.errors import StorageError
from sparkops.storage.turns import Turns

log = logging.getLogger(__name__)

T = TypeVar("T")

SQLITE_HEADER = b"SQLite format 3\x00"
#: A PostgreSQL connection idle this long is pinged before it is used again.
PING_AFTER_IDLE_SECONDS = 1.0


@dataclass(frozen=True)
class SqliteProbe:
    """What a read-only look at a SQLite file found."""

    user_version: int
    tables: set[str]
    versions: dict[str, int]  # rows of ops_schema_version, if that table exists


class Database:
    """One database (the board or the ops store) and its engine.

    ``role`` names it in messages: ``"board"`` or ``"ops"``.
    """

    def __init__(self, url: str, *, role: str, busy_timeout_ms: int = 30000):
        self.url = url
        self.role = role
        self.display_url = mask_url(url)
        self.busy_timeout_ms = busy_timeout_ms
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self.path: Path | None = Path(url[len("sqlite:///"):].split("?", 1)[0])
            self.engine = _sqlite_engine(self.path, busy_timeout_ms)
            self.turns: Turns | None = Turns(self.path, timeout=busy_timeout_ms / 1000.0)
        elif url.startswith("postgresql"):
            self.dialect = "postgresql"
            self.path = None
            self.engine = _postgres_engine(url)
            self.turns = None
        else:
            raise StorageError(
                f"{role} database URL {self.display_url!r} is not supported; "
                "use sqlite:///PATH or postgresql://USER@HOST/DB"
            )

    # -- where the data lives ------------------------------------------------

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    def exists(self) -> bool:
        """For SQLite: the file exists and is not empty. PostgreSQL always exists."""
        if self.path is None:
            return True
        try:
            return self.path.stat().st_size > 0
        except FileNotFoundError:
            return False

    def check_file(self) -> None:
        """Refuse a SQLite path that is not a readable SQLite database file.

        A missing or empty file is fine (it will be created). Anything else that
        does not start with the SQLite header is left untouched and reported.
        """
        if self.path is None:
            return
        path = self.path
        if path.is_dir():
            raise StorageError(
                f"{self.role} database {path} is a directory; point the URL at a file"
            )
        if not path.exists():
            return
        try:
            with path.open("rb") as fh:
                head = fh.read(len(SQLITE_HEADER))
        except OSError as exc:
            raise StorageError(
                f"cannot read the {self.role} database {path}: {exc.strerror}; "
                "check its permissions"
            ) from exc
        if not head:
            return
        if head != SQLITE_HEADER:
            raise StorageError(
                f"{path} is not a SQLite database (it starts with {head[:16]!r}); "
                f"SparkOps will not touch it. Move it aside or set storage.{self.role}_url "
                "to your board"
            )
        if not os.access(path, os.R_OK | os.W_OK):
            raise StorageError(
                f"the {self.role} database {path} is not readable and writable by this "
                "user; fix its permissions"
            )

    def probe(self) -> SqliteProbe:
        """Read a SQLite file's schema facts over a read-only connection.

        Used before the engine touches the file (the engine switches it to WAL),
        so a database SparkOps refuses is left byte for byte as it was.
        """
        raw = self._readonly_connection()
        try:
            user_version = int(raw.execute("PRAGMA user_version").fetchone()[0])
            tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            versions: dict[str, int] = {}
            if "ops_schema_version" in tables:
                versions = {c: int(v) for c, v in raw.execute(
                    "SELECT component, version FROM ops_schema_version")}
        except sqlite3.DatabaseError as exc:
            if is_disk_full(exc):
                raise StorageError(disk_full_message(self.path)) from exc
            if is_locked(exc):
                raise StorageError(f"the {self.role} database {self.path} is locked by another writer "
                                   f"({exc}); try again") from exc
            raise StorageError(
                f"the {self.role} database {self.path} cannot be read ({exc}); it may be "
                "damaged. SparkOps will not write to it: restore it from a backup or "
                "recover it with `sqlite3 FILE .recover`"
            ) from exc
        finally:
            raw.close()
        return SqliteProbe(user_version=user_version, tables=tables, versions=versions)

    def _readonly_connection(self) -> sqlite3.Connection:
        assert self.path is not None
        # Without a -wal file there is nothing beyond the main file to read, and
        # "immutable" keeps SQLite from creating -wal/-shm sidecars.
        wal_present = Path(f"{self.path}-wal").exists()
        uri = f"file:{self.path}?mode=ro" + ("" if wal_present else "&immutable=1")
        try:
            return sqlite3.connect(uri, uri=True, timeout=self.busy_timeout_ms / 1000.0)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the {self.role} database {self.path}: {exc}") from exc

    def prepare_location(self) -> None:
        """Create the directory of a SQLite file (the data dir) on first use."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def check_integrity(self) -> None:
        """Run SQLite's ``quick_check`` read-only; raise :class:`StorageError` if it fails."""
        if not self.is_sqlite or not self.exists():
            return
        raw = self._readonly_connection()
        try:
            rows = [r[0] for r in raw.execute("PRAGMA quick_check").fetchall()]
        except sqlite3.DatabaseError as exc:
            rows = [str(exc)]
        finally:
            raw.close()
        if any("disk is full" in row for row in rows):
            raise StorageError(disk_full_message(self.path))
        if rows != ["ok"]:
            raise StorageError(
                f"the {self.role} database {self.path} is damaged ({'; '.join(rows[:3])}); "
                "SparkOps will not write to it. Restore it from a backup or recover it with "
                "`sqlite3 FILE .recover`"
            )

    def ping(self) -> None:
        """Open a connection once; turn any failure into one clear message."""
        try:
            with self.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except DBAPIError as exc:
            raise self.error("cannot connect to", exc) from exc

    def error(self, doing: str, exc: BaseException) -> StorageError:
        if is_disk_full(exc):
            return StorageError(disk_full_message(self.path or self.display_url))
        reason = error_line(exc)
        hint = (
            f"check storage.{self.role}_url and that PostgreSQL is running and reachable"
            if not self.is_sqlite
            else "check the file and its permissions"
        )
        return StorageError(f"{doing} the {self.role} database {self.display_url}: {reason}; {hint}")

    def change_token(self) -> object | None:
        """Something that changes whenever anyone commits to this database, read
        without opening it: for SQLite the size and mtime of the file and its WAL.
        None when there is no such cheap signal (PostgreSQL)."""
        if self.path is None:
            return None
        token = []
        for path in (self.path, Path(f"{self.path}-wal")):
            try:
                st = path.stat()
                token.append((st.st_mtime_ns, st.st_size))
            except FileNotFoundError:
                token.append(None)
        return tuple(token)

    def clock_offset(self) -> float | None:
        """The database's clock minus this host's, in seconds (PostgreSQL; None for
        SQLite, whose clock is this host's). Taken at the midpoint of the round trip."""
        if self.is_sqlite:
            return None
        with self.engine.connect() as conn:
            before = time.time()
            db_now = float(conn.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar())
            after = time.time()
        return db_now - (before + after) / 2

    @contextmanager
    def fleet_lock(self, name: str) -> Iterator[bool]:
        """Hold the fleet-wide lock ``name`` for the block, if no other process holds
        it: yields True when held, False when another host has it.

        PostgreSQL: a session advisory lock on a connection of its own, released when
        the block ends or, if this process dies, when its connection does. SQLite is
        one host, whose job locks (flock) already do this: always True."""
        if self.is_sqlite:
            yield True
            return
        with self.engine.connect() as conn:
            key = {"key": f"sparkops-fleet:{name}"}
            held = bool(conn.execute(text("SELECT pg_try_advisory_lock(hashtext(:key))"), key).scalar())
            conn.commit()
            try:
                yield held
            finally:
                if held:
                    conn.execute(text("SELECT pg_advisory_unlock(hashtext(:key))"), key)
                    conn.commit()

    def serialize_claims(self, conn: Connection, key: str) -> None:
        """Make claims for ``key`` (a host) one at a time until this transaction ends.

        SQLite already runs one writer at a time (``BEGIN IMMEDIATE``); PostgreSQL
        takes a transaction-scoped advisory lock, so counting a host's open runs
        and claiming one cannot interleave with another dispatcher of that host."""
        if not self.is_sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"),
                         {"key": f"sparkops-claim:{key}"})

    # -- SQLite's header field for the board's schema version (see schema.py) --

    @staticmethod
    def sqlite_user_version(conn: Connection) -> int:
        return int(conn.exec_driver_sql("PRAGMA user_version").scalar() or 0)

    @staticmethod
    def set_sqlite_user_version(conn: Connection, version: int) -> None:
        conn.exec_driver_sql(f"PRAGMA user_version={int(version)}")

    # -- transactions ---------------------------------------------------------

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A read transaction (a consistent snapshot; takes no write lock)."""
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    @contextmanager
    def snapshot(self) -> Iterator[Connection]:
        """A read transaction that sees one state of the database throughout, however
        many statements it runs: SQLite in WAL mode gives that to any read
        transaction; PostgreSQL needs REPEATABLE READ (read only)."""
        if self.is_sqlite:
            with self.read() as conn:
                yield conn
            return
        with self.engine.connect() as conn:
            conn.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
            with conn.begin():
                yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A writing transaction; on SQLite it starts with ``BEGIN IMMEDIATE``, in this
        process's turn among SparkOps' writers of the file."""
        if self.turns is None:
            with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        with self.turns.turn(), self.engine.connect() as conn:
            with conn.execution_options(sparkops_begin="BEGIN IMMEDIATE").begin():
                yield conn

    def dispose(self) -> None:
        self.engine.dispose()
        if self.turns is not None:
            self.turns.close()

    def __repr__(self) -> str:
        return f"Database({self.role}, {self.display_url})"


def error_line(exc: BaseException) -> str:
    """The first line of a database error (the driver's own message, when there is one)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_disconnect(exc: BaseException) -> bool:
    """A lost or refused connection to a database server (worth retrying), as
    opposed to a refused statement or SQLite's own errors."""
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError) and "sqlite" not in type(exc.orig).__module__


def is_locked(exc: BaseException) -> bool:
    """SQLite's write lock held by another process past busy_timeout ("database is
    locked" / "busy"): the database is fine, only busy; worth trying again."""
    orig = getattr(exc, "orig", exc)
    if not isinstance(orig, sqlite3.OperationalError):
        return False
    code = getattr(orig, "sqlite_errorcode", None)
    return code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED) or "database is locked" in str(orig)


def is_disk_full(exc: BaseException | None) -> bool:
    """A write failed because the disk (or quota) is full, here or as the cause of
    another error; the database itself is not damaged."""
    seen = 0
    while exc is not None and seen < 5:
        orig = getattr(exc, "orig", None) or exc
        if isinstance(orig, OSError) and orig.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if isinstance(orig, sqlite3.Error) and (getattr(orig, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL
                                                or "database or disk is full" in str(orig)):
            return True
        exc, seen = exc.__cause__, seen + 1
    return False


def disk_full_message(path: object) -> str:
    return (f"the disk holding {path} is full: SparkOps cannot write there until space is freed "
            "(`python -m sparkops disk --force` deletes old logs and finished workspaces); the "
            "database itself is not damaged")


def retrying(fn: Callable[[], T], *, seconds: float, what: str,
             sleep: Callable[[float], None] = time.sleep) -> T:
    """``fn()``, tried again with backoff (0.5 s doubling to 5 s) while the database
    is unreachable, or a SQLite database is locked by another writer past its
    busy_timeout, for up to ``seconds``; the last error is raised after that.
    ``fn`` must be a whole transaction: a retry runs it again from the start."""
    deadline = time.monotonic() + seconds
    wait = 0.5
    while True:
        try:
            return fn()
        except (DBAPIError, StorageError) as exc:
            cause = exc if isinstance(exc, DBAPIError) else exc.__cause__
            left = deadline - time.monotonic()
            if cause is None or not (is_disconnect(cause) or is_locked(cause)) or left <= 0:
                raise
            reason = error_line(cause)
            log.warning("%s: the database is %s (%s); retrying for up to %.0f s more",
                        what, "locked by another writer" if is_locked(cause) else "unreachable", reason, left)
            sleep(min(wait, left))
            wait = min(wait * 2, 5.0)


def _sqlite_engine(path: Path, busy_timeout_ms: int) -> Engine:
    engine = create_engine(
        f"sqlite:///{path}",
        connect_args={"timeout": busy_timeout_ms / 1000.0, "check_same_thread": False},
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):  # noqa: ANN001
        # Let SQLAlchemy's "begin" event below emit BEGIN itself (pysqlite's own
        # implicit BEGIN is deferred and would not take the write lock).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            mode = cur.execute("PRAGMA journal_mode").fetchone()[0]
            if str(mode).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn):  # noqa: ANN001
        conn.exec_driver_sql(conn.get_execution_options().get("sparkops_begin", "BEGIN"))

    return engine


def _postgres_engine(url: str) -> Engine:
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url[len("postgresql://"):]
    engine = create_engine(url, connect_args={"connect_timeout": 5, "application_name": "sparkops"})

    # SQLAlchemy's pool_pre_ping costs a round trip per transaction; a connection
    # given back a moment ago is used as it is (a claim loop runs many transactions
    # a second), one idle longer is pinged first, so one the server dropped
    # (a restart) is replaced, not handed out.
    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_conn, record):  # noqa: ANN001
        record.info["idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_conn, record, _proxy):  # noqa: ANN001
        idle_since = record.info.pop("idle_since", None)
        if idle_since is None or time.monotonic() - idle_since < PING_AFTER_IDLE_SECONDS:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_conn)
        except Exception as exc:  # noqa: BLE001 - any failure means: a new connection
            raise DisconnectionError(f"a pooled connection is gone: {exc}") from exc
        if not alive:
            raise DisconnectionError("a pooled connection is gone")

    return engine

