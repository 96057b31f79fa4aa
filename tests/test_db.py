"""The storage module: SQLite pragmas, BEGIN IMMEDIATE, URL handling."""

from __future__ import annotations

import sqlite3

import pytest
from sqlalchemy import text

from sparkops.core.errors import StorageError
from sparkops.storage.db import Database


def test_sqlite_connection_settings(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/x.db", role="board", busy_timeout_ms=1234)
    with db.read() as conn:
        pragmas = {name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
                   for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")}
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 1234, "synchronous": 1,
                       "foreign_keys": 1}
    db.dispose()


def test_write_takes_the_lock_at_begin(tmp_path):
    """A write transaction holds SQLite's write lock from its first statement on,
    so a second writer cannot start until it ends (no deadlocked lock upgrades)."""
    path = tmp_path / "x.db"
    db = Database(f"sqlite:///{path}", role="board")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    other = sqlite3.connect(path, timeout=0, isolation_level=None)
    with db.write():
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("BEGIN IMMEDIATE")
    other.execute("BEGIN IMMEDIATE")  # free again once the transaction ended
    other.execute("ROLLBACK")
    # a read transaction takes no write lock
    with db.read() as conn:
        conn.execute(text("SELECT count(*) FROM t")).scalar()
        other.execute("BEGIN IMMEDIATE")
        other.execute("INSERT INTO t VALUES (1)")
        other.execute("COMMIT")
    other.close()
    db.dispose()


def test_write_rolls_back_on_error(tmp_path):
    db = Database(f"sqlite:///{tmp_path}/x.db", role="board")
    with db.write() as conn:
        conn.execute(text("CREATE TABLE t (x INTEGER)"))
    with pytest.raises(RuntimeError):
        with db.write() as conn:
            conn.execute(text("INSERT INTO t VALUES (1)"))
            raise RuntimeError("boom")
    with db.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM t")).scalar() == 0
    db.dispose()


def test_unsupported_url_names_role():
    with pytest.raises(StorageError, match="board database URL 'mysql://x' is not supported"):
        Database("mysql://x", role="board")


def test_postgres_url_password_is_masked():
    db = Database("postgresql://ops:s3cret@127.0.0.1:1/board", role="board")
    assert "s3cret" not in db.display_url and "s3cret" not in repr(db)
    with pytest.raises(StorageError) as err:
        db.ping()
    assert "s3cret" not in str(err.value)
    assert "cannot connect to the board database" in str(err.value)
    db.dispose()


def test_no_sqlite_specific_sql_outside_the_storage_module():
    """SQLite-only SQL lives in sparkops/storage/db.py; everything else is dialect-neutral."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sources = [*root.joinpath("sparkops").rglob("*.py"), root / "jobs_runner.py"]
    offenders = []
    for path in sources:
        if path.name == "db.py" and path.parent.name == "storage":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if any(word in code for word in ("PRAGMA ", "BEGIN IMMEDIATE", "sqlite_master",
                                             "INSERT OR ", "exec_driver_sql")):
                offenders.append(f"{path.relative_to(root)}:{number}: {line.strip()}")
    assert offenders == []
