"""``python -m sparkops migrate``: a board and its ops data copied into an empty
database (SQLite files to a real PostgreSQL, and between SQLite files), verified by
counts and checksums; a non-empty target, a wrong source and a failed verification
change nothing."""

from __future__ import annotations

import json
import sqlite3

import pytest
from conftest import NOW, make_settings, run_cli
from sqlalchemy import text

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.control import actions
from sparkops.core.errors import StorageError
from sparkops.jobs import framework as jobs
from sparkops.storage import migrate
from sparkops.storage.db import Database
from sparkops.storage.store import open_store


def busy_board(tmp_path):
    """A SQLite board and ops store with every kind of row."""
    settings = make_settings(tmp_path / "src")
    store = open_store(settings, create=True, now=NOW)
    first = board.create_task(store.board, "Schema, with 'quotes', ünïcode and\nnewlines", assignee="builder",
                              priority=3, body="=cmd() stays text", now=NOW)
    second = board.create_task(store.board, "API on top", parents=[first], now=NOW + 1)
    board.comment(store.board, first, "looks good", author="reviewer", now=NOW + 2)
    run = board.claim(store.board, first, lock="vm:1", now=NOW + 3).run_id
    board.complete(store.board, first, run_id=run, summary="done in 3 steps", now=NOW + 60)
    board.claim(store.board, second, lock="vm:2", now=NOW + 61)
    board.create_task(store.board, "later", now=NOW + 62)
    ctx = jobs.JobContext(settings=settings, store=store, host="vm")
    actions.create_task(ctx, "test@cli", "made by an action")  # an ops_audit row
    store.dispose()
    return settings


def digests(db: Database, component: str) -> dict[str, tuple[int, str]]:
    with db.read() as conn:
        return {t.name: migrate.table_digest(conn, t) for t in migrate.tables_of(component)}


def pairs_for(settings, board_to: str, ops_to: str):
    return [("board", Database(settings["storage.board_url"], role="board"), Database(board_to, role="board")),
            ("ops", Database(settings["storage.ops_url"], role="ops"), Database(ops_to, role="ops"))]


def test_sqlite_to_postgresql_copies_every_row_and_the_target_works(tmp_path, pg_url):
    source = busy_board(tmp_path)
    pairs = pairs_for(source, pg_url, pg_url)
    report = migrate.migrate(pairs)
    copied = {(t.component, t.table): t.rows for t in report.tables}
    assert copied[("board", "tasks")] == 4 and copied[("board", "task_runs")] == 2
    assert copied[("board", "task_links")] == 1 and copied[("board", "task_comments")] == 1
    assert copied[("ops", "ops_audit")] == 1
    for component, src, dst in pairs:
        assert digests(src, component) == digests(dst, component)
        src.dispose()
        dst.dispose()
    assert not report.source_changed

    target = open_store(make_settings(tmp_path / "pg", board_url=pg_url, ops_url=pg_url))
    sqlite_side = open_store(source)
    try:
        assert queries.list_tasks(target.board) == queries.list_tasks(sqlite_side.board)
        assert queries.board_stats(target.board, now=NOW + 100) == queries.board_stats(sqlite_side.board, now=NOW + 100)
        # the id sequences moved past the copied rows: new runs and events get new ids
        third = next(t["id"] for t in queries.list_tasks(target.board) if t["title"] == "later")
        run = board.claim(target.board, third, lock="pg:1", now=NOW + 200).run_id
        assert run == 3
        events = queries.list_events(target.board, task_id=third)
        assert len({e["id"] for e in queries.list_events(target.board)}) == len(queries.list_events(target.board))
        assert [e["kind"] for e in events].count("claimed") == 1
    finally:
        target.dispose()
        sqlite_side.dispose()


