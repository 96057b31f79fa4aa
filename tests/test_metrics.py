"""Sprint metrics on hand-built boards whose answers are worked out by hand below.

Rows are inserted with SQLAlchemy Core so every timestamp is exact; one board is
made through ``sparkops.board.transitions``; the Hermes-made board is read from a copy.
"""

from __future__ import annotations

import calendar
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, make_settings
from sqlalchemy import insert

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.core import formatting
from sparkops.core.errors import InvalidInput
from sparkops.sprint import measure, metrics
from sparkops.storage.db import Database
from sparkops.storage.schema import task_events, task_runs, tasks
from sparkops.storage.store import open_store

HOUR, DAY = 3600, 86400
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def utc(text: str) -> int:
    """``2026-03-29 01:00:00`` (UTC) as epoch seconds."""
    return calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


# -- building boards row by row ----------------------------------------------------------


def add_task(db: Database, task_id: str, status: str, created: int, *, started: int | None = None,
             completed: int | None = None, title: str | None = None, assignee: str | None = None,
             last_failure_error: str | None = None) -> str:
    with db.write() as conn:
        conn.execute(insert(tasks).values(
            id=task_id, title=title or f"task {task_id}", status=status, created_at=created,
            started_at=started, completed_at=completed, assignee=assignee,
            last_failure_error=last_failure_error))
    return task_id


def add_run(db: Database, task_id: str, started: int, ended: int | None = None,
            outcome: str | None = None, *, summary: str | None = None, error: str | None = None) -> int:
    status = "running" if ended is None else (outcome or "done")
    with db.write() as conn:
        return int(conn.execute(insert(task_runs).values(
            task_id=task_id, status=status, started_at=started, ended_at=ended, outcome=outcome,
            summary=summary, error=error)).inserted_primary_key[0])


def add_event(db: Database, task_id: str, kind: str, at: int, payload: dict | None = None) -> None:
    with db.write() as conn:
        conn.execute(insert(task_events).values(
            task_id=task_id, kind=kind, created_at=at,
            payload=json.dumps(payload) if payload is not None else None))


@pytest.fixture
def db(sqlite_store) -> Database:
    return sqlite_store.board


def compute(db: Database, **kwargs: Any) -> metrics.Metrics:
    kwargs.setdefault("now", NOW)
    kwargs.setdefault("window_hours", 24)
    return measure.compute(db, **kwargs)


# -- the empty board ---------------------------------------------------------------------


def test_empty_board_has_every_metric_and_no_numbers(db):
    m = compute(db, phase_of={})
    # NOW is 800 s past an hour, so a 24 h window touches 25 UTC hours and 2 UTC days
    assert NOW % HOUR == 800 and NOW % DAY == 51200
    assert m.window.start == NOW - DAY and m.window.end == NOW
    assert m.counts == {"by_status": {}, "by_assignee": {}, "archived": 0, "open": 0, "total": 0,
                        "active_runs": 0}
    assert m.throughput.completed == 0 and m.throughput.per_hour == 0.0
    assert len(m.throughput.hourly) == 25 and m.throughput.hourly["count"].sum() == 0
    assert len(m.throughput.daily) == 2 and m.throughput.daily["count"].sum() == 0
    for d in (m.lead_time, m.cycle_time):
        assert (d.count, d.median, d.p90, len(d.seconds)) == (0, None, None, 0)
        assert list(d.seconds.columns) == ["seconds"]
    assert (m.runs.runs, m.runs.tasks, m.runs.mean, m.runs.max, m.runs.retries, m.runs.retry_rate) == \
        (0, 0, None, None, 0, None)
    assert m.runs.distribution.empty
    assert (m.outcomes.ended, m.outcomes.failures, m.outcomes.failure_rate) == (0, 0, None)
    assert m.outcomes.by_outcome.empty
    assert len(m.wip) == 25 and m.wip[["open_runs", "active_runs"]].sum().sum() == 0
    assert m.blocked.empty and m.blocked_count == 0
    assert list(m.blocked.columns) == ["id", "title", "age_seconds", "since", "reason"]
    assert m.oldest_ready is None
    assert len(m.burnup) == 25 and m.burnup[["done", "scope"]].sum().sum() == 0  # hourly on a day
    assert m.phases is not None and m.phases.empty
    assert not m.stuck.any
    assert m.stuck.ready_idle["latest_start"] is None
    assert m.stuck.no_completion["idle_seconds"] is None
    assert m.stuck.over_max_runs["count"] == 0
    assert compute(db).phases is None  # no phase_of, no phases
    doc = json.loads(json.dumps(m.as_dict()))
    assert doc["lead_time"] == {"count": 0, "median": None, "p90": None, "seconds": []}
    assert doc["oldest_ready"] is None and doc["phases"] == []
    assert m.summary_lines() and all(isinstance(line, str) for line in m.summary_lines())
    assert m.risk_lines() == []


