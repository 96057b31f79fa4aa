"""The board schema matches a board made by the real ``hermes kanban init``."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from conftest import NOW, make_settings

from sparkops.storage import schema
from sparkops.storage.store import open_store

FIXTURE = Path(__file__).parent / "fixtures" / "hermes_board.db"


def shape(path: Path) -> dict:
    """Tables -> columns (name, type, notnull, default, pk) and index -> columns."""
    # immutable: a read-only connection to a WAL database would still create sidecars
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        tables = [r[0] for r in conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
        out = {}
        for table in tables:
            cols = [(name, ctype.upper(), bool(notnull), (default or "").strip("'\""), pk)
                    for _, name, ctype, notnull, default, pk in conn.execute(f"PRAGMA table_info({table})")]
            indexes = {row[1]: [c[2] for c in conn.execute(f"PRAGMA index_info({row[1]})")]
                       for row in conn.execute(f"PRAGMA index_list({table})")
                       if not row[1].startswith("sqlite_autoindex")}
            out[table] = {"columns": sorted(cols), "indexes": indexes}
        return out
    finally:
        conn.close()


def test_sparkops_board_has_hermes_schema(tmp_path):
    store = open_store(make_settings(tmp_path), create=True, now=NOW)
    store.dispose()
    ours = shape(tmp_path / "data" / "kanban.db")
    hermes = shape(FIXTURE)
    assert set(ours) == set(hermes)
    for table in hermes:
        assert ours[table] == hermes[table], table


def test_hermes_board_opens_without_schema_change(tmp_path):
    board = tmp_path / "data" / "kanban.db"
    board.parent.mkdir()
    shutil.copy(FIXTURE, board)
    before = shape(board)
    store = open_store(make_settings(tmp_path), create=True, now=NOW)
    store.dispose()
    assert shape(board) == before
    conn = sqlite3.connect(board)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == schema.BOARD_SCHEMA_VERSION
    conn.close()