def test_a_second_migrate_into_the_same_target_is_refused_and_changes_nothing(tmp_path, pg_url):
    source = busy_board(tmp_path)
    migrate.migrate(pairs_for(source, pg_url, pg_url))
    target = Database(pg_url, role="board")
    before = digests(target, "board")
    with pytest.raises(StorageError, match="is not empty .*tasks.* hold rows.*Nothing was changed"):
        migrate.migrate(pairs_for(source, pg_url, pg_url))
    assert digests(target, "board") == before
    target.dispose()


def test_a_failed_verification_rolls_the_copy_back(tmp_path, monkeypatch):
    source = busy_board(tmp_path)
    target_url = f"sqlite:///{tmp_path}/dst/kanban.db"
    real = migrate.table_digest

    def lying(conn, table):
        count, digest = real(conn, table)
        if table.name == "task_runs" and "dst" in str(conn.engine.url):
            return count, "0" * 64  # as if a row had been altered on the way
        return count, digest

    monkeypatch.setattr(migrate, "table_digest", lying)
    with pytest.raises(migrate.MigrationMismatch, match="table task_runs: .* rolled back, the target is unchanged"):
        migrate.migrate(pairs_for(source, target_url, f"sqlite:///{tmp_path}/dst/sparkops.db")[:1])
    with sqlite3.connect(tmp_path / "dst" / "kanban.db") as conn:
        assert conn.execute("SELECT count(*) FROM tasks").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM task_runs").fetchone()[0] == 0


def test_cli_copies_between_sqlite_files_and_reports_json(tmp_path):
    source = busy_board(tmp_path)
    env = {"SPARKOPS_STORAGE_BOARD_URL": source["storage.board_url"],
           "SPARKOPS_STORAGE_OPS_URL": source["storage.ops_url"]}
    target = f"sqlite:///{tmp_path}/copy/kanban.db"
    ops_target = f"sqlite:///{tmp_path}/copy/sparkops.db"
    result = run_cli("migrate", "--to", target, "--ops-to", ops_target, "--json", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows"] == sum(t["rows"] for t in report["tables"]) > 10
    listed = run_cli("task", "list", "--json", cwd=tmp_path, env={"SPARKOPS_STORAGE_BOARD_URL": target,
                                                                  "SPARKOPS_STORAGE_OPS_URL": ops_target})
    original = run_cli("task", "list", "--json", cwd=tmp_path, env=env)
    assert json.loads(listed.stdout) == json.loads(original.stdout)

    again = run_cli("migrate", "--to", target, "--ops-to", ops_target, cwd=tmp_path, env=env)
    assert again.returncode != 0
    assert again.stderr.count("\n") == 1 and "is not empty" in again.stderr


@pytest.mark.parametrize("bad, message", [
    ("postgresql://nobody@127.0.0.1:1/none", "cannot"),
    ("mysql://localhost/board", "not supported"),
])
def test_cli_bad_target_url_one_message_nothing_changed(tmp_path, bad, message):
    source = busy_board(tmp_path)
    before = sqlite3.connect(source["storage.board_url"][len("sqlite:///"):]).execute(
        "SELECT count(*) FROM tasks").fetchone()[0]
    env = {"SPARKOPS_STORAGE_BOARD_URL": source["storage.board_url"],
           "SPARKOPS_STORAGE_OPS_URL": source["storage.ops_url"]}
    result = run_cli("migrate", "--to", bad, cwd=tmp_path, env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "nobody" not in result.stderr or "***" in result.stderr or "127.0.0.1:1" in result.stderr
    after = sqlite3.connect(source["storage.board_url"][len("sqlite:///"):]).execute(
        "SELECT count(*) FROM tasks").fetchone()[0]
    assert before == after


def test_a_source_of_another_schema_version_is_refused(tmp_path, pg_url):
    source = busy_board(tmp_path)
    path = source["storage.board_url"][len("sqlite:///"):]
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(StorageError, match="schema version 99, newer than this SparkOps"):
        migrate.migrate(pairs_for(source, pg_url, pg_url))
    target = Database(pg_url, role="board")
    with target.read() as conn:
        assert conn.execute(text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")).scalar() == 0
    target.dispose()