# -- blocked work only -------------------------------------------------------------------


@pytest.fixture
def blocked_board(db):
    # a: blocked event at NOW-5000 with a reason; its run's summary loses to the event
    add_task(db, "a", "blocked", NOW - 20000, started=NOW - 6000, title="needs a key")
    add_run(db, "a", NOW - 6000, NOW - 5000, "blocked", summary="run summary a")
    add_event(db, "a", "blocked", NOW - 5000, {"reason": "needs API key", "kind": None})
    # b: the circuit breaker: three crashes, gave_up; last_failure_error wins
    add_task(db, "b", "blocked", NOW - 9000, started=NOW - 8000,
             last_failure_error="crash: segfault")
    for start in (NOW - 8000, NOW - 6000, NOW - 4000):
        add_run(db, "b", start, start + 1000, "crashed", error="crash: segfault")
    add_event(db, "b", "gave_up", NOW - 3000, {"error": "crash: segfault", "failures": 3})
    # c: no event; the last run (highest id) ended at NOW-2000 with only an error
    add_task(db, "c", "blocked", NOW - 8000)
    add_run(db, "c", NOW - 7000, NOW - 6500, "crashed", summary="older run")
    add_run(db, "c", NOW - 2500, NOW - 2000, "timed_out", error="timed out after 60s")
    # d: nothing but its creation
    add_task(db, "d", "blocked", NOW - 1000)
    # e: blocked twice; the latest blocked event counts, an unblock between does not,
    #    an event dated after NOW is ignored
    add_task(db, "e", "blocked", NOW - 10000)
    add_event(db, "e", "blocked", NOW - 9000, {"reason": "first"})
    add_event(db, "e", "unblocked", NOW - 4500)
    add_event(db, "e", "blocked", NOW - 4000, {"reason": "second"})
    add_event(db, "e", "blocked", NOW + 100, {"reason": "from the future"})
    return db


def test_only_blocked_tasks(blocked_board):
    m = compute(blocked_board, phase_of={t: "P1" for t in "abcde"}, max_reruns=2)
    assert m.blocked_count == 5
    assert m.blocked.to_dict("records") == [
        {"id": "a", "title": "needs a key", "age_seconds": 5000,
         "since": formatting.iso_utc(NOW - 5000), "reason": "needs API key"},
        {"id": "e", "title": "task e", "age_seconds": 4000,
         "since": formatting.iso_utc(NOW - 4000), "reason": "second"},
        {"id": "b", "title": "task b", "age_seconds": 3000,
         "since": formatting.iso_utc(NOW - 3000), "reason": "crash: segfault"},
        {"id": "c", "title": "task c", "age_seconds": 2000,
         "since": formatting.iso_utc(NOW - 2000), "reason": "timed out after 60s"},
        {"id": "d", "title": "task d", "age_seconds": 1000,
         "since": formatting.iso_utc(NOW - 1000), "reason": None},
    ]
    assert m.counts["by_status"] == {"blocked": 5} and m.counts["open"] == 5
    assert m.throughput.completed == 0 and m.throughput.per_hour == 0.0
    assert m.lead_time.median is None and m.cycle_time.p90 is None
    # ETA: 5 open tasks and no throughput -> None
    assert m.phases.to_dict("records") == [
        {"phase": "P1", "tasks": 5, "done": 0, "open": 5, "blocked": 5, "eta_hours": None, "eta": None,
         "eta_basis": "all 5 open blocked on a person"}]  # waiting for people, not for agents
    # stuck: no ready work; b ran 3 times > 2; nothing ever completed since the first
    # task was created at NOW-20000 > 4 h
    assert not m.stuck.ready_idle["active"]
    over = m.stuck.over_max_runs
    assert over["active"] and over["count"] == 1
    assert over["tasks"].to_dict("records") == [{"id": "b", "title": "task b", "status": "blocked", "runs": 3}]
    nc = m.stuck.no_completion
    assert nc["active"] and nc["idle_seconds"] == 20000 and nc["last_completed_at"] is None
    assert nc["threshold_seconds"] == 4 * HOUR
    assert not compute(blocked_board, no_completion_hours=6).stuck.no_completion["active"]  # 20000 < 21600
    lines = "\n".join(m.summary_lines())
    assert "Blocked: 5 tasks, oldest a" in lines and "no ETA" in lines
    assert "run more than 2 times: b (3)" in lines
    # waiting on a person: a (5000 s) and e (4000 s) are blocked for more than an hour
    waiting = m.stuck.waiting_on_person
    assert (waiting["active"], waiting["count"], waiting["threshold_seconds"]) == (True, 2, 3600)
    assert waiting["oldest"] == {"id": "a", "title": "needs a key", "age_seconds": 5000, "reason": "needs API key"}
    assert ("Stuck: 2 blocked tasks waiting on a person for more than 1.0 h; the oldest, a (needs a key), "
            "for 1.4 h: needs API key.") in m.risk_lines()
    assert not compute(blocked_board, stuck_blocked_minutes=90).stuck.waiting_on_person["active"]
    assert m.as_dict()["stuck"]["waiting_on_person"]["count"] == 2
    assert m.risk_lines() == [line for line in m.summary_lines() if line.startswith("Stuck:")]
    assert len(m.risk_lines()) == 3 and not any("Stuck" in x for x in m.summary_lines(risks=False))
    # the list is capped, the count is not
    capped = compute(blocked_board, list_limit=2)
    assert list(capped.blocked["id"]) == ["a", "e"] and capped.blocked_count == 5


