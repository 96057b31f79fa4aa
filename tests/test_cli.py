"""The command line, as a real subprocess: output, --json, exit codes, and bad
input that gives one clear message and changes nothing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return {
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
    }


@pytest.fixture
def cli(tmp_path, env):
    def run(*args: str, extra_env: dict | None = None):
        return run_cli(*args, cwd=tmp_path, env={**env, **(extra_env or {})})
    assert run("init").returncode == 0
    return run


def dump(tmp_path: Path) -> list[str]:
    """Every row of the board as SQL text: equal dumps mean nothing changed."""
    conn = sqlite3.connect(tmp_path / "data" / "kanban.db")
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


def ok(result) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result, code: int, *fragments: str) -> str:
    """One line on stderr that contains every fragment, and the exit code."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]
    return lines[0]


def test_task_lifecycle_through_cli(cli, tmp_path):
    parent = ok(cli("task", "create", "Design schema", "--assignee", "alice", "--priority", "2")).strip()
    child = ok(cli("task", "create", "Build store", "--parent", parent)).strip()
    listed = json.loads(ok(cli("task", "list", "--json")))
    assert [(t["id"], t["status"]) for t in listed] == [(parent, "ready"), (child, "todo")]

    ok(cli("task", "comment", parent, "looks", "good", "--author", "bob"))
    ok(cli("task", "complete", parent, "--result", "done it"))
    shown = json.loads(ok(cli("task", "show", parent, "--json")))
    assert shown["task"]["status"] == "done" and shown["children"] == [child]
    assert shown["comments"][0]["body"] == "looks good"
    assert [e["kind"] for e in shown["events"]] == ["created", "commented", "completed"]
    assert json.loads(ok(cli("task", "show", child, "--json")))["task"]["status"] == "ready"

    ok(cli("task", "block", child, "waiting", "for", "keys", "--kind", "needs_input"))
    assert "blocked -> ready" in ok(cli("task", "unblock", child))
    ok(cli("task", "archive", child))
    assert ok(cli("task", "list")).count("\n") == 1  # archived tasks hidden by default
    assert child in ok(cli("task", "list", "--archived"))

    stats = json.loads(ok(cli("stats", "--json")))
    assert stats["by_status"] == {"done": 1} and stats["archived"] == 1
    assert stats["by_assignee"] == {"alice": {"done": 1}}
    runs = json.loads(ok(cli("runs", parent, "--json")))
    assert [(r["outcome"], r["summary"]) for r in runs] == [("completed", "done it")]
    events = json.loads(ok(cli("events", "--json", "--kind", "archived")))
    assert [e["task_id"] for e in events] == [child]


def test_worker_reports_with_its_run(cli, tmp_path, env):
    """A worker reports with --run (or SPARKOPS_RUN_ID); a stale run is refused."""
    from sparkops.board import transitions as board
    from sparkops.storage.db import Database

    task = ok(cli("task", "create", "Work")).strip()
    db = Database(env["SPARKOPS_STORAGE_BOARD_URL"], role="board")
    first = board.claim(db, task, lock="h:1").run_id
    board.reclaim(db, task, run_id=first, reason="worker lost")
    second = board.claim(db, task, lock="h:2").run_id
    db.dispose()

    before = dump(tmp_path)
    line = refused(cli("task", "complete", task, "--run", str(first)), 1,
                   f"run {first} is not the current run of {task}", "nothing was changed")
    assert "Traceback" not in line
    refused(cli("task", "block", task, "stuck", "--run", str(first)), 1, "not the current run")
    # the stale worker's environment carries its old run id: refused as well
    refused(cli("task", "complete", task,
                extra_env={"SPARKOPS_TASK_ID": task, "SPARKOPS_RUN_ID": str(first)}), 1,
            "not the current run")
    assert dump(tmp_path) == before

    out = ok(cli("task", "complete", task, "--json",
                 extra_env={"SPARKOPS_TASK_ID": task, "SPARKOPS_RUN_ID": str(second)}))
    assert json.loads(out) == {"task_id": task, "action": "complete", "from": "running",
                               "to": "done", "run_id": second}


@pytest.mark.parametrize("args, code, fragments", [
    (("task", "show", "t_deadbeef"), 1, ["task t_deadbeef not found"]),
    (("task", "complete", "t_deadbeef"), 1, ["task t_deadbeef not found"]),
    (("task", "comment", "t_deadbeef", "hi"), 1, ["task t_deadbeef not found"]),
    (("runs", "t_deadbeef"), 1, ["task t_deadbeef not found"]),
    (("task", "create", "   "), 2, ["needs a title"]),
    (("task", "create", "x", "--parent", "t_deadbeef"), 1, ["t_deadbeef not found"]),
    (("task", "create", "x", "--max-retries", "0"), 2, ["max retries"]),
    (("task", "list", "--status", "doing"), 2, ["unknown status 'doing'", "ready"]),
    (("task", "complete", "t_deadbeef", "--metadata", "[1]"), 2, ["--metadata must be a JSON object"]),
])
def test_bad_input_one_message_nothing_changed(cli, tmp_path, args, code, fragments):
    ok(cli("task", "create", "existing"))
    before = dump(tmp_path)
    refused(cli(*args), code, *fragments)
    assert dump(tmp_path) == before


def test_link_cycle_refused(cli, tmp_path):
    a = ok(cli("task", "create", "A")).strip()
    b = ok(cli("task", "create", "B", "--parent", a)).strip()
    before = dump(tmp_path)
    refused(cli("task", "link", b, a), 1, "would make a cycle", f"{b} -> {a} -> {b}")
    refused(cli("task", "link", a, a), 1, "cannot depend on itself")
    assert dump(tmp_path) == before


def test_refused_transition_names_status(cli, tmp_path):
    a = ok(cli("task", "create", "A")).strip()
    ok(cli("task", "complete", a))
    before = dump(tmp_path)
    refused(cli("task", "unblock", a), 1, f"cannot unblock {a}", "'done'")
    assert dump(tmp_path) == before


def test_usage_errors_exit_2(cli):
    result = cli("task", "frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr
    assert cli("task", "create").returncode == 2


def test_commands_before_init_ask_for_init(tmp_path, env):
    result = run_cli("task", "list", cwd=tmp_path, env=env)
    refused(result, 2, "does not exist yet", "sparkops init")
    assert not (tmp_path / "data").exists()


def test_unusable_board_files(tmp_path, env):
    data = tmp_path / "data"
    data.mkdir()
    (data / "kanban.db").write_bytes(b"PK\x03\x04 a zip file, not a board")
    before = (data / "kanban.db").read_bytes()
    refused(run_cli("init", cwd=tmp_path, env=env), 2, "is not a SQLite database")
    refused(run_cli("task", "list", cwd=tmp_path, env=env), 2, "is not a SQLite database")
    assert (data / "kanban.db").read_bytes() == before

    (data / "kanban.db").unlink()
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    conn = sqlite3.connect(data / "kanban.db")
    conn.execute("PRAGMA user_version = 5")
    conn.close()
    refused(run_cli("task", "list", cwd=tmp_path, env=env), 2, "schema version 5", "upgrade SparkOps")


def test_init_is_idempotent(cli, tmp_path):
    a = ok(cli("task", "create", "A")).strip()
    ok(cli("init"))
    assert a in ok(cli("task", "list"))
