"""A hostile box: rows written by other programs, strangers' processes, bad luck.

Each case reproduces what was found on this machine and shows it now holds: no
process outside the test's own is signalled, nothing is lost, and the runner goes
on. Real processes, real SQLite files, scratch directories.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, gone, make_settings, run_cli, wait_for

from sparkops.board import queries, runs
from sparkops.board import transitions as board
from sparkops.core import procs
from sparkops.core.procs import Proc, RunIdentity
from sparkops.engine import workers
from sparkops.storage.store import open_store


@pytest.fixture
def strangers():
    """Processes that are not SparkOps': each in a session of its own (``setsid``),
    as a daemon would be. Checked alive at the end of each test that uses them."""
    started: list[subprocess.Popen] = []

    def start(code: str = "import time; time.sleep(600)") -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture
def box(tmp_path: Path):
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    settings = make_settings(tmp_path)
    store = open_store(settings, create=True)
    yield store, settings, env
    store.dispose()


def dead_pid() -> Proc:
    proc = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    recorded = procs.describe(proc.pid) or Proc(proc.pid, time.time(), proc.pid, proc.pid)
    proc.wait()
    return recorded


def running_with_identity(store, identity: RunIdentity) -> tuple[str, int]:
    task_id = board.create_task(store.board, "forged")
    change = board.claim(store.board, task_id, lock=f"{identity.host}:{identity.shim.pid if identity.shim else 1}")
    runs.record_process(store.board, task_id, run_id=change.run_id, claim_lock=f"{identity.host}:1",
                        worker_pid=identity.agent.pid if identity.agent else None,
                        identity={"process": identity.as_dict()})
    return task_id, change.run_id


# -- signals only to what is provably ours --------------------------------------------------------


@pytest.mark.parametrize("forged_sid", [False, True], ids=["no session", "the stranger's session"])
def test_a_row_naming_a_strangers_process_group_never_gets_it_signalled(box, strangers, forged_sid):
    """A running task whose run names a dead agent pid with the process group of an
    unrelated ``setsid sleep``: the reclaimer closes the run and signals nothing."""
    store, settings, env = box
    stranger = strangers()
    agent = dead_pid()
    forged = Proc(agent.pid, agent.start, pgid=stranger.pid, sid=stranger.pid if forged_sid else None)
    host = procs.host_name(settings["host.name"])
    task_id, run_id = running_with_identity(store, RunIdentity(host, procs.boot_id(), shim=dead_pid(),
                                                               agent=forged))

    result = run_cli("reclaim", cwd=store_dir(settings), env=env)

    assert result.returncode == 0, result.stderr
    time.sleep(0.3)
    assert stranger.poll() is None, "a stranger was signalled"
    [run] = queries.task_detail(store.board, task_id)["runs"]
    assert run["ended_at"] is not None and run["outcome"] == "crashed"
    if forged_sid:  # the group looks alive: the reclaimer would stop it, but has no record of its own
        assert workers.directory(settings).joinpath(f"{run_id}.json").exists() is False
        assert "not signalled: this host has no record of starting run" in run["error"]
    assert "ended after SIGTERM" not in result.stdout and "killed" not in result.stdout


def test_a_reused_agent_pid_leading_a_daemon_never_gets_the_daemon_killed(box, strangers):
    """PID reuse without forging: the agent's number now leads a double-forked
    daemon's group in another session. Even this host's own record (the registry)
    names only the old process: the daemon's child is not a leftover of ours."""
    store, settings, env = box
    daemon = strangers("import os, sys, time\n"
                       "if os.fork(): sys.exit(0)\n"  # the leader goes; its child keeps group and session
                       "print(os.getpid(), flush=True); time.sleep(600)")
    child = int(daemon.stdout.readline())
    daemon.wait()
    leader = daemon.pid  # its pgid and sid; the "agent" number we recorded
    shim = dead_pid()
    recorded = Proc(leader, time.time() - 3600, pgid=leader, sid=shim.pid)  # started an hour ago, in the shim's session
    host = procs.host_name(settings["host.name"])
    identity = RunIdentity(host, procs.boot_id(), shim=shim, agent=recorded)
    task_id, run_id = running_with_identity(store, identity)
    workers.register(workers.directory(settings), task_id, run_id, identity)

    assert not procs.group_alive(recorded)
    result = run_cli("reclaim", cwd=store_dir(settings), env=env)

    assert result.returncode == 0, result.stderr
    time.sleep(0.3)
    assert not gone(child), "the daemon's child was killed as a leftover"
    [run] = queries.task_detail(store.board, task_id)["runs"]
    assert run["outcome"] == "crashed" and "no longer running" in run["error"]
    os.kill(child, signal.SIGKILL)