# -- runs, retries and outcomes ----------------------------------------------------------


def test_runs_per_task_retries_and_outcomes(db):
    t0 = NOW - DAY
    add_task(db, "t1", "done", t0 - 2000, started=t0 - 1000, completed=t0 + 400)
    add_run(db, "t1", t0 - 1000, t0 - 500, "crashed")  # before the window: its first run
    add_run(db, "t1", t0 + 100, t0 + 200, "crashed")
    add_run(db, "t1", t0 + 300, t0 + 400, "completed")
    add_task(db, "t2", "ready", NOW - 6000, started=NOW - 5000)
    add_run(db, "t2", NOW - 5000, NOW - 4000, "timed_out")
    add_run(db, "t2", NOW - 3000, NOW - 2000, "crashed")
    add_run(db, "t2", NOW - 1500, NOW - 1000, "rate_limited")
    add_run(db, "t2", NOW - 900, NOW - 800, "protocol_violation")
    add_task(db, "t3", "running", NOW - 700, started=NOW - 600)
    add_run(db, "t3", NOW - 600)  # still open
    add_run(db, "t3", NOW + 10)  # after NOW: ignored everywhere
    add_task(db, "t4", "blocked", t0 - 6000, started=t0 - 5000)
    add_run(db, "t4", t0 - 5000, t0 + 50, "blocked")  # started before, ended inside
    add_task(db, "t5", "done", NOW - 200, started=NOW - 100, completed=NOW - 50)
    add_run(db, "t5", NOW - 100, NOW - 50, "completed")
    add_task(db, "t6", "todo", NOW - 60, started=NOW - 50)
    add_run(db, "t6", NOW - 50, NOW - 40, None)  # ended without an outcome

    m = compute(db)
    r = m.runs
    # started in the window: t1 2, t2 4, t3 1, t5 1, t6 1 (t4's run started before it)
    assert (r.runs, r.tasks, r.max) == (9, 5, 4)
    assert r.mean == pytest.approx(9 / 5)
    assert r.distribution.to_dict("records") == [{"runs": 1, "tasks": 3}, {"runs": 2, "tasks": 1},
                                                 {"runs": 4, "tasks": 1}]
    # not the task's first run ever: both of t1's (its first was before the window), 3 of t2's
    assert r.retries == 5 and r.retry_rate == pytest.approx(5 / 9)
    o = m.outcomes
    assert o.ended == 9  # t1 2, t2 4, t4 1, t5 1, t6 1
    assert o.by_outcome.to_dict("records") == [
        {"outcome": "completed", "count": 2, "share": pytest.approx(2 / 9)},
        {"outcome": "crashed", "count": 2, "share": pytest.approx(2 / 9)},
        {"outcome": "blocked", "count": 1, "share": pytest.approx(1 / 9)},
        {"outcome": "protocol_violation", "count": 1, "share": pytest.approx(1 / 9)},
        {"outcome": "rate_limited", "count": 1, "share": pytest.approx(1 / 9)},
        {"outcome": "timed_out", "count": 1, "share": pytest.approx(1 / 9)},
        {"outcome": "unknown", "count": 1, "share": pytest.approx(1 / 9)},
    ]
    # failures: crashed 2, timed_out, rate_limited, protocol_violation
    assert o.failures == 5 and o.failure_rate == pytest.approx(5 / 9)
    assert m.counts["active_runs"] == 1  # t3's open run (the one after NOW is not counted)
    # stuck: t2 (ready) ran 4 times > 3; t1 ran 3 times but is done
    over = m.stuck.over_max_runs
    assert over["count"] == 1 and list(over["tasks"]["id"]) == ["t2"]
    # the latest start is t6's at NOW-50: not idle for 30 min, idle for more than 0.5 min
    assert m.stuck.ready_idle["latest_start"] == NOW - 50 and not m.stuck.ready_idle["active"]
    assert compute(db, stuck_ready_minutes=0.5).stuck.ready_idle["active"]
    # a completion at NOW-50: no "no completion" signal
    assert m.stuck.no_completion["idle_seconds"] == 50 and not m.stuck.no_completion["active"]


