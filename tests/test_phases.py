"""Phases: explicit beats tag beats depth; a boundary is recorded exactly once, even
when two processes race; the next phase is promoted only when configured."""

from __future__ import annotations

import multiprocessing as mp

import pytest
from conftest import NOW
from sqlalchemy import func, select

from sparkops.board import phases, queries
from sparkops.board import transitions as board
from sparkops.core.errors import InvalidInput, NotFound
from sparkops.storage.schema import ops_events, ops_phase_boundaries

PATTERNS = [r"\[P(\d+)\]", r"(?i)\bphase\s*(\d+)\s*:"]


def resolve(store):
    return phases.resolve(store.board, store.ops, PATTERNS)


def test_explicit_beats_tag_beats_depth(store):
    root = board.create_task(store.board, "Set up the repo", now=NOW)  # no tag, no parent: P1
    child = board.create_task(store.board, "Wire the API", parents=[root], now=NOW)  # depth 2: P2
    grandchild = board.create_task(store.board, "Ship it", parents=[child], now=NOW)  # depth 3: P3
    tagged = board.create_task(store.board, "[P5] Load test", parents=[root], now=NOW)
    worded = board.create_task(store.board, "Phase 4: polish the UI", now=NOW)
    mapping = resolve(store)
    assert mapping[root] == phases.PhaseOf("P1", "depth")
    assert mapping[child] == phases.PhaseOf("P2", "depth")
    assert mapping[grandchild] == phases.PhaseOf("P3", "depth")
    assert mapping[tagged] == phases.PhaseOf("P5", "tag")  # the tag wins over its depth (2)
    assert mapping[worded] == phases.PhaseOf("P4", "tag")

    assert phases.assign(store.board, store.ops, tagged, "2", by="ops", now=NOW) == "P2"
    assert resolve(store)[tagged] == phases.PhaseOf("P2", "explicit")  # explicit wins over the tag
    phases.assign(store.board, store.ops, grandchild, "Hardening", now=NOW)
    assert resolve(store)[grandchild] == phases.PhaseOf("Hardening", "explicit")
    assert phases.unassign(store.ops, tagged)
    assert resolve(store)[tagged] == phases.PhaseOf("P5", "tag")
    with pytest.raises(NotFound):
        phases.assign(store.board, store.ops, "t_00000000", "P1")
    with pytest.raises(InvalidInput):
        phases.assign(store.board, store.ops, root, "  ")


def test_names_and_order():
    assert [phases.normalise(x) for x in ("2", "p02", "P10", " Beta ")] == ["P2", "P2", "P10", "Beta"]
    assert sorted(["P10", "Beta", "P2", "Alpha", "P1"], key=phases.order_key) == ["P1", "P2", "P10", "Alpha", "Beta"]
    assert phases.next_phase("P2", ["P1", "P2", "P10", "Beta"]) == "P10"
    assert phases.next_phase("Beta", ["P1", "Beta"]) is None


def test_depth_follows_the_longest_path():
    links = [("a", "b"), ("b", "c"), ("a", "c"), ("x", "c")]
    assert phases.dependency_depths(["a", "b", "c", "x", "lone"], links) == {
        "a": 1, "b": 2, "c": 3, "x": 1, "lone": 1}


def finish(store, task_id, at):
    board.complete(store.board, task_id, result="ok", now=at)


def test_a_boundary_is_recorded_once_with_the_moment_the_last_task_finished(store):
    a = board.create_task(store.board, "[P1] a", now=NOW)
    b = board.create_task(store.board, "[P1] b", now=NOW)
    later = board.create_task(store.board, "[P2] c", now=NOW)
    finish(store, a, NOW + 100)
    assert phases.record_boundaries(store.board, store.ops, resolve(store), now=NOW + 150) == []
    finish(store, b, NOW + 200)
    board.archive(store.board, later, now=NOW + 250)  # archived counts as finished
    new = phases.record_boundaries(store.board, store.ops, resolve(store), now=NOW + 300)
    assert [(x.phase, x.reached_at, x.last_task_id, x.tasks) for x in new] == [
        ("P1", NOW + 200, b, 2), ("P2", NOW + 300, later, 1)]  # archived: no completion time
    assert phases.record_boundaries(store.board, store.ops, resolve(store), now=NOW + 400) == []
    with store.ops.read() as conn:
        assert conn.execute(select(func.count()).select_from(ops_phase_boundaries)).scalar() == 2
        assert conn.execute(select(func.count()).select_from(ops_events)
                            .where(ops_events.c.kind == "phase_boundary")).scalar() == 2


def _race(board_url: str, ops_url: str, barrier, results) -> None:
    from sparkops.storage.db import Database

    board_db, ops = Database(board_url, role="board"), Database(ops_url, role="ops")
    mapping = phases.resolve(board_db, ops, PATTERNS)
    barrier.wait(timeout=60)
    results.put([b.phase for b in phases.record_boundaries(board_db, ops, mapping, promote_next=True,
                                                           now=NOW + 500)])
    board_db.dispose()
    ops.dispose()


def test_two_runners_racing_record_a_boundary_once_and_promote_once(store, settings):
    done = board.create_task(store.board, "[P1] done", now=NOW)
    waiting = board.create_task(store.board, "[P2] waiting", parents=[done], now=NOW)
    finish(store, done, NOW + 10)
    # a P2 task parked in todo with no parents: only the phase rule promotes it
    parked = board.create_task(store.board, "[P2] parked", now=NOW)
    board.block(store.board, parked, kind="dependency", reason="wait for P1", now=NOW)
    assert queries.get_task(store.board, parked)["status"] == "todo"
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_race, args=(settings["storage.board_url"], settings["storage.ops_url"],
                                             barrier, results)) for _ in range(4)]
    for p in procs:
        p.start()
    won = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sorted(won) == [[], [], [], ["P1"]]
    [boundary] = phases.recorded(store.ops)
    assert boundary.phase == "P1" and boundary.promoted == (parked,)
    assert queries.get_task(store.board, parked)["status"] == "ready"
    assert queries.get_task(store.board, waiting)["status"] == "ready"  # its parent was done anyway
    promotions = queries.list_events(store.board, task_id=parked, kinds=["promoted_manual"])
    assert len(promotions) == 1


def test_promotion_happens_only_when_configured(store):
    first = board.create_task(store.board, "[P1] first", now=NOW)
    parked = board.create_task(store.board, "[P2] parked", now=NOW)
    board.block(store.board, parked, kind="dependency", reason="wait", now=NOW)
    finish(store, first, NOW + 10)
    [boundary] = phases.record_boundaries(store.board, store.ops, resolve(store), now=NOW + 20)
    assert boundary.promoted == ()
    assert queries.get_task(store.board, parked)["status"] == "todo"


def test_summary_per_phase(store):
    a = board.create_task(store.board, "[P1] a", now=NOW)
    board.create_task(store.board, "[P1] b", now=NOW + 5)
    c = board.create_task(store.board, "[P2] c", now=NOW + 7)
    finish(store, a, NOW + 60)
    board.block(store.board, c, reason="no key", now=NOW + 70)
    rows = phases.summary(store.board, resolve(store))
    assert rows == [
        {"phase": "P1", "total": 2, "done": 1, "archived": 0, "open": 1, "blocked": 0, "running": 0,
         "first_created_at": NOW, "last_completed_at": NOW + 60},
        {"phase": "P2", "total": 1, "done": 0, "archived": 0, "open": 1, "blocked": 1, "running": 0,
         "first_created_at": NOW + 7, "last_completed_at": None},
    ]
