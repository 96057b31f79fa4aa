"""The worker shim as the dispatcher runs it: ``python -m sparkops.engine.shim TASK RUN``, a
real subprocess on a run claimed with :func:`sparkops.board.transitions.claim_next`, with tiny
agents written as ``python -c`` scripts that report through the real CLI.

Each test claims at the real time (the shim measures the max runtime from the
run's start) and polls with a deadline for process events instead of sleeping.
"""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import ROOT, gone, wait_for
from sqlalchemy import select, update

from sparkops.board import model, queries
from sparkops.board import transitions as board
from sparkops.board.model import Outcome, RetryPolicy
from sparkops.core import procs
from sparkops.core.procs import RunIdentity
from sparkops.storage.schema import task_runs, tasks
from sparkops.storage.store import Store

HOST = socket.gethostname()
NO_BACKOFF = RetryPolicy(backoff_seconds=0, backoff_max_seconds=0, rate_limit_cooldown_seconds=0)
SHIM_TIMEOUT = 30.0


def py(*code: str) -> list[str]:
    """An agent argv running ``code`` with the shim's Python. The braces of the code
    are doubled: the argv is a template where ``{name}`` is a placeholder."""
    source = "\n".join(textwrap.dedent(c).strip("\n") for c in code)
    return ["{python}", "-c", source.replace("{", "{{").replace("}", "}}")]


#: Agent code: ``report(*args)`` completes the task through the real CLI.
REPORT = """
    import os, subprocess, sys, time
    def report(*extra):
        return subprocess.run([sys.executable, "-m", "sparkops", "task", "complete",
                               os.environ["SPARKOPS_TASK_ID"], "--run", os.environ["SPARKOPS_RUN_ID"],
                               *extra]).returncode
"""
#: Agent code: wait (at most 60 s) until the test creates ``go`` in the workspace.
WAIT_FOR_GO = """
    deadline = time.monotonic() + 60
    while not os.path.exists("go") and time.monotonic() < deadline:
        time.sleep(0.02)
"""
COMPLETES = py(REPORT, 'print("working on", os.environ["SPARKOPS_TASK_ID"], flush=True)',
               'sys.exit(report("--summary", "all done"))')
SLEEPS = py("import time", 'print("sleeping", flush=True)', "time.sleep(60)")