def test_runs_made_by_the_state_machine(db):
    t = board.create_task(db, "flaky", assignee="alice", now=NOW - 5000)
    run1 = board.claim(db, t, lock="h:1", now=NOW - 4000).run_id
    board.fail(db, t, run_id=run1, outcome=Outcome.CRASHED, error="boom", failure_limit=3,
               now=NOW - 3900)
    run2 = board.claim(db, t, lock="h:1", now=NOW - 3000).run_id
    board.complete(db, t, run_id=run2, result="ok", now=NOW - 1000)
    m = compute(db)
    assert (m.runs.runs, m.runs.tasks, m.runs.retries) == (2, 1, 1)
    assert m.outcomes.failure_rate == pytest.approx(0.5)
    assert m.lead_time.median == 4000.0  # created NOW-5000, completed NOW-1000
    assert m.cycle_time.median == 3000.0  # first claim NOW-4000
    assert m.counts["by_assignee"] == {"alice": {"done": 1}}


# -- lead and cycle time -----------------------------------------------------------------


def test_lead_and_cycle_time_median_and_p90(db):
    # (created, started, completed) relative to NOW-10000, all completed in the window
    base = NOW - 10000
    add_task(db, "l1", "done", base, started=base + 50, completed=base + 100)  # lead 100, cycle 50
    add_task(db, "l2", "done", base, started=base + 140, completed=base + 200)  # 200, 60
    add_task(db, "l3", "done", base, started=base + 310, completed=base + 400)  # 400, 90
    add_task(db, "l4", "archived", base, started=base + 600, completed=base + 800)  # 800, 200
    add_task(db, "l5", "done", base, completed=base + 1600)  # lead 1600, never started
    # not completions in the window
    add_task(db, "x1", "done", NOW - 2 * DAY, completed=NOW - DAY - 1)  # just before it
    add_task(db, "x2", "archived", base)  # archived, never completed
    add_task(db, "x3", "done", base, completed=NOW + 1)  # after NOW
    add_task(db, "x4", "ready", base, completed=base + 10)  # reopened (Hermes): not delivered
    m = compute(db)
    # leads 100 200 400 800 1600: median 400; p90 at 0.9*4 = 3.6 -> 800 + 0.6*800 = 1280
    assert m.lead_time.count == 5
    assert m.lead_time.median == 400.0 and m.lead_time.p90 == pytest.approx(1280.0)
    assert sorted(m.lead_time.seconds["seconds"]) == [100, 200, 400, 800, 1600]
    # cycles 50 60 90 200: median (60+90)/2 = 75; p90 at 0.9*3 = 2.7 -> 90 + 0.7*110 = 167
    assert m.cycle_time.count == 4
    assert m.cycle_time.median == 75.0 and m.cycle_time.p90 == pytest.approx(167.0)
    assert m.throughput.completed == 5
    assert m.throughput.per_hour == pytest.approx(5 / 24)
    doc = m.as_dict()
    assert sorted(doc["cycle_time"]["seconds"]) == [50, 60, 90, 200]
    assert "seconds" not in m.as_dict(series=False)["lead_time"]


