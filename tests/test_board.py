"""The state machine, on SQLite and PostgreSQL: every transition, its run row,
its event, the fencing token and the refusals."""

from __future__ import annotations

import pytest
from conftest import NOW
from sqlalchemy import select, update

from sparkops.board import model, queries, runs
from sparkops.board import transitions as board
from sparkops.board.model import Outcome, Status
from sparkops.core.errors import InvalidInput, NotFound, Refused, StaleRun, TransitionRefused
from sparkops.storage.schema import task_events, task_runs, tasks


def status_of(store, task_id: str) -> str:
    return queries.get_task(store.board, task_id)["status"]


def events_of(store, task_id: str) -> list[str]:
    return [e["kind"] for e in queries.task_detail(store.board, task_id)["events"]]


def snapshot(store) -> dict:
    """Every row of the board, to prove a refused call changed nothing."""
    with store.board.read() as conn:
        return {t.name: sorted(map(tuple, conn.execute(select(t)).all()), key=repr)
                for t in (tasks, task_runs, task_events)}


def test_create_starts_ready_and_records_event(store):
    task_id = board.create_task(store.board, "  Build the store  ", body="b", assignee="Alice",
                                priority=3, created_by="cli", now=NOW)
    task = queries.get_task(store.board, task_id)
    assert task_id.startswith("t_") and len(task_id) == 10
    assert task["title"] == "Build the store"
    assert task["status"] == "ready"
    assert task["assignee"] == "alice"  # Hermes lower-cases assignees
    assert task["created_at"] == NOW
    assert events_of(store, task_id) == ["created"]


def test_child_waits_in_todo_until_parents_finish(store):
    a = board.create_task(store.board, "A", now=NOW)
    b = board.create_task(store.board, "B", now=NOW)
    child = board.create_task(store.board, "C", parents=[a, b], now=NOW)
    assert status_of(store, child) == "todo"
    with pytest.raises(TransitionRefused, match="claim applies to ready"):
        board.claim(store.board, child, lock="h:1", now=NOW)

    run = board.claim(store.board, a, lock="h:1", now=NOW).run_id
    board.complete(store.board, a, run_id=run, now=NOW + 5)
    assert status_of(store, child) == "todo"  # b is still open
    board.archive(store.board, b, now=NOW + 6)  # archived parents count as finished
    assert status_of(store, child) == "ready"
    assert events_of(store, child)[-1] == "promoted"


def test_create_with_unknown_parent_creates_nothing(store):
    before = snapshot(store)
    with pytest.raises(NotFound, match="t_missing"):
        board.create_task(store.board, "orphan", parents=["t_missing"], now=NOW)
    assert snapshot(store) == before


@pytest.mark.parametrize("title", ["", "   ", None])
def test_empty_title_is_refused(store, title):
    with pytest.raises(InvalidInput, match="title"):
        board.create_task(store.board, title, now=NOW)
    assert queries.list_tasks(store.board, include_archived=True) == []


def test_triage_and_idempotency_key(store):
    t = board.create_task(store.board, "Spec me", triage=True, idempotency_key="k1", now=NOW)
    assert status_of(store, t) == "triage"
    assert board.create_task(store.board, "Spec me again", idempotency_key="k1", now=NOW) == t
    assert len(queries.list_tasks(store.board)) == 1


def test_claim_opens_run_and_complete_closes_it(store):
    t = board.create_task(store.board, "Work", assignee="bob", now=NOW)
    change = board.claim(store.board, t, lock="gb10:4242", ttl_seconds=600, now=NOW)
    assert (change.from_status, change.to_status) == ("ready", "running")
    task = queries.get_task(store.board, t)
    assert task["current_run_id"] == change.run_id
    assert task["claim_lock"] == "gb10:4242" and task["claim_expires"] == NOW + 600
    assert task["started_at"] == NOW
    [run] = queries.list_runs(store.board, task_id=t)
    assert run["status"] == "running" and run["ended_at"] is None and run["profile"] == "bob"

    done = board.complete(store.board, t, run_id=change.run_id, result="shipped",
                          metadata={"tests": 3}, now=NOW + 90)
    assert done.to_status == "done"
    task = queries.get_task(store.board, t)
    assert task["status"] == "done" and task["current_run_id"] is None
    assert task["claim_lock"] is None and task["completed_at"] == NOW + 90
    [run] = queries.list_runs(store.board, task_id=t)
    assert (run["status"], run["outcome"], run["ended_at"]) == ("done", "completed", NOW + 90)
    assert run["summary"] == "shipped" and run["metadata"] == {"tests": 3}
    assert events_of(store, t) == ["created", "claimed", "completed"]


