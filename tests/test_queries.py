"""Reads: ordering, filters, the detail view and the counts, with the clock passed in."""

from __future__ import annotations

import pytest
from conftest import NOW

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.errors import InvalidInput


@pytest.fixture
def populated(store):
    ids = {
        "low_old": board.create_task(store.board, "low old", priority=0, assignee="a", now=NOW),
        "high": board.create_task(store.board, "high", priority=5, assignee="b", now=NOW + 10),
        "low_new": board.create_task(store.board, "low new", priority=0, assignee="a", now=NOW + 20),
        "gone": board.create_task(store.board, "gone", now=NOW + 30),
    }
    board.archive(store.board, ids["gone"], now=NOW + 31)
    run = board.claim(store.board, ids["high"], lock="h:1", now=NOW + 40).run_id
    ids["run"] = run
    return ids


def test_list_orders_by_priority_then_age_and_hides_archived(store, populated):
    rows = queries.list_tasks(store.board)
    assert [r["title"] for r in rows] == ["high", "low old", "low new"]
    assert "gone" in [r["title"] for r in queries.list_tasks(store.board, include_archived=True)]
    assert [r["title"] for r in queries.list_tasks(store.board, status="archived")] == ["gone"]
    assert [r["title"] for r in queries.list_tasks(store.board, assignee="A")] == ["low old", "low new"]
    assert len(queries.list_tasks(store.board, limit=1)) == 1
    with pytest.raises(InvalidInput, match="unknown status"):
        queries.list_tasks(store.board, status="doing")


def test_stats_counts_and_oldest_ready_age(store, populated):
    stats = queries.board_stats(store.board, now=NOW + 100)
    # archived tasks are left out of the counts, as `hermes kanban stats` does
    assert stats["by_status"] == {"ready": 2, "running": 1}
    assert stats["by_assignee"] == {"a": {"ready": 2}, "b": {"running": 1}}
    assert stats["oldest_ready_age_seconds"] == 100  # "low old", created at NOW
    assert (stats["archived"], stats["open"], stats["active_runs"]) == (1, 3, 1)


def test_stats_on_empty_board(store):
    stats = queries.board_stats(store.board, now=NOW)
    assert stats["by_status"] == {} and stats["oldest_ready_age_seconds"] is None
    assert stats["archived"] == 0 and stats["active_runs"] == 0


def test_runs_and_events_filters(store, populated):
    assert [r["id"] for r in queries.list_runs(store.board, active_only=True)] == [populated["run"]]
    board.complete(store.board, populated["high"], run_id=populated["run"], now=NOW + 50)
    assert queries.list_runs(store.board, active_only=True) == []
    events = queries.list_events(store.board, since=NOW + 35)
    assert [e["kind"] for e in events] == ["completed", "claimed"]  # newest first
    archived = queries.list_events(store.board, kinds=["archived"])
    assert [e["task_id"] for e in archived] == [populated["gone"]]
    assert queries.list_events(store.board, task_id=populated["high"], limit=1)[0]["kind"] == "completed"


def test_detail_decodes_json(store, populated):
    board.complete(store.board, populated["high"], run_id=populated["run"],
                   metadata={"files": ["a.py"]}, now=NOW + 50)
    detail = queries.task_detail(store.board, populated["high"])
    assert detail["runs"][0]["metadata"] == {"files": ["a.py"]}
    assert detail["events"][0]["payload"]["status"] == "ready"


def test_board_slice_counts_every_match_and_returns_the_first_cards(store):
    for n in range(7):
        board.create_task(store.board, f"todo {n}", priority=n % 2, now=NOW + n)
    top = board.create_task(store.board, "100% done_ish", assignee="b", priority=9, now=NOW + 50)
    nobody = board.create_task(store.board, "nobody's", now=NOW + 60)
    gone = board.create_task(store.board, "gone", now=NOW + 70)
    board.archive(store.board, gone, now=NOW + 71)

    whole = queries.board_slice(store.board, per_status=3)
    assert whole.total == 9 and whole.matched == 9
    assert whole.counts == {"ready": 9}
    # board order, cut at three: priority first, then age
    assert [t["title"] for t in whole.cards["ready"]] == ["100% done_ish", "todo 1", "todo 3"]

    # % and _ are literal, any case; an id matches too
    assert [t["id"] for t in queries.board_slice(store.board, text="0% DONE_").cards["ready"]] == [top]
    assert queries.board_slice(store.board, text="0%_").matched == 0
    assert queries.board_slice(store.board, text=nobody[2:]).cards["ready"][0]["id"] == nobody
    assert queries.board_slice(store.board, assignee="b").matched == 1
    assert queries.board_slice(store.board, assignee=queries.UNASSIGNED).matched == 8
    assert queries.board_slice(store.board, priority=1).matched == 3
    assert queries.board_slice(store.board, keep={top, gone}.__contains__).matched == 1
    archived = queries.board_slice(store.board, include_archived=True, keep={top, gone}.__contains__)
    assert archived.counts == {"ready": 1, "archived": 1} and archived.total == 10


def test_board_options_titles_and_open_tasks(store, populated):
    assert queries.board_options(store.board) == {"assignees": ["a", "b"], "priorities": [5, 0]}
    assert queries.board_options(store.board, include_archived=True)["assignees"] == ["a", "b", "(unassigned)"]
    found = queries.titles(store.board, [populated["high"], "t_missing", populated["gone"]])
    assert {k: (v["title"], v["status"]) for k, v in found.items()} == {
        populated["high"]: ("high", "running"), populated["gone"]: ("gone", "archived")}
    board.complete(store.board, populated["high"], run_id=populated["run"], now=NOW + 50)
    assert [t["title"] for t in queries.open_tasks(store.board)] == ["low new", "low old"]
    assert len(queries.open_tasks(store.board, limit=1)) == 1