def test_window_bounds(db):
    start = NOW - DAY
    add_task(db, "before", "done", start - 100, completed=start - 1)
    add_task(db, "first", "done", start - 100, completed=start)
    add_task(db, "last", "done", start - 100, completed=NOW)
    add_task(db, "after", "done", start - 100, completed=NOW + 1)
    m = compute(db)
    assert m.throughput.completed == 2
    hourly = m.throughput.hourly
    assert hourly["start"].iloc[0] == start // HOUR * HOUR and hourly["count"].iloc[0] == 1
    assert hourly["start"].iloc[-1] == NOW // HOUR * HOUR and hourly["count"].iloc[-1] == 1
    assert hourly["count"].sum() == 2 and m.lead_time.count == 2
    # a fractional window: 0.5 h = 1800 s
    assert compute(db, window_hours=0.5).window.start == NOW - 1800
    with pytest.raises(InvalidInput, match="window_hours"):
        compute(db, window_hours=0)


# -- UTC buckets, whatever the local time zone -------------------------------------------


@pytest.mark.parametrize("tz", ["Europe/Berlin", "America/New_York"])
@pytest.mark.parametrize("change, daily", [
    # at-3601 is 23:59:59 UTC the day before
    ("2026-03-29 01:00:00", [("2026-03-28T00:00:00Z", 1), ("2026-03-29T00:00:00Z", 5)]),
    ("2026-11-01 06:00:00", [("2026-11-01T00:00:00Z", 6)]),
])
def test_throughput_buckets_are_utc_hours_across_dst(db, monkeypatch, tz, change, daily):
    # Europe leaves winter time at 2026-03-29 01:00 UTC; the US leaves summer time
    # at 2026-11-01 06:00 UTC (02:00 EDT).
    at = utc(change)
    for i, offset in enumerate((-3601, -1, 0, 1800, 3600, 7199)):
        add_task(db, f"c{i}", "done", at - 2 * HOUR, completed=at + offset)
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        assert time.localtime(at).tm_hour != time.gmtime(at).tm_hour  # local time is elsewhere
        m = compute(db, now=at + 2 * HOUR + 1800, window_hours=4)  # window from at - 1.5 h
    finally:
        monkeypatch.undo()
        time.tzset()
    hourly = m.throughput.hourly
    hour0 = at - 2 * HOUR
    assert list(hourly["start"]) == [hour0 + i * HOUR for i in range(5)]
    assert list(hourly["bucket"]) == [formatting.iso_utc(hour0 + i * HOUR) for i in range(5)]
    assert hourly["bucket"].iloc[2] == change.replace(" ", "T") + "Z"
    # the window is at-5400 .. at+9000: at-3601 falls in hour at-2h, at-1 in at-1h,
    # at and at+1800 in hour at, at+3600 and at+7199 in at+1h
    assert list(hourly["count"]) == [1, 1, 2, 2, 0]
    assert [(r["bucket"], r["count"]) for r in m.throughput.daily.to_dict("records")] == daily
    assert all(start % DAY == 0 for start in m.throughput.daily["start"])


# -- WIP ---------------------------------------------------------------------------------