def test_stale_run_is_refused_and_changes_nothing(store):
    """The run id fences late writers: a reclaimed worker's report is refused."""
    t = board.create_task(store.board, "Work", now=NOW)
    first = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    board.reclaim(store.board, t, run_id=first, reason="worker died", now=NOW + 10)
    second = board.claim(store.board, t, lock="h:2", now=NOW + 20).run_id
    before = snapshot(store)
    for late in (
        lambda: board.complete(store.board, t, run_id=first, result="late", now=NOW + 30),
        lambda: board.block(store.board, t, run_id=first, reason="late", now=NOW + 30),
        lambda: runs.heartbeat(store.board, t, run_id=first, now=NOW + 30),
        lambda: board.fail(store.board, t, run_id=first, outcome=Outcome.CRASHED, error="x",
                           failure_limit=2, now=NOW + 30),
    ):
        with pytest.raises(StaleRun) as err:
            late()
        assert err.value.current_run_id == second
    assert snapshot(store) == before
    board.complete(store.board, t, run_id=second, now=NOW + 40)
    assert status_of(store, t) == "done"


def test_complete_a_finished_task_is_refused(store):
    t = board.create_task(store.board, "Work", now=NOW)
    board.complete(store.board, t, now=NOW)
    with pytest.raises(TransitionRefused, match="cannot complete"):
        board.complete(store.board, t, now=NOW)


def test_manual_complete_of_ready_task_keeps_summary_in_a_run(store):
    t = board.create_task(store.board, "Quick fix", now=NOW)
    board.complete(store.board, t, result="done by hand", now=NOW + 1)
    [run] = queries.list_runs(store.board, task_id=t)
    assert (run["outcome"], run["started_at"], run["ended_at"]) == ("completed", NOW + 1, NOW + 1)