def store_dir(settings) -> Path:
    return Path(settings.base_dir)


# -- ids are data ------------------------------------------------------------------------------------

HOSTILE_IDS = {
    "parent path": "../../../evilA",
    "absolute path": "/tmp/sparkops-evil-{tag}",
    "newline and spaces": "t_00000001 1 /tmp/sparkops-evil-{tag}.log\nt_00000001",
    "NUL": "t_0000\x00evil",
    "backtick": "t_`![x](http://127.0.0.1:9/pixel.png)`",
}


def insert_ready(board_file: Path, task_id: str, title: str) -> None:
    """A ready task as another tool would write it."""
    conn = sqlite3.connect(board_file)
    with conn:
        conn.execute("INSERT INTO tasks (id, title, status, priority, created_at, workspace_kind) "
                     "VALUES (?, ?, 'ready', 5, ?, 'scratch')", (task_id, title, int(time.time())))
    conn.close()


def test_hostile_ids_never_become_paths_or_arguments_and_the_tick_goes_on(tmp_path: Path, monkeypatch):
    from sparkops.config import load_settings
    from sparkops.engine.dispatch import ShimTracker
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job

    tag = os.urandom(4).hex()
    env = {"SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", "-m", "sparkops", "demo-agent",
                                                       "--min-seconds", "0", "--max-seconds", "0.2"]),
           "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": "2",
           "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    for name in [n for n in os.environ if n.startswith("SPARKOPS_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():  # the shims read their settings from the environment
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    settings = load_settings(cwd=tmp_path)
    store = open_store(settings, create=True)
    tracker = ShimTracker()
    ctx = JobContext.create(settings, store, shims=tracker)
    try:
        ids = {name: raw.format(tag=tag) for name, raw in HOSTILE_IDS.items()}
        for name, task_id in ids.items():
            insert_ready(tmp_path / "data" / "kanban.db", task_id, f"hostile: {name}")
        good = board.create_task(store.board, "a good task", body="Write a haiku about queues.")

        first = run_job(ctx, "dispatch")
        assert first.ok, first.error
        wait_for(lambda: run_job(ctx, "dispatch") and queries.get_task(store.board, good)["status"] == "done",
                 "the good task to be done", timeout=60)

        for name, task_id in ids.items():
            detail = queries.task_detail(store.board, task_id)
            assert detail["task"]["status"] == "blocked", name
            assert detail["runs"] == [] or all(r["outcome"] == "blocked" for r in detail["runs"]), name
            assert "is not a plain id" in queries.list_events(store.board, task_id=task_id,
                                                              kinds=["blocked"])[0]["payload"]["reason"]
        # nothing was written outside the data directory
        assert not Path(f"/tmp/sparkops-evil-{tag}").exists() and not Path(f"/tmp/sparkops-evil-{tag}.log").exists()
        assert not (tmp_path.parent.parent / "evilA").exists()
        assert {p.name for p in (tmp_path / "data" / "workspaces").iterdir()} == {good}
        assert {p.name for p in (tmp_path / "data" / "logs" / "runs").iterdir()} == {good}
    finally:
        tracker.stop_standby()
        store.dispose()