def test_wip_counts_open_runs_per_utc_hour(db):
    h0 = (NOW // HOUR - 3) * HOUR  # the first hour the 3 h window touches
    now = h0 + 3 * HOUR + 1800
    t0 = now - 3 * HOUR  # = h0 + 1800
    add_task(db, "w", "running", h0 - 9000)
    add_run(db, "w", h0 - 7200, h0 + 900, "crashed")  # ended before the window opened
    add_run(db, "w", h0 - 100, h0 + HOUR + 10, "reclaimed")  # open in h0 and h1
    add_run(db, "w", h0 + HOUR + 100, h0 + HOUR + 200, "crashed")  # h1 only
    add_run(db, "w", h0 + 2 * HOUR + 5)  # open: h2, h3
    add_run(db, "w", h0 + 3 * HOUR, h0 + 3 * HOUR, "crashed")  # zero length, h3
    add_run(db, "w", now + 100)  # after now
    m = compute(db, now=now, window_hours=3)
    assert m.window.start == t0
    assert list(m.wip["start"]) == [h0, h0 + HOUR, h0 + 2 * HOUR, h0 + 3 * HOUR]
    # at each hour's last second (now for the last): h0 the 2nd run; h1 none (2nd and 3rd
    # ended); h2 and h3 the 4th (the zero-length 5th ended at once)
    assert list(m.wip["open_runs"]) == [1, 0, 1, 1]
    # at some moment of the hour inside the window
    assert list(m.wip["active_runs"]) == [1, 2, 1, 2]
    assert m.counts["active_runs"] == 1


# -- burn-up -----------------------------------------------------------------------------


def test_burnup_done_versus_scope(db):
    d = NOW // DAY * DAY  # today's midnight UTC
    now = d + 43200
    add_task(db, "a", "done", d - 5 * DAY, completed=d - 2 * DAY + 100)
    add_task(db, "b", "archived", d - DAY + 10)  # cancelled: never in scope
    add_task(db, "c", "archived", d - DAY + 20, completed=d + 100)  # delivered, then archived
    add_task(db, "d", "ready", d + 200)
    add_task(db, "e", "ready", now + 1)  # after now
    add_task(db, "f", "todo", d - 3 * DAY)
    m = compute(db, now=now, window_hours=72)  # from d - 2.5 days: days d-3 to d
    assert m.burnup.to_dict("records") == [
        {"bucket": formatting.iso_utc(d - 3 * DAY), "start": d - 3 * DAY, "done": 0, "scope": 2},
        {"bucket": formatting.iso_utc(d - 2 * DAY), "start": d - 2 * DAY, "done": 1, "scope": 2},
        {"bucket": formatting.iso_utc(d - DAY), "start": d - DAY, "done": 1, "scope": 3},
        {"bucket": formatting.iso_utc(d), "start": d, "done": 2, "scope": 4},
    ]
    # up to two days the burn-up is hourly, so a day's sprint is more than two points
    hourly = compute(db, now=now, window_hours=24).burnup
    assert len(hourly) == 25 and set(hourly["start"].diff().dropna()) == {HOUR}
    assert hourly.iloc[0][["done", "scope"]].tolist() == [1, 3]  # at d - 12 h: a done; a, c, f in scope
    assert hourly.iloc[-1][["done", "scope"]].tolist() == [2, 4]
    assert hourly[hourly["start"] == d]["done"].item() == 2  # c, completed at d + 100


# -- ETA per phase -----------------------------------------------------------------------


def test_eta_per_phase(db):
    """A phase's ETA rests on its own recent completions, else on the board's; its
    blocked tasks wait for a person and are not estimated."""
    base = NOW - 10 * HOUR
    for i in range(4):  # 2 completions in P1, 2 in P2 (too few for a pace of its own)
        add_task(db, f"p1_{i}" if i < 2 else f"p2_done{i}", "done", base, completed=base + i)
    add_task(db, "free1", "done", base, completed=base + 10)
    add_task(db, "free2", "done", base, completed=base + 11)
    for i, ago in enumerate((2 * HOUR, HOUR, HOUR // 2)):  # P3: 3 completions in the last 2 h
        add_task(db, f"p3_done{i}", "done", base, completed=NOW - ago)
    for i in range(3):
        add_task(db, f"p3_open{i}", "ready", base)
    add_task(db, "p2_ready", "ready", base)
    add_task(db, "p2_todo", "todo", base)
    add_task(db, "p2_blocked", "blocked", base)
    add_task(db, "p2_gone", "archived", base)  # archived: out of the phase
    add_task(db, "p10_run", "running", base)
    add_task(db, "unphased", "ready", base)
    phase_of = {"p1_0": "P1", "p1_1": "P1", "p2_done2": "P2", "p2_done3": "P2",
                "p2_ready": "P2", "p2_todo": "P2", "p2_blocked": "P2", "p2_gone": "P2",
                "p10_run": "P10", "not_on_board": "P4",
                **{f"p3_{kind}{i}": "P3" for kind in ("done", "open") for i in range(3)}}
    m = compute(db, phase_of=phase_of)
    board_pace = 9 / 10  # the board's last 9 completions over the 10 h since the first of them
    assert m.phases.to_dict("records") == [
        {"phase": "P1", "tasks": 2, "done": 2, "open": 0, "blocked": 0, "eta_hours": 0.0,
         "eta": formatting.iso_utc(NOW), "eta_basis": "done"},
        {"phase": "P2", "tasks": 5, "done": 2, "open": 3, "blocked": 1, "eta_hours": pytest.approx(2 / board_pace),
         "eta": formatting.iso_utc(NOW + round(2 / board_pace * HOUR)),
         "eta_basis": "from the board's last 9 completions; 1 blocked not counted"},
        {"phase": "P3", "tasks": 6, "done": 3, "open": 3, "blocked": 0, "eta_hours": pytest.approx(2.0),
         "eta": formatting.iso_utc(NOW + 2 * HOUR), "eta_basis": "from the last 3 completions of P3"},
        {"phase": "P10", "tasks": 1, "done": 0, "open": 1, "blocked": 0, "eta_hours": pytest.approx(1 / board_pace),
         "eta": formatting.iso_utc(NOW + round(1 / board_pace * HOUR)),
         "eta_basis": "from the board's last 9 completions"},
    ]
    assert "P3: 3 open, ETA 2.0 h" in "\n".join(m.summary_lines())
    # a phase that stalls: an hour later with nothing done, its pace falls and its ETA grows
    later = compute(db, now=NOW + HOUR, phase_of=phase_of).phases.set_index("phase")
    assert later.loc["P3", "eta_hours"] == pytest.approx(3.0)  # 3 completions in 3 h


def test_ready_wait_counts_from_when_the_task_became_ready(db):
    """A task created a day ago and promoted a minute ago has waited a minute."""
    add_task(db, "old_promoted", "ready", NOW - DAY)
    add_event(db, "old_promoted", "created", NOW - DAY, {"status": "todo"})
    add_event(db, "old_promoted", "promoted", NOW - 60)
    add_task(db, "retried", "ready", NOW - 2 * DAY)
    add_event(db, "retried", "crashed", NOW - 600, {"error": "boom"})  # back to ready after a crash
    add_event(db, "retried", "commented", NOW - 10, {"author": "x"})  # not a move to ready
    m = compute(db)
    assert m.oldest_ready == {"id": "retried", "title": "task retried", "ready_since": NOW - 600,
                              "age_seconds": 600}
    assert "Oldest ready task: retried, waiting 10 min." in m.summary_lines()
    with db.read() as conn:
        assert queries.longest_ready_wait(conn, NOW)["wait_seconds"] == 600


def test_plurals():
    assert [formatting.plural(n, "run") for n in (0, 1, 2)] == ["0 runs", "1 run", "2 runs"]
    assert formatting.plural(1, "retry", "retries") == "1 retry"
    assert formatting.plural(3, "retry", "retries") == "3 retries"


# -- the Hermes-made board ---------------------------------------------------------------


def test_hermes_board(tmp_path):
    expected = json.loads((FIXTURES / "hermes_board.expected.json").read_text())
    copy = tmp_path / "board" / "kanban.db"
    copy.parent.mkdir()
    shutil.copyfile(FIXTURES / "hermes_board.db", copy)
    settings = make_settings(tmp_path, board_url=f"sqlite:///{copy}",
                             ops_url=f"sqlite:///{tmp_path}/ops/sparkops.db")
    store = open_store(settings, create=True)
    try:
        names = expected["names"]
        now = expected["stats"]["oldest_ready_created_at"] + DAY
        m = measure.compute(store.board, now=now, window_hours=48,
                            phase_of={tid: "all" for tid in names.values()})
        json.dumps(m.as_dict())
        assert m.summary_lines()
    finally:
        store.dispose()
    assert m.counts["by_status"] == expected["stats"]["by_status"]
    assert m.counts["by_assignee"] == expected["stats"]["by_assignee"]
    assert m.counts["archived"] == 1 and m.counts["active_runs"] == 1
    # ready from its latest event that made it so (Hermes wrote it a second after the creation)
    created = expected["stats"]["oldest_ready_created_at"]
    assert created <= m.oldest_ready["ready_since"] <= created + 60
    assert m.oldest_ready["age_seconds"] == now - m.oldest_ready["ready_since"]
    assert m.throughput.completed == 2 and m.lead_time.count == 2
    flaky = expected["tasks"][names["flaky"]]
    assert list(m.blocked["id"]) == [names["flaky"]]
    assert m.blocked["reason"].iloc[0] == flaky["runs"][-1]["summary"]  # the block reason
    assert m.runs.runs == sum(len(t["runs"]) for t in expected["tasks"].values())
    assert m.phases["open"].iloc[0] == 6  # 8 live tasks, 2 done


# -- SQLite and PostgreSQL agree ---------------------------------------------------------


def build_mixed_board(db: Database) -> None:
    t0 = NOW - DAY
    add_task(db, "m1", "done", t0 - 3000, started=t0 - 2000, completed=t0 + 500, assignee="alice")
    add_run(db, "m1", t0 - 2000, t0 - 1000, "crashed", error="boom")
    add_run(db, "m1", t0 + 100, t0 + 500, "completed", summary="ok")
    add_task(db, "m2", "done", NOW - 7000, started=NOW - 6500, completed=NOW - 3000, assignee="bob")
    add_run(db, "m2", NOW - 6500, NOW - 3000, "completed")
    add_task(db, "m3", "blocked", NOW - 9000, started=NOW - 8000, assignee="bob",
             last_failure_error="crash: oom")
    for start in (NOW - 8000, NOW - 7000, NOW - 6000, NOW - 5000):
        add_run(db, "m3", start, start + 500, "crashed", error="crash: oom")
    add_event(db, "m3", "gave_up", NOW - 4500, {"error": "crash: oom"})
    add_task(db, "m4", "ready", NOW - 4000)
    add_task(db, "m5", "running", NOW - 2000, started=NOW - 1500, assignee="alice")
    add_run(db, "m5", NOW - 1500)
    add_task(db, "m6", "archived", NOW - 500)


def test_same_answers_on_sqlite_and_postgresql(store, tmp_path):
    build_mixed_board(store.board)
    phase_of = {"m1": "1", "m2": "1", "m3": "2", "m4": "2", "m5": "2"}
    got = measure.compute(store.board, now=NOW, window_hours=24, phase_of=phase_of).as_dict()
    ref_store = open_store(make_settings(tmp_path / "ref"), create=True, now=NOW)
    try:
        build_mixed_board(ref_store.board)
        ref = measure.compute(ref_store.board, now=NOW, window_hours=24, phase_of=phase_of).as_dict()
    finally:
        ref_store.dispose()
    assert got == ref
    # and the answers, by hand
    assert got["counts"]["by_status"] == {"blocked": 1, "done": 2, "ready": 1, "running": 1}
    assert got["counts"]["by_assignee"] == {"alice": {"done": 1, "running": 1},
                                            "bob": {"blocked": 1, "done": 1}}
    assert got["throughput"]["completed"] == 2
    assert got["lead_time"]["seconds"] == [3500, 4000]  # sorted
    assert got["lead_time"]["median"] == 3750.0
    assert got["runs"]["runs"] == 7 and got["runs"]["retries"] == 4  # m1's second, m3's last 3
    assert got["outcomes"]["failures"] == 4 and got["outcomes"]["ended"] == 6
    assert got["blocked"] == [{"id": "m3", "title": "task m3", "age_seconds": 4500,
                               "since": formatting.iso_utc(NOW - 4500), "reason": "crash: oom"}]
    assert got["oldest_ready"]["id"] == "m4" and got["oldest_ready"]["age_seconds"] == 4000
    assert got["stuck"]["over_max_runs"]["tasks"] == [
        {"id": "m3", "title": "task m3", "status": "blocked", "runs": 4}]
    assert got["phases"][1] == {"phase": "2", "tasks": 3, "done": 0, "open": 3, "blocked": 1, "eta_hours": None,
                                "eta": None, "eta_basis": "not enough completions yet"}  # 2 on the board


def test_options_from_settings(tmp_path):
    settings = make_settings(tmp_path, SPARKOPS_REVIEW_WINDOW_HOURS="12", SPARKOPS_REVIEW_MAX_RERUNS="5")
    opts = measure.options_from(settings)
    assert opts["window_hours"] == 12.0 and opts["max_reruns"] == 5
    assert opts["stuck_ready_minutes"] == 30.0 and opts["no_completion_hours"] == 4.0
    assert opts["stuck_blocked_minutes"] == 60.0