def test_block_routes_by_kind_and_breaks_loops(store):
    t = board.create_task(store.board, "Needs a key", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    change = board.block(store.board, t, reason="no API key", kind="needs_input", run_id=run,
                         now=NOW + 1)
    assert change.to_status == "blocked"
    [r] = queries.list_runs(store.board, task_id=t)
    assert (r["status"], r["outcome"], r["summary"]) == ("blocked", "blocked", "no API key")
    assert board.unblock(store.board, t, now=NOW + 2).to_status == "ready"
    # the same cause again after an unblock: the loop breaker sends it to triage
    change = board.block(store.board, t, reason="still no key", kind="needs_input", now=NOW + 3)
    assert change.to_status == "triage"
    assert events_of(store, t)[-1] == "block_loop_detected"

    d = board.create_task(store.board, "Wait for infra", now=NOW)
    assert board.block(store.board, d, kind="dependency", reason="infra", now=NOW).to_status == "todo"
    with pytest.raises(InvalidInput, match="block kind"):
        board.block(store.board, d, kind="bogus")


def test_unblock_waits_for_parents(store):
    parent = board.create_task(store.board, "P", now=NOW)
    child = board.create_task(store.board, "C", now=NOW)
    board.block(store.board, child, reason="hold", now=NOW)
    board.link(store.board, parent, child, now=NOW)
    assert board.unblock(store.board, child, now=NOW + 1).to_status == "todo"


def test_promote_respects_parents_unless_forced(store):
    parent = board.create_task(store.board, "P", now=NOW)
    child = board.create_task(store.board, "C", parents=[parent], now=NOW)
    with pytest.raises(TransitionRefused, match="parents not finished"):
        board.promote(store.board, child, now=NOW)
    assert status_of(store, child) == "todo"
    change = board.promote(store.board, child, force=True, actor="ops", now=NOW)
    assert change.to_status == "ready"
    assert queries.task_detail(store.board, child)["events"][-1]["payload"] == {
        "actor": "ops", "reason": None, "forced": True}


def test_archive_of_a_running_task_closes_its_run_as_hermes_does(store):
    """The shim watching the run stops its agent (tests/test_shared_board.py)."""
    t = board.create_task(store.board, "Busy", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    change = board.archive(store.board, t, now=NOW + 2)
    assert (change.from_status, change.to_status, change.run_id) == ("running", "archived", run)
    [r] = queries.list_runs(store.board, task_id=t)
    assert (r["status"], r["outcome"], r["ended_at"]) == ("reclaimed", "reclaimed", NOW + 2)
    task = queries.get_task(store.board, t)
    assert task["claim_lock"] is None and task["current_run_id"] is None
    with pytest.raises(TransitionRefused):
        board.archive(store.board, t, now=NOW + 3)


def test_reclaim_closes_run_with_reason(store):
    t = board.create_task(store.board, "Crashy", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    board.reclaim(store.board, t, run_id=run, reason="pid 4242 is gone", now=NOW + 7)
    [r] = queries.list_runs(store.board, task_id=t)
    assert (r["status"], r["outcome"], r["error"], r["ended_at"]) == (
        "reclaimed", "reclaimed", "pid 4242 is gone", NOW + 7)
    assert status_of(store, t) == "ready"


def test_failures_trip_the_circuit_breaker(store):
    t = board.create_task(store.board, "Flaky", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    assert board.fail(store.board, t, run_id=run, outcome=Outcome.CRASHED, error="boom 1",
                      failure_limit=2, now=NOW + 1).to_status == "ready"
    assert queries.get_task(store.board, t)["consecutive_failures"] == 1

    run = board.claim(store.board, t, lock="h:1", now=NOW + 2).run_id
    # a rate limit requeues without counting
    board.fail(store.board, t, run_id=run, outcome=Outcome.RATE_LIMITED, error="429",
               failure_limit=2, now=NOW + 3)
    assert queries.get_task(store.board, t)["consecutive_failures"] == 1

    run = board.claim(store.board, t, lock="h:1", now=NOW + 4).run_id
    change = board.fail(store.board, t, run_id=run, outcome=Outcome.TIMED_OUT, error="boom 2",
                        failure_limit=2, now=NOW + 5)
    assert change.to_status == "blocked"
    task = queries.get_task(store.board, t)
    assert task["consecutive_failures"] == 2 and task["last_failure_error"] == "boom 2"
    # gave_up, and the blocked event that keeps Hermes' recompute_ready away
    assert events_of(store, t)[-3:] == ["timed_out", "gave_up", "blocked"]
    outcomes = [r["outcome"] for r in reversed(queries.list_runs(store.board, task_id=t))]
    assert outcomes == ["crashed", "rate_limited", "timed_out"]
    # an operator's unblock gives a fresh budget
    board.unblock(store.board, t, now=NOW + 6)
    assert queries.get_task(store.board, t)["consecutive_failures"] == 0


def test_task_max_retries_wins_over_limit(store):
    t = board.create_task(store.board, "Fragile", max_retries=1, now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    change = board.fail(store.board, t, run_id=run, outcome=Outcome.CRASHED, error="x",
                        failure_limit=5, now=NOW + 1)
    assert change.to_status == "blocked"


def test_completion_resets_failures(store):
    t = board.create_task(store.board, "Eventually", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    board.fail(store.board, t, run_id=run, outcome=Outcome.CRASHED, error="x", failure_limit=3,
               now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW + 1).run_id
    board.complete(store.board, t, run_id=run, now=NOW + 2)
    assert queries.get_task(store.board, t)["consecutive_failures"] == 0


def test_heartbeat_updates_task_and_run(store):
    t = board.create_task(store.board, "Long", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    runs.heartbeat(store.board, t, run_id=run, now=NOW + 60)
    assert queries.get_task(store.board, t)["last_heartbeat_at"] == NOW + 60
    assert queries.list_runs(store.board, task_id=t)[0]["last_heartbeat_at"] == NOW + 60


def test_link_refuses_cycles_and_unknown_ids(store):
    a = board.create_task(store.board, "A", now=NOW)
    b = board.create_task(store.board, "B", parents=[a], now=NOW)
    c = board.create_task(store.board, "C", parents=[b], now=NOW)
    before = snapshot(store)
    with pytest.raises(Refused, match="cycle") as err:
        board.link(store.board, c, a, now=NOW)
    assert f"{c} -> {a} -> {b} -> {c}" in str(err.value)
    with pytest.raises(Refused, match="itself"):
        board.link(store.board, a, a, now=NOW)
    with pytest.raises(NotFound, match="t_nothere"):
        board.link(store.board, a, "t_nothere", now=NOW)
    assert snapshot(store) == before


def test_link_demotes_ready_child(store):
    a = board.create_task(store.board, "A", now=NOW)
    b = board.create_task(store.board, "B", now=NOW)
    board.link(store.board, a, b, now=NOW)
    assert status_of(store, b) == "todo"
    assert queries.task_detail(store.board, b)["parents"] == [a]
    board.link(store.board, a, b, now=NOW)  # linking twice is harmless
    assert events_of(store, b).count("linked") == 1


def test_comment(store):
    t = board.create_task(store.board, "Talk", now=NOW)
    board.comment(store.board, t, "  looks good  ", author="carol", now=NOW)
    [c] = queries.task_detail(store.board, t)["comments"]
    assert (c["author"], c["body"], c["created_at"]) == ("carol", "looks good", NOW)
    with pytest.raises(InvalidInput):
        board.comment(store.board, t, "   ")
    with pytest.raises(NotFound):
        board.comment(store.board, "t_00000000", "hello")


def test_promote_ready_sweeps_todo_after_external_change(store):
    """A parent finished by another tool (Hermes) is picked up by the sweep."""
    parent = board.create_task(store.board, "P", now=NOW)
    child = board.create_task(store.board, "C", parents=[parent], now=NOW)
    with store.board.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == parent).values(status="done"))
    assert board.promote_ready(store.board, now=NOW) == [child]
    assert board.promote_ready(store.board, now=NOW) == []
    assert status_of(store, child) == "ready"


def test_unknown_task_everywhere(store):
    for call in (
        lambda: board.claim(store.board, "t_unknown", lock="h:1"),
        lambda: board.complete(store.board, "t_unknown"),
        lambda: board.block(store.board, "t_unknown"),
        lambda: board.unblock(store.board, "t_unknown"),
        lambda: board.promote(store.board, "t_unknown"),
        lambda: board.archive(store.board, "t_unknown"),
        lambda: queries.task_detail(store.board, "t_unknown"),
    ):
        with pytest.raises(NotFound, match="t_unknown"):
            call()


def test_transition_table_is_the_only_way(store):
    """Every action refuses statuses outside its row in TRANSITIONS."""
    t = board.create_task(store.board, "Done already", now=NOW)
    board.complete(store.board, t, now=NOW)
    for action, call in {
        "claim": lambda: board.claim(store.board, t, lock="h:1"),
        "block": lambda: board.block(store.board, t),
        "unblock": lambda: board.unblock(store.board, t),
        "promote": lambda: board.promote(store.board, t),
    }.items():
        assert Status.DONE not in board.TRANSITIONS[action]
        with pytest.raises(TransitionRefused):
            call()
    assert status_of(store, t) == "done"


# -- what the engine needs from the state machine ------------------------------------------


def test_retry_policy_backoff_grows_and_caps():
    policy = model.RetryPolicy(backoff_seconds=10, backoff_max_seconds=60, rate_limit_cooldown_seconds=300)
    assert [policy.backoff(n) for n in range(7)] == [0, 0, 10, 20, 40, 60, 60]
    assert policy.not_before(1, "crashed", 1000) == 1000  # the first retry is immediate
    assert policy.not_before(3, "crashed", 1000) == 1020
    assert policy.not_before(0, "rate_limited", 1000) == 1300
    assert policy.not_before(3, None, None) == 0


def test_record_process_is_fenced_and_kept_when_the_run_closes(store):
    t = board.create_task(store.board, "Work", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    identity = {"process": {"host": "h", "boot_id": "b", "shim": {"pid": 10, "start": 1.5, "pgid": 10}}}
    runs.record_process(store.board, t, run_id=run, claim_lock="h:10", worker_pid=11,
                        identity=identity, now=NOW + 1)
    task = queries.get_task(store.board, t)
    assert (task["claim_lock"], task["worker_pid"], task["last_heartbeat_at"]) == ("h:10", 11, NOW + 1)
    board.complete(store.board, t, run_id=run, metadata={"tests": 2}, now=NOW + 2)
    [r] = queries.list_runs(store.board, task_id=t)
    assert r["metadata"] == {**identity, "tests": 2}  # the identity survives the close
    with pytest.raises(StaleRun):
        runs.record_process(store.board, t, run_id=run, claim_lock="h:12", worker_pid=13,
                            identity=identity, now=NOW + 3)


def test_protocol_violations_have_their_own_limit(store):
    t = board.create_task(store.board, "Silent agent", now=NOW)
    for i in range(2):
        run = board.claim(store.board, t, lock="h:1", now=NOW + i).run_id
        change = board.fail(store.board, t, run_id=run, outcome=Outcome.PROTOCOL_VIOLATION,
                            error="exit 0, no report", failure_limit=1, protocol_violation_limit=3,
                            now=NOW + i)
        assert change.to_status == "ready"  # failure_limit=1 does not apply to them
    assert queries.get_task(store.board, t)["consecutive_failures"] == 0
    run = board.claim(store.board, t, lock="h:1", now=NOW + 5).run_id
    change = board.fail(store.board, t, run_id=run, outcome=Outcome.PROTOCOL_VIOLATION,
                        error="exit 0, no report", failure_limit=1, protocol_violation_limit=3,
                        now=NOW + 5)
    assert change.to_status == "blocked"
    gave_up = queries.list_events(store.board, task_id=t, kinds=["gave_up"])[0]["payload"]
    assert gave_up["limit_source"] == "protocol_violation_limit" and gave_up["effective_limit"] == 3
    # booked as Hermes books a violation, so that its streak counts them too
    for r in queries.list_runs(store.board, task_id=t):
        assert (r["status"], r["outcome"]) == ("crashed", "crashed")
        assert r["metadata"]["protocol_violation"] is True and r["metadata"]["exit_code"] == 0
        assert r["error"] == "protocol violation: exit 0, no report"
    assert events_of(store, t)[-3:] == ["protocol_violation", "gave_up", "blocked"]


@pytest.mark.parametrize("between, then", [(Outcome.CRASHED, "ready"), (Outcome.RATE_LIMITED, "blocked")])
def test_a_crash_breaks_the_protocol_violation_streak_and_a_rate_limit_does_not(store, between, then):
    """Hermes' rule: any other run ends the streak, a rate-limited one is neutral."""
    t = board.create_task(store.board, "Mixed", now=NOW)
    outcomes = [Outcome.PROTOCOL_VIOLATION, Outcome.PROTOCOL_VIOLATION, between, Outcome.PROTOCOL_VIOLATION]
    for i, outcome in enumerate(outcomes):
        run = board.claim(store.board, t, lock="h:1", now=NOW + i).run_id
        change = board.fail(store.board, t, run_id=run, outcome=outcome, error="x",
                            failure_limit=5, protocol_violation_limit=3, now=NOW + i)
    assert change.to_status == then


def test_workspace_missing_counts_as_a_failure(store):
    t = board.create_task(store.board, "Lost dir", now=NOW)
    run = board.claim(store.board, t, lock="h:1", now=NOW).run_id
    board.fail(store.board, t, run_id=run, outcome=Outcome.WORKSPACE_MISSING,
               error="workspace /x disappeared", failure_limit=2, now=NOW)
    task = queries.get_task(store.board, t)
    assert task["consecutive_failures"] == 1 and "disappeared" in task["last_failure_error"]
    with pytest.raises(InvalidInput):
        board.fail(store.board, t, run_id=run, outcome=Outcome.COMPLETED, error="", failure_limit=2)