def test_a_forged_handover_record_starts_nothing(tmp_path: Path):
    """The forkserver reads one JSON record a line; a line in the old "ID RUN LOG" form,
    or a record whose id is not plain, is refused: nothing is run, nothing appended
    (the forkserver's own refusal on a real process is in test_forkserver.py)."""
    from sparkops.engine import shim

    for line in ("t_00000001 1 /tmp/x.log\n", json.dumps({"task_id": "../x", "run_id": 1, "log": "/tmp/x"}) + "\n",
                 json.dumps({"task_id": "t_00000001", "run_id": "1; rm", "log": "/tmp/x"}) + "\n"):
        with pytest.raises(Exception, match="hand-over record"):
            shim.parse_assignment(line)
    ok = json.dumps({"task_id": "t_00000001", "run_id": 3, "log": str(tmp_path / "r.log")}) + "\n"
    assert shim.parse_assignment(ok) == ("t_00000001", 3, tmp_path / "r.log")


def test_the_board_page_shows_a_backtick_id_as_text(app_env):
    from conftest import run_page

    store = open_store(make_settings(app_env), create=True)
    store.dispose()
    evil = HOSTILE_IDS["backtick"]
    insert_ready(app_env / "data" / "kanban.db", evil, "![pixel](http://127.0.0.1:9/title.png)")
    at = run_page("pages/1_Board.py")
    assert not at.exception
    [card] = [m.value for m in at.markdown if "pixel" in m.value]
    assert "![" not in card.replace("\\!", "").replace("\\[", "")  # every ! and [ escaped
    assert "`t_`" not in card


# -- faults never wedge, stall or mislabel ----------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MB tmpfs (as root; CI runs as root): a disk that can fill up."""
    from conftest import IN_CI

    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        if IN_CI:
            pytest.fail(f"cannot mount a tmpfs for the full-disk tests: {done.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """Fill the disk up to the last byte with one file; returns it (delete it to free)."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 20, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return filler


def runner_env(data: Path, log_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{data}/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{data}/sparkops.db",
        "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", "-m", "sparkops", "demo-agent",
                                                    "--min-seconds", "0", "--max-seconds", "0.2"]),
        "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(data / "workspaces"),
        "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(data / "logs" / "runs"),
        "SPARKOPS_RUNNER_LOG_FILE": str(log_dir / "runner.log"),  # off the small disk, to read it
        "SPARKOPS_SERVICES": json.dumps({n: {"enabled": False} for n in ("vllm", "gateway", "redis", "tunnel")}),
        "SPARKOPS_EXPORT_INTERVAL_SECONDS": "3600", "SPARKOPS_REVIEW_INTERVAL_SECONDS": "3600",
        **extra,
    })
    return env


def integrity_ok(path: Path) -> bool:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def test_a_full_disk_never_wedges_the_runner_and_is_said_as_such(small_disk: Path, tmp_path: Path):
    data = small_disk / "data"
    env = runner_env(data, tmp_path, SPARKOPS_EXPORT_DIR=str(small_disk / "exports"))
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    first = run_cli("task", "create", "before the disk fills", "--json", cwd=tmp_path, env=env)
    first_id = json.loads(first.stdout)["id"]
    runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log_file = tmp_path / "runner.log"
    try:
        def status(task_id: str) -> str:
            shown = run_cli("task", "show", task_id, "--json", cwd=tmp_path, env=env)
            return json.loads(shown.stdout)["task"]["status"] if shown.returncode == 0 else "?"

        wait_for(lambda: status(first_id) == "done", "the first task to be done", timeout=60, proc=runner)
        assert run_cli("export", cwd=tmp_path, env=env).returncode == 0
        exports = {p.name: p.read_bytes() for p in (small_disk / "exports").iterdir()}
        filler = fill(small_disk)

        assert run_cli("export", cwd=tmp_path, env=env).returncode != 0  # cannot write a new one
        assert {p.name: p.read_bytes() for p in (small_disk / "exports").iterdir()} == exports  # the last one intact
        refused = run_cli("task", "create", "while the disk is full", cwd=tmp_path, env=env)
        assert refused.returncode != 0
        assert "is full" in refused.stderr and "damaged" not in refused.stderr, refused.stderr
        wait_for(lambda: "the disk is full" in log_file.read_text(), "the runner to say the disk is full",
                 timeout=60, proc=runner)

        filler.unlink()
        later = run_cli("task", "create", "after space returned", "--json", cwd=tmp_path, env=env)
        assert later.returncode == 0, later.stderr
        later_id = json.loads(later.stdout)["id"]
        wait_for(lambda: status(later_id) == "done", "the runner to work again by itself", timeout=60,
                 proc=runner)
        text = log_file.read_text()
        assert text.count("the disk is full: jobs cannot write") == 1  # said once
        assert "the disk has space again" in text
        assert "already running" not in text  # no job stayed locked
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=30)
    for db in ("kanban.db", "sparkops.db"):
        assert integrity_ok(data / db)


