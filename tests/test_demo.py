"""The demo sprint: its shape on an empty board, and no change to a board in use."""

from __future__ import annotations

import re
from collections import Counter

from conftest import NOW, run_cli
from sparkops import board, queries
from sparkops.demo import DEMO_TASKS, seed_demo


def test_seeds_a_three_phase_sprint_on_an_empty_board(store):
    ids = seed_demo(store.board, now=NOW)

    assert len(ids) == len(DEMO_TASKS) == 10
    rows = {t["id"]: t for t in queries.list_tasks(store.board)}
    assert set(rows) == set(ids)
    by_key = {spec.key: rows[task_id] for spec, task_id in zip(DEMO_TASKS, ids)}

    assert Counter(t["status"] for t in rows.values()) == {"todo": 6, "done": 2, "ready": 1, "blocked": 1}
    assert by_key["repo"]["status"] == by_key["schema"]["status"] == "done"
    assert by_key["api"]["status"] == "ready"
    assert by_key["feed"]["status"] == "blocked"
    phases = Counter(re.match(r"\[(P\d)\] ", t["title"]).group(1) for t in rows.values())
    assert phases == {"P1": 3, "P2": 4, "P3": 3}
    assert all(t["assignee"] for t in rows.values())
    assert len({t["priority"] for t in rows.values()}) > 1
    assert all(NOW - 8 * 3600 <= t["created_at"] <= NOW for t in rows.values())

    for spec, task_id in zip(DEMO_TASKS, ids):
        detail = queries.task_detail(store.board, task_id)
        assert detail["parents"] == sorted(by_key[p]["id"] for p in spec.parents)
        parents_done = all(by_key[p]["status"] == "done" for p in spec.parents)
        if rows[task_id]["status"] == "todo":
            assert not parents_done  # todo only while it waits for a parent
        else:
            assert parents_done

    done_runs = queries.list_runs(store.board, task_id=by_key["repo"]["id"])
    assert [(r["outcome"], bool(r["summary"])) for r in done_runs] == [("completed", True)]
    blocked = queries.list_events(store.board, task_id=by_key["feed"]["id"], kinds=["blocked"])
    assert "API key" in blocked[0]["payload"]["reason"]
    assert queries.board_stats(store.board, now=NOW)["active_runs"] == 0
    assert max(e["created_at"] for e in queries.list_events(store.board, limit=1000)) <= NOW


def test_does_nothing_on_a_board_with_tasks(sqlite_store):
    only = board.create_task(sqlite_store.board, "real work", now=NOW)
    assert seed_demo(sqlite_store.board, now=NOW) == []
    assert [t["id"] for t in queries.list_tasks(sqlite_store.board)] == [only]


def test_an_archived_task_also_counts_as_in_use(sqlite_store):
    old = board.create_task(sqlite_store.board, "finished long ago", now=NOW)
    board.archive(sqlite_store.board, old, now=NOW)
    assert seed_demo(sqlite_store.board, now=NOW) == []


def test_seeding_twice_adds_nothing_the_second_time(sqlite_store):
    assert len(seed_demo(sqlite_store.board, now=NOW)) == 10
    assert seed_demo(sqlite_store.board, now=NOW) == []
    assert len(queries.list_tasks(sqlite_store.board)) == 10


def test_demo_command(tmp_path):
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/sparkops.db"}
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    first = run_cli("demo", cwd=tmp_path, env=env)
    assert (first.returncode, first.stdout.strip()) == (0, "Created 10 demo tasks")
    again = run_cli("demo", cwd=tmp_path, env=env)
    assert (again.returncode, again.stdout.strip()) == (0, "The board is not empty; no demo tasks added")
