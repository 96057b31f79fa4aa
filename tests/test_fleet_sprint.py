"""Three hosts on one PostgreSQL board: three real ``jobs_runner.py`` processes with
different host identities and capacities, real shims and the demo agent.

In the middle of the sprint one host dies (its runner, shims and agents killed
with SIGKILL): the other hosts' reclaimers close its runs by their heartbeats and
the tasks run again there. Later the PostgreSQL server itself is restarted: the
runners, shims and agents ride it out. At the end every task is done exactly once
(one completed run each), no host ever had more runs open than its capacity, and
no run is left open.

The scenario lives in ``bench/bench_fleet.py``, whose scale run (2,000 tasks, about
40 minutes on 2 vCPUs) is a benchmark; here it runs with ``SPARKOPS_TEST_FLEET_TASKS``
tasks (default 40, under a minute). Needs a PostgreSQL server this test may restart
(``pg_ctlcluster``, as root): skipped without one, except under CI.
"""

from __future__ import annotations

import os
import sys

import pytest
from conftest import IN_CI, ROOT

sys.path.insert(0, str(ROOT / "bench"))
import bench_fleet  # noqa: E402

TASKS = int(os.environ.get("SPARKOPS_TEST_FLEET_TASKS", "40"))


@pytest.fixture
def cluster():
    found = bench_fleet.pg_cluster()
    if found is None:
        if IN_CI:
            pytest.fail("the fleet test needs a local PostgreSQL it may restart (pg_ctlcluster, as root)")
        pytest.skip("no local PostgreSQL this test may restart (pg_ctlcluster, as root)")
    return found


@pytest.mark.timeout(300 + TASKS * 2)
def test_three_hosts_finish_every_task_once_through_a_dead_host_and_a_database_restart(
        pg_url, cluster, tmp_path):
    result = bench_fleet.run_sprint(TASKS, pg_url, cluster, tmp_path)
    print("\n" + bench_fleet.summary(result))

    assert bench_fleet.violations(result) == []
    # spelled out, the invariants that matter most
    completed = sorted(r.task_id for r in result.runs if r.outcome == "completed")
    assert completed == sorted(result.task_ids), "a task completed twice or not at all"
    assert all(r.ended_at is not None for r in result.runs), "a run was left open"
    assert result.open_on_dead_host, "gb10-a died with no run open"
    assert all(result.peaks[h] <= cap for h, cap in bench_fleet.HOSTS.items())
    assert result.exit_codes == {"gb10-b": 0, "gb10-c": 0}


def test_the_invariant_check_catches_a_task_completed_twice():
    """violations() is what both the test and the benchmark trust: it must fail."""
    Row = type("Row", (), {})

    def row(id_, task_id, outcome, error=None):
        r = Row()
        r.id, r.task_id, r.outcome, r.ended_at, r.claim_lock, r.error = id_, task_id, outcome, 1, "gb10-b:1", error
        return r

    good = bench_fleet.SprintResult(
        task_ids=["t_1", "t_2"],
        runs=[row(1, "t_1", "crashed", "no heartbeat from host gb10-a for 9s"), row(2, "t_1", "completed"),
              row(3, "t_2", "completed")],
        statuses={"done"}, open_on_dead_host=[1], killed=[10, 11], done_at_restart=1,
        peaks={"gb10-a": 2, "gb10-b": 3, "gb10-c": 4}, exit_codes={"gb10-b": 0, "gb10-c": 0},
        elapsed=1.0, utilization=0.9, samples=2)
    assert bench_fleet.violations(good) == []
    good.runs.append(row(4, "t_2", "completed"))
    good.peaks["gb10-c"] = 5
    problems = bench_fleet.violations(good)
    assert "a task completed twice or not at all" in problems
    assert any("open runs per host" in p for p in problems)