def test_the_disk_job_frees_space_while_the_databases_cannot_be_written(small_disk: Path, tmp_path: Path):
    data = small_disk / "data"
    logs = small_disk / "logs"
    env = runner_env(data, tmp_path, SPARKOPS_DISK_PATHS=json.dumps([str(small_disk)]),
                     SPARKOPS_DISK_LOG_ROOTS=json.dumps([str(logs)]))
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    logs.mkdir()
    old = time.time() - 30 * 86400
    for n in range(4):
        path = logs / f"agent-{n}.log"
        path.write_bytes(b"x" * 1_000_000)
        os.utime(path, (old, old))
    fill(small_disk)

    result = run_cli("disk", cwd=tmp_path, env=env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert not list(logs.iterdir()), "the old logs are still there"
    free = os.statvfs(small_disk)
    assert free.f_bavail * free.f_frsize >= 3_000_000
    for db in ("kanban.db", "sparkops.db"):
        assert integrity_ok(data / db)


def test_a_workers_report_rides_out_a_locked_database(box, tmp_path):
    """Another process holds SQLite's write lock longer than busy_timeout: the
    worker's ``task complete --run`` waits and retries (storage.retry_seconds) instead
    of failing, so finished work is never booked as a crash."""
    store, settings, env = box
    task_id = board.create_task(store.board, "finished work")
    change = board.claim(store.board, task_id, lock="h:1")
    holder = sqlite3.connect(tmp_path / "data" / "kanban.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # the write lock, as a long writer would hold it
    try:
        report = subprocess.Popen(
            [sys.executable, "-m", "sparkops", "task", "complete", task_id, "--run", str(change.run_id),
             "--result", "done"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**{k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}, **env,
                 "PYTHONPATH": str(ROOT), "SPARKOPS_STORAGE_BUSY_TIMEOUT_MS": "300",
                 "SPARKOPS_STORAGE_RETRY_SECONDS": "30"})
        time.sleep(3)  # ten busy timeouts
        assert report.poll() is None, report.communicate()
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    out, err = report.communicate(timeout=60)
    assert report.returncode == 0, err
    assert "locked by another writer" in err
    assert queries.get_task(store.board, task_id)["status"] == "done"


class Trickle:
    """A vLLM stand-in on loopback whose /metrics sends one byte a second (forever),
    while /health answers at once."""

    def __init__(self):
        import http.server
        import threading

        stop = self.stop = threading.Event()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server name
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                if self.path != "/metrics":
                    self.wfile.write(b"{}")
                    return
                while not stop.is_set():
                    try:
                        self.wfile.write(b"#")
                        self.wfile.flush()
                    except OSError:
                        return
                    stop.wait(1)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def trickle():
    server = Trickle()
    yield server
    server.close()


def test_a_service_that_trickles_its_answer_is_checked_within_its_deadline(trickle):
    from sparkops.config import ServiceSpec
    from sparkops.watch import services

    spec = ServiceSpec(name="vllm", check="vllm", url=trickle.url, expect_status=200, host="", port=0,
                       pattern="", timeout_seconds=2, restart_argv=(), start_grace_seconds=0,
                       failures_before_restart=1, restart_limit=1, restart_window_minutes=1, enabled=True)
    started = time.monotonic()
    result = services.check(spec)
    assert time.monotonic() - started <= 2 * services.DEADLINE_TIMEOUTS + 1 + 0.5
    assert result is not None  # an answer, whatever it says, within the deadline


def test_a_slow_service_never_holds_up_dispatch(trickle, tmp_path: Path):
    """Found on this machine: one watchdog pass on a trickling /metrics took 57 s, and
    six one-second tasks took 90 s. The watchdog runs beside dispatch now."""
    data = tmp_path / "data"
    env = runner_env(data, tmp_path, SPARKOPS_DISPATCH_MAX_IN_PROGRESS="2",
                     SPARKOPS_WATCHDOG_INTERVAL_SECONDS="1",
                     SPARKOPS_DISPATCH_AGENT_ARGV=json.dumps(["{python}", "-m", "sparkops", "demo-agent",
                                                              "--min-seconds", "1", "--max-seconds", "1"]),
                     SPARKOPS_SERVICES=json.dumps({"vllm": {"url": trickle.url, "timeout_seconds": 20},
                                                   **{n: {"enabled": False} for n in ("gateway", "redis", "tunnel")}}))
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(3)  # the watchdog is now stuck in its first pass (its deadline is 61 s)
        started = time.monotonic()
        ids = [json.loads(run_cli("task", "create", f"one second {n}", "--json", cwd=tmp_path, env=env).stdout)["id"]
               for n in range(6)]

        def all_done() -> bool:
            out = run_cli("task", "list", "--json", cwd=tmp_path, env=env)
            return {t["id"] for t in json.loads(out.stdout) if t["status"] == "done"} >= set(ids)

        wait_for(all_done, "six one-second tasks", timeout=60, proc=runner)
        assert time.monotonic() - started < 30  # two slots: about 3 s of work, plus starts
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=90)  # it waits for the watchdog pass in progress


# -- odd values from another writer -----------------------------------------------------------------


def write_odd_rows(board_file: Path, done_id: str) -> dict[str, str]:
    """What another tool's bugs (or an attacker) put into SQLite's untyped columns."""
    now = int(time.time())
    conn = sqlite3.connect(board_file)
    ids = {"text times": "t_0dd00001", "formula priority": "t_0dd00002", "garbage numbers": "t_0dd00003"}
    with conn:
        conn.execute("INSERT INTO tasks (id, title, status, priority, created_at, workspace_kind) "
                     "VALUES (?, 'iso times', 'ready', 1, '2026-12-01T10:00:00Z', 'scratch')", (ids["text times"],))
        conn.execute("INSERT INTO tasks (id, title, status, priority, created_at, workspace_kind) "
                     "VALUES (?, '=HYPERLINK(\"http://127.0.0.1:9\",\"x\")', 'ready', '=1+2', ?, 'scratch')",
                     (ids["formula priority"], now))
        conn.execute("INSERT INTO tasks (id, title, status, priority, created_at, workspace_kind, "
                     "max_runtime_seconds, consecutive_failures) VALUES (?, '@SUM(1)', 'blocked', 'high', "
                     "'yesterday', 'scratch', 'long', 'many')", (ids["garbage numbers"],))
        conn.execute("INSERT INTO task_runs (task_id, status, started_at, ended_at, outcome, worker_pid) "
                     "VALUES (?, 'done', '2026-12-01T09:00:00Z', '2026-12-01T10:00:00Z', 'completed', '=1+2')",
                     (done_id,))
        conn.execute("INSERT INTO task_events (task_id, kind, payload, created_at) "
                     "VALUES (?, 'commented', '{not json', 'noon')", (done_id,))
    conn.close()
    return ids


def test_odd_values_in_integer_columns_stop_nothing_and_reach_no_csv_raw(tmp_path: Path, monkeypatch, app_env):
    from sparkops.config import load_settings
    from sparkops.engine.dispatch import ShimTracker
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job
    from sparkops.sprint import measure

    settings = load_settings(cwd=app_env)
    store = open_store(settings, create=True)
    try:
        done = board.create_task(store.board, "finished before")
        odd = write_odd_rows(app_env / "data" / "kanban.db", done)
        good = board.create_task(store.board, "a good task")
        ctx = JobContext.create(settings, store, shims=ShimTracker())

        for job in ("dispatch", "reclaim", "promote", "export", "review"):
            result = run_job(ctx, job)
            assert result.ok, (job, result.error)
        assert queries.get_task(store.board, odd["text times"])["created_at"] == 1796119200  # read as a time
        assert queries.get_task(store.board, odd["garbage numbers"])["priority"] is None
        m = measure.compute(store.board, now=time.time(), window_hours=24)
        assert m.counts is not None
        # every exported cell that a spreadsheet would run is escaped
        export_dir = Path(settings["export.dir"])
        for name in ("tasks.csv", "runs.csv", "events.csv"):
            for line in (export_dir / name).read_text().splitlines():
                for cell in line.split(","):
                    assert not cell.strip('"').startswith(("=", "+", "@")), (name, line)
        assert good in (export_dir / "tasks.csv").read_text()
    finally:
        ctx.shims.stop_standby()
        store.dispose()

    from conftest import run_page
    for page in ("pages/1_Board.py", "pages/2_Runs.py", "pages/4_Sprint_review.py", "pages/7_Events.py", "Home.py"):
        at = run_page(page)
        assert not at.exception, (page, [e.value for e in at.exception])


# -- secrets stay in -----------------------------------------------------------------------------------

SECRETS = {"SPARKOPS_UI_PASSWORD": "ui-hunter2", "SPARKOPS_TELEGRAM_TOKEN": "123:tg-secret",
           "SPARKOPS_TELEGRAM_CHAT_ID": "chat-4242", "SPARKOPS_VLLM_API_KEY": "vllm-key-77",
           "SPARKOPS_ALERTS_WEBHOOK_URL": "http://127.0.0.1:9/hook/tok-webhook-99"}


def test_agents_and_restart_commands_get_an_allowlisted_environment(tmp_path: Path, monkeypatch):
    from sparkops.config import load_settings
    from sparkops.engine.environment import shim_environment
    from sparkops.watch import services

    for name, value in {**SECRETS, "SOME_OTHER_TOKEN": "other-1", "MY_AGENT_KEY": "agent-key-5"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("SPARKOPS_DISPATCH_AGENT_ENV_PASS", json.dumps(["MY_AGENT_KEY"]))
    settings = load_settings(cwd=tmp_path)

    agent_env = shim_environment(settings)
    assert not set(SECRETS) & set(agent_env) and "SOME_OTHER_TOKEN" not in agent_env
    assert agent_env["MY_AGENT_KEY"] == "agent-key-5" and agent_env["PATH"] == os.environ["PATH"]

    dump = tmp_path / "restart-env.json"
    spec = next(s for s in settings.services if s.name == "gateway")
    spec = spec.__class__(**{**spec.__dict__, "restart_argv": (
        sys.executable, "-c", f"import json, os; open({str(dump)!r}, 'w').write(json.dumps(dict(os.environ)))")})
    services.restart(spec, settings).wait(timeout=30)
    restart_env = json.loads(dump.read_text())
    assert not [v for v in restart_env.values() if any(s in v for s in SECRETS.values())]
    assert "MY_AGENT_KEY" not in restart_env  # the agent's own key is the agent's alone


def test_the_config_command_and_a_broken_webhook_never_show_the_token(tmp_path: Path, monkeypatch):
    from sparkops.config import load_secrets, load_settings
    from sparkops.jobs.framework import JobContext
    from sparkops.watch import alerts

    env = {"SPARKOPS_ALERTS_WEBHOOK_URL": "http://127.0.0.1:9/hook/tok-webhook-99"}
    shown = run_cli("config", cwd=tmp_path, env=env)
    assert shown.returncode == 0 and "tok-webhook-99" not in shown.stdout
    assert "http://127.0.0.1:9/..." in shown.stdout

    # valid as a URL, refused by urllib when posting: its error text quotes the path
    monkeypatch.setenv("SPARKOPS_ALERTS_WEBHOOK_URL", "http://127.0.0.1:9/hook/tok webhook 99")
    settings = load_settings(cwd=tmp_path)
    store = open_store(settings, create=True)
    try:
        record = alerts.notify(JobContext.create(settings, store, secrets=load_secrets()),
                               alerts.Alert("test:key", "error", "a title", "a message"))
        text = json.dumps(record.channels) + json.dumps(alerts.recent(store.ops))
        assert "tok" not in text and "webhook 99" not in text, text
        assert record.channels["webhook"].startswith("failed")
    finally:
        store.dispose()


@pytest.mark.parametrize("env, expected", [
    ({"SPARKOPS_WATCHDOG_INTERVAL_SECONDS": "1e300"}, "watchdog.interval_seconds must be at most"),
    ({"SPARKOPS_ALERTS_COOLDOWN_MINUTES": "1e307"}, "alerts.cooldown_minutes must be at most"),
    ({"SPARKOPS_DISK_LOG_ROOTS": "[]"}, "disk.log_roots is empty"),
    ({"SPARKOPS_GPU_KILL_PATTERNS": '[""]'}, "would match every process"),
    ({"SPARKOPS_GPU_KILL_PATTERNS": '[".*"]'}, "would match every process"),
    ({"SPARKOPS_ALERTS_WEBHOOK_URL": "ftp://x/tok-secret-1"}, "ftp://x/..."),
])
def test_settings_that_would_crash_or_match_everything_later_are_refused_at_once(tmp_path, env, expected):
    result = run_cli("config", cwd=tmp_path, env=env)
    assert result.returncode == 2 and expected in result.stderr, result.stderr
    assert "tok-secret-1" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_text_and_a_closed_pipe_are_one_line_not_a_traceback(box, tmp_path):
    store, settings, env = box
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok \xff\xfe not utf-8")
    before = len(queries.list_tasks(store.board))
    result = run_cli("task", "create", "fine title", "--body-file", str(bad), cwd=tmp_path, env=env)
    assert result.returncode == 2 and "is not UTF-8 text" in result.stderr and "Traceback" not in result.stderr
    title = subprocess.run([sys.executable, "-m", "sparkops", "task", "create", b"bad \xff title"],
                           cwd=tmp_path, env={**os.environ, **env, "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True)
    assert title.returncode == 2 and "is not valid UTF-8" in title.stderr
    assert len(queries.list_tasks(store.board)) == before  # nothing written

    for n in range(1500):
        board.create_task(store.board, f"a task with a long enough title to fill the pipe {n}")
    lister = subprocess.Popen([sys.executable, "-m", "sparkops", "task", "list", "--limit", "2000"], cwd=tmp_path,
                              env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    lister.stdout.readline()
    lister.stdout.close()  # `| head -1`
    err = lister.stderr.read().decode()
    assert lister.wait(timeout=60) == 141 and "Traceback" not in err, err


def test_forged_metadata_never_gets_a_live_run_closed(box, strangers):
    """Another writer rewrites a live run's process identity to name dead processes:
    this host's own record (the worker registry) still says the worker lives."""
    store, settings, env = box
    worker = strangers()
    host = procs.host_name(settings["host.name"])
    real = RunIdentity(host, procs.boot_id(), shim=procs.describe(worker.pid), agent=procs.describe(worker.pid))
    task_id, run_id = running_with_identity(store, real)
    workers.register(workers.directory(settings), task_id, run_id, real)
    forged = RunIdentity(host, procs.boot_id(), shim=dead_pid(), agent=dead_pid())
    with sqlite3.connect(Path(settings.base_dir) / "data" / "kanban.db") as conn:
        conn.execute("UPDATE task_runs SET metadata=? WHERE id=?",
                     (json.dumps({"process": forged.as_dict()}), run_id))

    result = run_cli("reclaim", cwd=store_dir(settings), env=env)

    assert result.returncode == 0 and task_id not in result.stdout, result.stdout
    assert queries.get_task(store.board, task_id)["status"] == "running"
    assert worker.poll() is None


def test_a_text_priority_does_not_jump_the_queue(box, tmp_path):
    """SQLite sorts text above every number: '=1+2' as a priority would be claimed
    before everything else. It counts as 0."""
    store, settings, env = box
    insert_ready(tmp_path / "data" / "kanban.db", "t_0dd00009", "text priority")
    with sqlite3.connect(tmp_path / "data" / "kanban.db") as conn:
        conn.execute("UPDATE tasks SET priority='=1+2' WHERE id='t_0dd00009'")
    first = board.create_task(store.board, "priority one", priority=1)
    change = board.claim_next(store.board, host="h", lock="h:1", capacity=5)
    assert change.task_id == first
