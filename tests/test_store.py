"""Opening the databases: bad files and schemas are refused and left untouched;
older boards are migrated with their data."""

from __future__ import annotations

import hashlib
import sqlite3
import time
from pathlib import Path

import pytest
from conftest import NOW, make_settings
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.errors import StorageError
from sparkops.storage import schema
from sparkops.storage.db import Database
from sparkops.storage.store import open_store


def digest(*paths: Path) -> dict[str, str | None]:
    """Bytes of each file and any -wal/-shm sidecar (None when absent)."""
    out = {}
    for path in paths:
        for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None
    return out


def test_init_creates_data_dir_and_both_databases(tmp_path):
    settings = make_settings(tmp_path)
    store = open_store(settings, create=True, now=NOW)
    store.dispose()
    assert (tmp_path / "data" / "kanban.db").stat().st_size > 0
    with sqlite3.connect(tmp_path / "data" / "kanban.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.BOARD_SCHEMA_VERSION
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert set(schema.CORE_BOARD_TABLES) <= names
    assert not any(n.startswith("ops_") for n in names)  # no foreign tables in the board
    with sqlite3.connect(tmp_path / "data" / "sparkops.db") as conn:
        assert conn.execute("SELECT component, version FROM ops_schema_version").fetchall() == [
            ("ops", schema.OPS_SCHEMA_VERSION)]


def test_missing_board_without_create_asks_for_init(tmp_path):
    with pytest.raises(StorageError, match="run `python -m sparkops init`"):
        open_store(make_settings(tmp_path))
    assert not (tmp_path / "data").exists()


def test_reopening_keeps_data(tmp_path):
    settings = make_settings(tmp_path)
    store = open_store(settings, create=True, now=NOW)
    task = board.create_task(store.board, "keep me", now=NOW)
    store.dispose()
    store = open_store(settings, create=True, now=NOW)
    assert queries.get_task(store.board, task)["title"] == "keep me"
    store.dispose()


def test_non_sqlite_file_is_refused_untouched(tmp_path):
    path = tmp_path / "data" / "kanban.db"
    path.parent.mkdir()
    path.write_text("this is my shopping list, not a database\n" * 10)
    before = digest(path)
    for create in (False, True):
        with pytest.raises(StorageError, match="is not a SQLite database.*will not touch it"):
            open_store(make_settings(tmp_path), create=create)
    assert digest(path) == before


def test_damaged_sqlite_file_is_never_overwritten(tmp_path):
    settings = make_settings(tmp_path)
    store = open_store(settings, create=True, now=NOW)
    for i in range(200):
        board.create_task(store.board, f"task {i}", body="x" * 500, now=NOW)
    store.dispose()
    path = tmp_path / "data" / "kanban.db"
    raw = bytearray(path.read_bytes())
    raw[4096:4096 * 6] = b"\xde\xad\xbe\xef" * (4096 * 5 // 4)  # smash pages 2..6
    path.write_bytes(bytes(raw))
    before = digest(path)
    with pytest.raises(StorageError, match="damaged|cannot be read"):
        open_store(settings, create=True)
    assert digest(path) == before


def test_directory_as_database_is_refused(tmp_path):
    (tmp_path / "data" / "kanban.db").mkdir(parents=True)
    with pytest.raises(StorageError, match="is a directory"):
        open_store(make_settings(tmp_path), create=True)


def test_newer_board_schema_is_refused_untouched(tmp_path):
    settings = make_settings(tmp_path)
    open_store(settings, create=True, now=NOW).dispose()
    path = tmp_path / "data" / "kanban.db"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()
    before = digest(path)
    for create in (False, True):
        with pytest.raises(StorageError, match="schema version 99, newer than this SparkOps"):
            open_store(settings, create=create)
    assert digest(path) == before


def test_newer_ops_schema_is_refused(tmp_path):
    settings = make_settings(tmp_path)
    open_store(settings, create=True, now=NOW).dispose()
    with sqlite3.connect(tmp_path / "data" / "sparkops.db") as conn:
        conn.execute(f"UPDATE ops_schema_version SET version = {schema.OPS_SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StorageError, match=f"ops database .* schema version {schema.OPS_SCHEMA_VERSION + 1}"):
        open_store(settings)


def test_foreign_database_is_not_turned_into_a_board(tmp_path):
    path = tmp_path / "data" / "kanban.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount REAL)")
    conn.close()
    before = digest(path)
    with pytest.raises(StorageError, match="no kanban board"):
        open_store(make_settings(tmp_path), create=True)
    assert digest(path) == before


# An older Hermes board: fewer task columns, no run_id on events, no attachments.
OLD_HERMES_SCHEMA = """
CREATE TABLE tasks (
    id TEXT PRIMARY KEY, title TEXT NOT NULL, body TEXT, assignee TEXT,
    status TEXT NOT NULL, priority INTEGER DEFAULT 0, created_by TEXT,
    created_at INTEGER NOT NULL, started_at INTEGER, completed_at INTEGER,
    workspace_kind TEXT NOT NULL DEFAULT 'scratch', workspace_path TEXT,
    claim_lock TEXT, claim_expires INTEGER, result TEXT,
    consecutive_failures INTEGER NOT NULL DEFAULT 0, worker_pid INTEGER,
    current_run_id INTEGER);
CREATE TABLE task_links (parent_id TEXT NOT NULL, child_id TEXT NOT NULL,
    PRIMARY KEY (parent_id, child_id));
CREATE TABLE task_comments (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL,
    author TEXT NOT NULL, body TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE task_events (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL,
    kind TEXT NOT NULL, payload TEXT, created_at INTEGER NOT NULL);
CREATE TABLE task_runs (id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT NOT NULL,
    profile TEXT, status TEXT NOT NULL, started_at INTEGER NOT NULL, ended_at INTEGER,
    outcome TEXT, summary TEXT, error TEXT);
INSERT INTO tasks (id, title, status, created_at) VALUES ('t_0000000a', 'old task', 'ready', 100);
INSERT INTO task_events (task_id, kind, created_at) VALUES ('t_0000000a', 'created', 100);
"""


def test_older_board_is_migrated_keeping_data(tmp_path):
    path = tmp_path / "data" / "kanban.db"
    path.parent.mkdir()
    with sqlite3.connect(path) as conn:
        conn.executescript(OLD_HERMES_SCHEMA)
    conn.close()
    store = open_store(make_settings(tmp_path), create=True, now=NOW)
    task = queries.get_task(store.board, "t_0000000a")
    assert task["title"] == "old task" and task["block_recurrences"] == 0
    run = board.claim(store.board, "t_0000000a", lock="h:1", now=NOW).run_id
    board.complete(store.board, "t_0000000a", run_id=run, now=NOW + 1)
    assert queries.task_detail(store.board, "t_0000000a")["events"][-1]["run_id"] == run
    store.dispose()
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.BOARD_SCHEMA_VERSION
        cols = {r[1] for r in conn.execute("PRAGMA table_info(tasks)")}
    assert {"block_kind", "session_id", "max_retries"} <= cols


def test_postgres_unreachable_is_one_clear_error(tmp_path):
    settings = make_settings(tmp_path, board_url="postgresql://sparkops:pw@127.0.0.1:1/board")
    with pytest.raises(StorageError) as err:
        open_store(settings, create=True)
    message = str(err.value)
    assert "cannot connect to the board database" in message and "pw@" not in message
    assert not (tmp_path / "data").exists()


def test_postgres_missing_database(tmp_path, pg_url):
    url = pg_url.rsplit("/", 1)[0] + "/no_such_database_here"
    with pytest.raises(StorageError, match="no_such_database_here"):
        open_store(make_settings(tmp_path, board_url=url, ops_url=url), create=True)


def test_postgres_newer_schema_is_refused(tmp_path, pg_url):
    settings = make_settings(tmp_path, board_url=pg_url, ops_url=pg_url)
    open_store(settings, create=True, now=NOW).dispose()
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    with engine.begin() as conn:
        conn.execute(text("UPDATE ops_schema_version SET version = 42 WHERE component = 'board'"))
        tasks_before = conn.execute(text("SELECT count(*) FROM tasks")).scalar()
    with pytest.raises(StorageError, match="schema version 42"):
        open_store(settings, create=True)
    with engine.begin() as conn:
        assert conn.execute(text(
            "SELECT version FROM ops_schema_version WHERE component = 'board'")).scalar() == 42
        assert conn.execute(text("SELECT count(*) FROM tasks")).scalar() == tasks_before
    engine.dispose()


def test_a_postgres_board_of_version_1_gets_the_claims_indexes_and_keeps_its_rows(tmp_path, pg_url):
    """Version 2 adds indexes to a PostgreSQL board only (a SQLite board keeps
    Hermes' DDL); the claim then reads the best ready tasks off the index instead of
    sorting them all."""
    settings = make_settings(tmp_path, board_url=pg_url, ops_url=pg_url)
    store = open_store(settings, create=True, now=NOW)
    ids = [board.create_task(store.board, f"task {i}", priority=i % 3, now=NOW) for i in range(5)]
    store.dispose()
    engine = create_engine(pg_url.replace("postgresql://", "postgresql+psycopg://"))
    indexes = text("SELECT indexname FROM pg_indexes WHERE indexname IN ('idx_tasks_ready_order', 'idx_runs_open')")
    with engine.begin() as conn:
        assert sorted(conn.execute(indexes).scalars()) == ["idx_runs_open", "idx_tasks_ready_order"]
        conn.execute(text("DROP INDEX idx_tasks_ready_order; DROP INDEX idx_runs_open"))
        conn.execute(text("UPDATE ops_schema_version SET version = 1 WHERE component = 'board'"))

    store = open_store(settings, create=True, now=NOW)
    with engine.begin() as conn:
        assert sorted(conn.execute(indexes).scalars()) == ["idx_runs_open", "idx_tasks_ready_order"]
        assert conn.execute(text("SELECT version FROM ops_schema_version WHERE component = 'board'")).scalar() == 2
        conn.execute(text("SET enable_seqscan = off; SET enable_sort = off"))
        plan = "\n".join(conn.execute(text(
            "EXPLAIN SELECT id FROM tasks WHERE status = 'ready' "
            "ORDER BY priority DESC, created_at, id LIMIT 8")).scalars())
    assert "idx_tasks_ready_order" in plan
    claimed = board.claim_next(store.board, host="h", lock="h:1", capacity=1, now=NOW)
    assert claimed.task_id == ids[2]  # the only task of priority 2
    assert {t["id"] for t in queries.list_tasks(store.board)} == set(ids)
    store.dispose()
    engine.dispose()


def test_postgres_epoch_columns_are_bigint(tmp_path, pg_url):
    settings = make_settings(tmp_path, board_url=pg_url, ops_url=pg_url)
    store = open_store(settings, create=True, now=NOW)
    far_future = 2**33  # year 2242: past the 32-bit limit of 2038
    board.create_task(store.board, "later", now=far_future)
    assert queries.list_tasks(store.board)[0]["created_at"] == far_future
    store.dispose()


def test_retrying_rides_out_an_unreachable_server_and_nothing_else(tmp_path):
    from sparkops.storage.db import retrying

    away = Database("postgresql://nobody@127.0.0.1:1/none", role="board")  # nothing listens on port 1
    waits: list[float] = []
    attempts = []

    def connect():
        attempts.append(1)
        away.ping()

    with pytest.raises(StorageError, match="cannot connect to the board database"):
        retrying(connect, seconds=2, what="test", sleep=lambda s: (waits.append(s), time.sleep(s / 20)))
    assert len(attempts) >= 3 and waits[:2] == [0.5, 1.0] and max(waits) <= 5.0  # backoff, capped

    local = Database(f"sqlite:///{tmp_path}/x.db", role="board")
    attempts.clear()

    def broken_sql():
        attempts.append(1)
        with local.read() as conn:
            conn.execute(text("SELEC 1"))

    with pytest.raises(DBAPIError):
        retrying(broken_sql, seconds=30, what="test")
    assert len(attempts) == 1  # a wrong statement is not retried
    assert retrying(lambda: 42, seconds=0, what="test") == 42
    away.dispose()
    local.dispose()