class Bench:
    """One board, its workspace and log roots, and the shims started on it."""

    def __init__(self, tmp_path: Path, store: Store, board_url: str, ops_url: str):
        self.tmp = tmp_path
        self.db = store.board
        self.workspace_root = tmp_path / "workspaces"
        self.log_root = tmp_path / "logs"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        self.env.update({
            "PYTHONPATH": str(ROOT),
            "SPARKOPS_STORAGE_BOARD_URL": board_url,
            "SPARKOPS_STORAGE_OPS_URL": ops_url,
            "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(self.workspace_root),
            "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(self.log_root),
            "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "0.5",
            "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "2",
        })
        self.started: list[tuple[subprocess.Popen, int]] = []

    def task(self, title: str = "Add a health endpoint", **kwargs: Any) -> str:
        return board.create_task(self.db, title, **kwargs)

    def claim(self, task_id: str, now: float | None = None) -> model.Change:
        change = board.claim_next(self.db, host=HOST, lock=f"{HOST}:{os.getpid()}", capacity=100,
                                  policy=NO_BACKOFF, workspace_root=str(self.workspace_root), now=now)
        assert change is not None and change.task_id == task_id
        return change

    def log_path(self, change: model.Change) -> Path:
        return self.log_root / change.task_id / f"run-{change.run_id}.log"

    def log(self, change: model.Change) -> str:
        path = self.log_path(change)
        return path.read_text(errors="replace") if path.exists() else ""

    def workspace(self, task_id: str) -> Path:
        return self.workspace_root / task_id

    def start(self, change: model.Change, agent: list[str], **env: str) -> subprocess.Popen:
        """Start the shim as the dispatcher does: its own session, output to the run log."""
        full_env = {**self.env, "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(agent), **env}
        path = self.log_path(change)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as out:
            argv = [sys.executable, "-m", "sparkops.engine.shim", change.task_id, str(change.run_id)]
            proc = subprocess.Popen(argv, cwd=self.tmp, env=full_env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, change.run_id))
        return proc

    def run(self, change: model.Change, agent: list[str], **env: str) -> int:
        proc = self.start(change, agent, **env)
        try:
            code = proc.wait(timeout=SHIM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the shim did not end in {SHIM_TIMEOUT}s:\n{self.log(change)}") from None
        assert code == 0, f"shim exited {code}:\n{self.log(change)}"
        return code

    def detail(self, task_id: str) -> dict[str, Any]:
        return queries.task_detail(self.db, task_id)

    def run_row(self, task_id: str, run_id: int) -> dict[str, Any]:
        return next(r for r in self.detail(task_id)["runs"] if r["id"] == run_id)

    def identity(self, task_id: str, run_id: int) -> RunIdentity | None:
        return RunIdentity.from_metadata(self.run_row(task_id, run_id)["metadata"])

    def agent_started(self, change: model.Change) -> RunIdentity:
        """Wait until the shim has recorded the agent's identity."""
        return wait_for(lambda: (ident := self.identity(change.task_id, change.run_id))
                        and ident.agent and ident, "the agent's identity in the run row")

    def cleanup(self) -> None:
        """Stop whatever a failed test left running: agents (their groups), then shims."""
        for proc, run_id in self.started:
            if proc.poll() is not None:
                continue
            with self.db.read() as conn:
                raw = conn.execute(select(task_runs.c.metadata).where(task_runs.c.id == run_id)).scalar()
            ident = RunIdentity.from_metadata(json.loads(raw) if raw else None)
            if ident and ident.agent and procs.group_alive(ident.agent):
                try:
                    os.killpg(ident.agent.pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def bench(tmp_path: Path, sqlite_store: Store, sqlite_settings) -> Iterator[Bench]:
    b = Bench(tmp_path, sqlite_store, sqlite_settings["storage.board_url"],
              sqlite_settings["storage.ops_url"])
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture
def any_bench(tmp_path: Path, store: Store, settings) -> Iterator[Bench]:
    """A bench on SQLite and on PostgreSQL."""
    b = Bench(tmp_path, store, settings["storage.board_url"], settings["storage.ops_url"])
    try:
        yield b
    finally:
        b.cleanup()


def kinds(detail: dict[str, Any]) -> list[str]:
    return [e["kind"] for e in detail["events"]]


# -- a run that works ------------------------------------------------------------------


def test_agent_that_reports_completes_the_task_and_shim_books_nothing_else(any_bench):
    task_id = any_bench.task()
    change = any_bench.claim(task_id)

    any_bench.run(change, COMPLETES)

    detail = any_bench.detail(task_id)
    assert detail["task"]["status"] == "done"
    assert detail["task"]["current_run_id"] is None and detail["task"]["worker_pid"] is None
    assert kinds(detail) == ["created", "claimed", "completed"]
    [run] = detail["runs"]
    assert (run["outcome"], run["summary"], run["error"]) == ("completed", "all done", None)
    assert run["metadata"]["process"]["agent"] is not None  # the identity survives the close
    assert f"working on {task_id}" in any_bench.log(change)


def test_shim_records_identity_writes_task_md_and_sends_output_to_the_run_log(bench):
    task_id = bench.task("Write the parser", body="Parse **all** the things.\nThen test them.")
    change = bench.claim(task_id)
    agent = py(REPORT, 'print("agent up in", os.getcwd(), flush=True)', WAIT_FOR_GO,
               'print("agent done", flush=True)', 'sys.exit(report("--summary", "parsed"))')

    shim = bench.start(change, agent)
    ident = bench.agent_started(change)

    run = bench.run_row(task_id, change.run_id)
    task = bench.detail(task_id)["task"]
    assert ident.host == HOST and ident.boot_id == procs.boot_id()
    assert ident.shim.pid == shim.pid
    assert ident.shim.start == procs.start_of(shim.pid)
    agent = psutil.Process(ident.agent.pid)
    assert agent.ppid() == shim.pid
    assert ident.agent.start == procs.start_of(agent.pid)
    assert ident.agent.pgid == ident.agent.pid != os.getpgid(shim.pid)  # its own process group
    assert run["worker_pid"] == task["worker_pid"] == ident.agent.pid
    assert run["claim_lock"] == task["claim_lock"] == f"{HOST}:{shim.pid}"
    assert run["metadata"]["claimed_by"] == "sparkops"  # the claim's metadata is kept
    workspace = bench.workspace(task_id)
    assert task["workspace_path"] == str(workspace)
    assert (workspace / "TASK.md").read_text() == \
        "# Write the parser\n\nParse **all** the things.\nThen test them.\n"

    (workspace / "go").touch()
    assert shim.wait(timeout=SHIM_TIMEOUT) == 0
    log = bench.log(change)
    assert f"agent up in {workspace}" in log and "agent done" in log
    assert f"Completed {task_id}: running -> done (run {change.run_id})" in log  # the CLI's report
    assert bench.detail(task_id)["task"]["status"] == "done"


def test_placeholders_are_substituted_in_each_argv_element(bench):
    task_id = bench.task()
    change = bench.claim(task_id)
    agent = py(REPORT, 'import json', 'open("argv.json", "w").write(json.dumps(sys.argv[1:]))',
               'sys.exit(report())')
    agent += ["{task_id}", "{run_id}", "{workspace}", "{prompt_file}", "{log_file}", "{python}",
              "--task={task_id}/{run_id}", "{{literal}}"]

    bench.run(change, agent)

    workspace = bench.workspace(task_id)
    assert json.loads((workspace / "argv.json").read_text()) == [
        task_id, str(change.run_id), str(workspace), str(workspace / "TASK.md"),
        str(bench.log_path(change)), sys.executable, f"--task={task_id}/{change.run_id}", "{literal}"]
    assert bench.detail(task_id)["task"]["status"] == "done"


@pytest.mark.parametrize("template, named", [
    (["{python}", "-c", "pass", "--model={model}"], "{model}"),
    (["{python}", "-c", "print('{')"], "print('{')"),  # a lone brace is not a template either
], ids=["unknown", "lone-brace"])
def test_bad_placeholder_is_a_spawn_failure_that_names_it(bench, template, named):
    task_id = bench.task()
    change = bench.claim(task_id)

    bench.run(change, template)

    detail = bench.detail(task_id)
    [run] = detail["runs"]
    assert run["outcome"] == "spawn_failed"
    assert "dispatch.agent_argv" in run["error"] and named in run["error"]
    assert run["metadata"]["process"]["agent"] is None  # nothing was started
    assert detail["task"]["status"] == "ready" and detail["task"]["consecutive_failures"] == 1


def test_task_text_with_shell_metacharacters_is_never_executed(bench):
    pwned = bench.tmp / "pwned"
    title = f"$(touch {pwned}); rm -rf x; `touch {pwned}2`"
    body = f"| touch {pwned}3 && echo $HOME > {pwned}4\n$(id)"
    task_id = bench.task(title, body=body)
    change = bench.claim(task_id)
    # Even an agent that is a shell script gets the text only in a file.
    agent = ["/bin/sh", "-c", 'cat "$SPARKOPS_PROMPT_FILE"; exit 75', "agent", "{prompt_file}", "{task_id}"]

    bench.run(change, agent)

    assert not list(bench.tmp.glob("pwned*"))
    assert (bench.workspace(task_id) / "TASK.md").read_text() == f"# {title}\n\n{body}\n"
    assert title in bench.log(change)  # printed literally by cat
    assert bench.run_row(task_id, change.run_id)["outcome"] == "rate_limited"


def test_agent_environment_has_the_task_and_no_secrets(bench):
    task_id = bench.task()
    change = bench.claim(task_id)
    agent = py(REPORT, "import json", 'open("env.json", "w").write(json.dumps(dict(os.environ)))',
               "sys.exit(report())")

    shim = bench.start(change, agent, SPARKOPS_UI_PASSWORD="hunter2", SPARKOPS_TELEGRAM_TOKEN="123:secret")
    assert shim.wait(timeout=SHIM_TIMEOUT) == 0, bench.log(change)

    workspace = bench.workspace(task_id)
    env = json.loads((workspace / "env.json").read_text())
    assert {k: env.get(k) for k in (
        "SPARKOPS_TASK_ID", "SPARKOPS_RUN_ID", "SPARKOPS_WORKSPACE", "SPARKOPS_PROMPT_FILE",
        "SPARKOPS_LOG_FILE", "HERMES_KANBAN_TASK", "HERMES_KANBAN_RUN_ID", "HERMES_KANBAN_WORKSPACE",
        "HERMES_KANBAN_DB", "HERMES_KANBAN_CLAIM_LOCK", "SPARKOPS_STORAGE_BOARD_URL")} == {
        "SPARKOPS_TASK_ID": task_id, "SPARKOPS_RUN_ID": str(change.run_id),
        "SPARKOPS_WORKSPACE": str(workspace), "SPARKOPS_PROMPT_FILE": str(workspace / "TASK.md"),
        "SPARKOPS_LOG_FILE": str(bench.log_path(change)), "HERMES_KANBAN_TASK": task_id,
        "HERMES_KANBAN_RUN_ID": str(change.run_id), "HERMES_KANBAN_WORKSPACE": str(workspace),
        "HERMES_KANBAN_DB": str(bench.db.path), "HERMES_KANBAN_CLAIM_LOCK": f"{HOST}:{shim.pid}",
        "SPARKOPS_STORAGE_BOARD_URL": bench.env["SPARKOPS_STORAGE_BOARD_URL"],
    }
    assert "SPARKOPS_UI_PASSWORD" not in env and "SPARKOPS_TELEGRAM_TOKEN" not in env
    assert "hunter2" not in json.dumps(env) and "123:secret" not in json.dumps(env)
    assert bench.detail(task_id)["task"]["status"] == "done"


# -- how a run ends (scenario 8) -----------------------------------------------------------


CRASH = py("import sys", 'for i in range(30): print("progress line", i)',
           'print("Traceback: ValueError: the model said no", file=sys.stderr)', "sys.exit(3)")

ENDINGS = {
    # name: (agent, outcome, counted as a failure)
    # booked as Hermes books it: crashed, with metadata.protocol_violation (see the end of the test)
    "exit-0-without-report": (py('print("could not reach the model")'), "crashed", False),
    "exit-75": (py("import sys", 'print("429 Too Many Requests")', "sys.exit(75)"), "rate_limited", False),
    "exit-3": (CRASH, "crashed", True),
    "missing-binary": (["/nonexistent/bin/agent-cli", "--task", "{task_id}"], "spawn_failed", True),
    "workspace-deleted": (py("import os, shutil, sys", 'shutil.rmtree(os.environ["SPARKOPS_WORKSPACE"])',
                             "sys.exit(1)"), "workspace_missing", True),
}


@pytest.mark.parametrize("ending", list(ENDINGS))
def test_each_ending_is_booked_as_its_own_outcome_and_the_task_is_requeued(bench, ending):
    agent, outcome, counted = ENDINGS[ending]
    task_id = bench.task()
    change = bench.claim(task_id)

    bench.run(change, agent)

    detail = bench.detail(task_id)
    task = detail["task"]
    [run] = detail["runs"]
    assert (run["status"], run["outcome"]) == (outcome, outcome)
    assert run["ended_at"] is not None and run["worker_pid"] is None
    assert kinds(detail) == ["created", "claimed",
                             "protocol_violation" if ending == "exit-0-without-report" else outcome]
    # never lost: back to ready, unclaimed, and claimable again
    assert task["status"] == "ready"
    assert (task["current_run_id"], task["claim_lock"], task["worker_pid"]) == (None, None, None)
    assert task["consecutive_failures"] == (1 if counted else 0)
    if outcome == "rate_limited":
        assert task["last_failure_error"] is None
    else:
        assert task["last_failure_error"] == run["error"]
    again = board.claim_next(bench.db, host=HOST, lock="h:1", capacity=100, now=time.time() + 10_000)
    assert again is not None and again.task_id == task_id

    error = run["error"]
    if ending == "exit-0-without-report":
        assert f"sparkops task complete {task_id} --run {change.run_id}" in error
        assert error.startswith("protocol violation: ") and run["metadata"]["protocol_violation"] is True
    elif ending == "exit-75":
        assert "exited 75" in error
    elif ending == "exit-3":
        assert error.startswith("agent exit 3: ")
        assert "progress line 29" in error and "Traceback: ValueError: the model said no" in error
    elif ending == "missing-binary":
        assert "/nonexistent/bin/agent-cli" in error and "No such file" in error
    else:
        assert f"workspace {bench.workspace(task_id)} disappeared" in error and "exit 1" in error


def test_deleted_workspace_is_recreated_for_the_next_run(bench):
    task_id = bench.task("Rebuild", body="from scratch")
    first = bench.claim(task_id)
    bench.run(first, ENDINGS["workspace-deleted"][0])
    assert not bench.workspace(task_id).exists()

    second = bench.claim(task_id)
    bench.run(second, COMPLETES)

    assert (bench.workspace(task_id) / "TASK.md").read_text() == "# Rebuild\n\nfrom scratch\n"
    detail = bench.detail(task_id)
    assert [r["outcome"] for r in detail["runs"]] == ["workspace_missing", "completed"]
    assert detail["task"]["status"] == "done" and detail["task"]["consecutive_failures"] == 0


def test_failures_up_to_the_failure_limit_block_the_task(bench):
    task_id = bench.task()
    for attempt in (1, 2):
        change = bench.claim(task_id)
        bench.run(change, CRASH, SPARKOPS_DISPATCH_FAILURE_LIMIT="2")
        task = bench.detail(task_id)["task"]
        assert task["consecutive_failures"] == attempt
        assert task["status"] == ("ready" if attempt == 1 else "blocked")

    detail = bench.detail(task_id)
    assert kinds(detail) == ["created", "claimed", "crashed", "claimed", "crashed", "gave_up", "blocked"]
    gave_up = detail["events"][-2]["payload"]
    assert (gave_up["failures"], gave_up["effective_limit"], gave_up["trigger_outcome"]) == (2, 2, "crashed")
    assert "the model said no" in detail["task"]["last_failure_error"]
    assert board.claim_next(bench.db, host=HOST, lock="h:1", capacity=100, now=time.time() + 10_000) is None


def test_protocol_violations_in_a_row_block_the_task_without_counting_failures(bench):
    task_id = bench.task()
    for _ in (1, 2):
        change = bench.claim(task_id)
        bench.run(change, ENDINGS["exit-0-without-report"][0], SPARKOPS_DISPATCH_PROTOCOL_VIOLATION_LIMIT="2")

    detail = bench.detail(task_id)
    assert detail["task"]["status"] == "blocked"
    assert detail["task"]["consecutive_failures"] == 0
    assert kinds(detail)[-3:] == ["protocol_violation", "gave_up", "blocked"]
    gave_up = detail["events"][-2]["payload"]
    assert (gave_up["trigger_outcome"], gave_up["limit_source"], gave_up["effective_limit"]) == \
        ("protocol_violation", "protocol_violation_limit", 2)


# -- supervision ---------------------------------------------------------------------------


def test_max_runtime_kills_the_agents_process_group_and_books_timed_out(bench):
    task_id = bench.task(max_runtime_seconds=2)
    # The run's start is whole seconds; claiming at the next whole second gives the
    # shim and its agent at least the full two seconds before the deadline.
    change = bench.claim(task_id, now=math.ceil(time.time()))
    agent = py("import signal, subprocess, time",
               "signal.signal(signal.SIGTERM, signal.SIG_IGN)",  # so SIGKILL is needed
               'child = subprocess.Popen(["sleep", "60"])',      # inherits the ignored SIGTERM
               'open("child.pid", "w").write(str(child.pid))',
               'print("sleeping", flush=True)', "time.sleep(60)")

    started = time.monotonic()
    bench.run(change, agent, SPARKOPS_RECLAIM_TERM_GRACE_SECONDS="0.5")

    assert time.monotonic() - started < 10
    run = bench.run_row(task_id, change.run_id)
    assert run["outcome"] == "timed_out"
    assert run["error"].startswith("ran longer than its max runtime of 2s; ")
    assert "killed (SIGKILL after 0.5s)" in run["error"]
    ident = bench.identity(task_id, change.run_id)
    child = int((bench.workspace(task_id) / "child.pid").read_text())
    wait_for(lambda: gone(ident.agent.pid) and gone(child), "the agent and its child to be gone", 5)
    assert not procs.group_alive(ident.agent)
    task = bench.detail(task_id)["task"]
    assert task["status"] == "ready" and task["consecutive_failures"] == 1


def test_shim_heartbeats_while_the_agent_runs(bench):
    task_id = bench.task()
    change = bench.claim(task_id)
    shim = bench.start(change, py(REPORT, WAIT_FOR_GO, "sys.exit(report())"))
    bench.agent_started(change)
    # Backdate the heartbeat instead of waiting for it to age.
    with bench.db.write() as conn:
        conn.execute(update(task_runs).where(task_runs.c.id == change.run_id).values(last_heartbeat_at=100))
        conn.execute(update(tasks).where(tasks.c.id == task_id).values(last_heartbeat_at=100))

    def beaten() -> bool:
        detail = bench.detail(task_id)
        run = next(r for r in detail["runs"] if r["id"] == change.run_id)
        return run["last_heartbeat_at"] > 100 and detail["task"]["last_heartbeat_at"] > 100

    before = int(time.time())
    wait_for(beaten, "a heartbeat (heartbeat_seconds = 0.5)", timeout=5)
    assert bench.run_row(task_id, change.run_id)["last_heartbeat_at"] >= before
    (bench.workspace(task_id) / "go").touch()
    assert shim.wait(timeout=SHIM_TIMEOUT) == 0
    assert bench.detail(task_id)["task"]["status"] == "done"


@pytest.mark.parametrize("how", ["reclaim", "fail"])
def test_run_closed_while_the_agent_works_stops_the_agent_and_books_nothing_more(bench, how):
    task_id = bench.task()
    change = bench.claim(task_id)
    shim = bench.start(change, SLEEPS)
    ident = bench.agent_started(change)

    if how == "reclaim":
        board.reclaim(bench.db, task_id, run_id=change.run_id, reason="operator took it back")
    else:
        board.fail(bench.db, task_id, run_id=change.run_id, outcome=Outcome.CRASHED,
                   error="declared dead by the test", failure_limit=5)
    events_after_close = kinds(bench.detail(task_id))

    try:
        code = shim.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("the shim kept running after its run was closed:\n"
                             + bench.log(change)) from None
    assert code == 0
    wait_for(lambda: gone(ident.agent.pid), "the agent to be stopped", 5)
    assert not procs.group_alive(ident.agent)
    detail = bench.detail(task_id)
    assert kinds(detail) == events_after_close  # the shim booked nothing
    [run] = detail["runs"]
    assert run["outcome"] == ("reclaimed" if how == "reclaim" else "crashed")
    assert detail["task"]["status"] == "ready"
    closed = "closed as reclaimed" if how == "reclaim" else "closed as crashed"
    assert f"run {change.run_id} was {closed} while its agent worked; stopping the agent" in bench.log(change)


def test_run_closed_before_the_shim_starts_changes_nothing(bench):
    task_id = bench.task()
    change = bench.claim(task_id)
    board.reclaim(bench.db, task_id, run_id=change.run_id, reason="dispatcher died mid-dispatch")
    before = bench.detail(task_id)

    bench.run(change, COMPLETES)

    assert bench.detail(task_id) == before
    assert not bench.workspace(task_id).exists()  # nothing was prepared, nothing started
    assert "no longer current" in bench.log(change)


# -- the agent's report handed to its shim ------------------------------------------------

def report_in_process(*, shim_gone: bool) -> list[str]:
    """Agent code: report through ``python -m sparkops`` in this very process (as the
    CLI would start), then note the report's output and whether SQLAlchemy was
    imported. ``shim_gone``: the report finds no shim to hand the report to."""
    return py(f"""
    import contextlib, io, json, os, runpy, sys
    if {shim_gone}:
        del os.environ["SPARKOPS_REPORT_SOCKET"]
    sys.argv = ["sparkops", "task", "complete", os.environ["SPARKOPS_TASK_ID"], "--result", "shipped"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            runpy.run_module("sparkops", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    with open("report.json", "w") as fh:
        json.dump({{"code": code, "out": out.getvalue(), "pid": os.getpid(),
                   "sqlalchemy": "sqlalchemy" in sys.modules}}, fh)
""")


@pytest.mark.parametrize("shim_gone", [False, True], ids=["through-the-shim", "shim-gone"])
def test_a_report_through_the_shim_is_the_direct_report_without_the_database_layer(any_bench, shim_gone):
    """The agent's report is made by its shim (the report process imports no
    SQLAlchemy); with no shim to hand it to, the process makes it itself: the same
    board, the same output, the same reporter."""
    task_id = any_bench.task()
    change = any_bench.claim(task_id)

    any_bench.run(change, report_in_process(shim_gone=shim_gone))

    said = json.loads((any_bench.workspace(task_id) / "report.json").read_text())
    assert said["code"] == 0 and said["out"] == f"Completed {task_id}: running -> done (run {change.run_id})\n"
    assert said["sqlalchemy"] is shim_gone
    detail = any_bench.detail(task_id)
    assert detail["task"]["status"] == "done" and detail["task"]["result"] == "shipped"
    assert kinds(detail) == ["created", "claimed", "completed"]
    [run] = detail["runs"]
    assert run["outcome"] == "completed" and run["ended_at"] is not None
    assert run["metadata"]["reporter"]["pid"] == said["pid"]  # the report process, not the shim
    assert len(run["metadata"]["reporter"]["token"]) == 16
    assert ("the agent reported" in any_bench.log(change)) is not shim_gone
