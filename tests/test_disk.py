"""Disk cleanup on a real tree in tmp_path and a real SQLite board.

Tasks are made with :mod:`sparkops.board.transitions` (with ``now=`` in the past, or
``completed_at`` backdated with an UPDATE); file ages are set with ``os.utime``;
the clock is passed as ``now=NOW``. Disk usage is the one edge that is faked
(``measure=``): a fake whose "used" space is a fixed base plus what the tree
really holds, so deleting real files really lowers it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import NOW, make_settings
from sqlalchemy import update

from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.jobs.framework import JobContext
from sparkops.storage.schema import tasks
from sparkops.storage.store import open_store
from sparkops.watch import cleanup_plan, disk
from sparkops.watch.cleanup_plan import Candidate
from sparkops.watch.disk import DiskUsage

DAY = 86400


# -- helpers -------------------------------------------------------------------------------


@pytest.fixture
def make_ctx(tmp_path: Path) -> Iterator[Callable[..., JobContext]]:
    """``make_ctx(**env)``: a JobContext on a fresh SQLite board under tmp_path/data."""
    stores = []

    def make(**env: str) -> JobContext:
        settings = make_settings(tmp_path, **env)
        store = open_store(settings, create=True, now=NOW)
        stores.append(store)
        return JobContext.create(settings, store)

    yield make
    for store in stores:
        store.dispose()


@pytest.fixture
def ctx(make_ctx) -> JobContext:
    return make_ctx()


def write(path: Path, *, age_days: float, size: int = 100) -> Path:
    """A file of ``size`` bytes last modified ``age_days`` before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    backdate(path, age_days)
    return path


def backdate(path: Path, age_days: float) -> None:
    when = NOW - age_days * DAY
    os.utime(path, (when, when), follow_symlinks=False)


def du(path: Path) -> int:
    """Allocated bytes under ``path`` (links not followed), computed apart from disk.py."""
    st = os.lstat(path)
    total = st.st_blocks * 512
    if os.path.isdir(path) and not os.path.islink(path):
        for top, dirs, files in os.walk(path):
            for name in dirs + files:
                total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def snapshot(top: Path) -> dict[str, tuple[int, float]]:
    """Every entry under ``top`` with its size and mtime (links not followed)."""
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            st = os.lstat(os.path.join(dirpath, name))
            out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime)
    return out


def done_task(ctx: JobContext, title: str, *, finished_days_ago: float) -> str:
    task_id = board.create_task(ctx.store.board, title, now=NOW - 30 * DAY)
    board.complete(ctx.store.board, task_id, now=NOW - finished_days_ago * DAY)
    return task_id


def workspace(ctx: JobContext, task_id: str, *, size: int = 5000) -> Path:
    root = Path(ctx.settings["dispatch.workspace_root"])
    write(root / task_id / "src" / "main.py", age_days=40, size=size)
    write(root / task_id / "notes.txt", age_days=40, size=10)
    return root / task_id


def fake_usage(data: Path, *, percent: float, total: int = 20_000_000) -> Callable:
    """A ``measure`` whose file system holds ``total`` bytes and is ``percent`` full
    now; used space then follows what ``data`` really holds."""
    device = os.stat(data).st_dev
    base = int(total * percent / 100) - du(data)
    def measure(paths):
        used = base + du(data)
        return [DiskUsage(Path(paths[0]), None, total, used, total - used, 100.0 * used / total,
                          device=device)]

    return measure


@contextmanager
def undeletable(path: Path) -> Iterator[None]:
    """Make ``path`` (a file alone in its directory) impossible to delete. As a
    normal user: a read-only parent directory. As root, which ignores file modes:
    the immutable attribute (``chattr +i``); where that is not available the test
    is skipped, because nothing else makes a deletion fail for root."""
    if os.geteuid() != 0:
        path.parent.chmod(0o555)
        try:
            yield
        finally:
            path.parent.chmod(0o755)
        return
    try:
        result = subprocess.run(["chattr", "+i", str(path)], check=False, capture_output=True,
                                text=True)
    except FileNotFoundError:
        pytest.skip("running as root without chattr: no way to make a deletion fail")
    if result.returncode != 0:
        pytest.skip(f"running as root and chattr +i failed here ({result.stderr.strip()}): "
                    "no way to make a deletion fail")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


# -- usage --------------------------------------------------------------------------------


def test_usage_one_entry_per_file_system_and_missing_paths_reported(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    found = disk.usage([tmp_path, tmp_path / "sub", tmp_path / "missing"])
    assert len(found) == 2
    fs, missing = found
    assert fs.path == tmp_path and fs.also == (tmp_path / "sub",)
    assert fs.error is None and fs.total_bytes > 0 and 0 <= fs.percent <= 100
    assert fs.used_bytes + fs.free_bytes <= fs.total_bytes
    assert fs.mount is not None and tmp_path.resolve().is_relative_to(fs.mount)
    assert missing.error == f"{tmp_path / 'missing'}: does not exist"
    assert missing.total_bytes == 0 and missing.percent == 0.0


# -- what may go --------------------------------------------------------------------------


def test_plan_takes_only_old_logs_and_long_finished_workspaces(ctx: JobContext):
    s = ctx.settings
    logs = Path(s["disk.log_roots"][0])
    db = ctx.store.board

    # logs
    old_log = write(logs / "old.log", age_days=10)
    write(logs / "new.log", age_days=1)
    write(Path(s["runner.log_file"]), age_days=30)              # the live runner log
    rotated = write(Path(str(s["runner.log_file"]) + ".1"), age_days=30)

    # a task on its second run: the first run's log may go, the open run's may not
    running = board.create_task(db, "running", now=NOW - 40 * DAY)
    first = board.claim(db, running, lock="h:1", now=NOW - 40 * DAY).run_id
    board.fail(db, running, run_id=first, outcome=Outcome.CRASHED, error="boom", failure_limit=5,
               now=NOW - 39 * DAY)
    second = board.claim(db, running, lock="h:1", now=NOW - 39 * DAY).run_id
    run_logs = Path(s["dispatch.run_log_root"]) / running
    closed_log = write(run_logs / f"run-{first}.log", age_days=39)
    write(run_logs / f"run-{second}.log", age_days=30)            # still open: kept
    with db.write() as conn:                                      # "even if old"
        conn.execute(update(tasks).where(tasks.c.id == running).values(completed_at=NOW - 40 * DAY))

    # workspaces
    old_done = done_task(ctx, "old done", finished_days_ago=10)
    backdated = done_task(ctx, "backdated", finished_days_ago=0)
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == backdated).values(completed_at=NOW - 5 * DAY))
    recent = done_task(ctx, "recent", finished_days_ago=1)
    archived_old = board.create_task(db, "archived long ago", now=NOW - 10 * DAY)
    board.archive(db, archived_old, now=NOW - 10 * DAY)          # no completed_at: its last event
    archived_new = board.create_task(db, "archived yesterday", now=NOW - 10 * DAY)
    board.archive(db, archived_new, now=NOW - 1 * DAY)
    ready = board.create_task(db, "ready and old", now=NOW - 60 * DAY)
    leaked = board.create_task(db, "done by another tool, run left open", now=NOW - 60 * DAY)
    board.claim(db, leaked, lock="h:2", now=NOW - 60 * DAY)
    with db.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == leaked)
                     .values(status="done", completed_at=NOW - 50 * DAY, current_run_id=None))
    for task_id in (running, old_done, backdated, recent, archived_old, archived_new, ready, leaked):
        workspace(ctx, task_id)
    unknown = workspace(ctx, "t_deadbeef")
    write(Path(s["dispatch.workspace_root"]) / "stray.txt", age_days=90)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    ws_root = Path(s["dispatch.workspace_root"])
    assert {c.path for c in plan.candidates} == {
        old_log, rotated, closed_log, ws_root / old_done, ws_root / backdated, ws_root / archived_old}
    assert plan.refused == [] and plan.errors == []
    assert plan.kept["the runner's live log"] == 1
    assert plan.kept["log of an open run"] == 1
    assert plan.kept["log newer than 7 days"] == 1
    assert plan.kept["not a workspace directory"] == 1
    assert dict(plan.kept_workspaces) == {
        ws_root / running: "task is running",
        ws_root / recent: "finished less than 3 days ago",
        ws_root / archived_new: "finished less than 3 days ago",
        ws_root / ready: "task is ready",
        ws_root / leaked: "task has an open run",
        unknown: "unknown task",
    }
    ages = [c.age_days for c in plan.candidates]
    assert ages == sorted(ages, reverse=True)                     # oldest first
    by_path = {c.path: c for c in plan.candidates}
    assert by_path[ws_root / archived_old].age_days == pytest.approx(10)
    assert by_path[ws_root / old_done].kind == "workspace" and by_path[old_log].kind == "log"
    assert by_path[ws_root / old_done].task_id == old_done

    expected_bytes = {c.path: du(c.path) for c in plan.candidates}
    assert {c.path: c.bytes for c in plan.candidates} == expected_bytes

    before = snapshot(Path(s["disk.paths"][0]))
    report = disk.clean(ctx, now=NOW, force=True)

    assert report.triggered and report.forced and not report.dry_run
    assert report.deleted == plan.candidates
    assert report.errors == [] and report.remaining == 0
    assert report.freed_bytes == sum(expected_bytes.values()) == sum(c.bytes for c in report.deleted)
    after = snapshot(Path(s["disk.paths"][0]))
    gone = {p for p in before if p not in after}
    deleted = {str(c.path) for c in plan.candidates}
    assert all(p in deleted or any(p.startswith(d + os.sep) for d in deleted) for p in gone)
    assert all(not c.path.exists() for c in plan.candidates)
    for kept in (ws_root / running, ws_root / recent, ws_root / ready, ws_root / leaked, unknown,
                 Path(s["runner.log_file"]), run_logs / f"run-{second}.log", logs / "new.log"):
        assert kept.exists(), kept


def test_plan_reads_the_board_the_same_on_both_backends(settings, store):
    ctx = JobContext.create(settings, store)
    old_done = done_task(ctx, "old done", finished_days_ago=10)
    archived = board.create_task(store.board, "archived", now=NOW - 10 * DAY)
    board.archive(store.board, archived, now=NOW - 9 * DAY)
    running = board.create_task(store.board, "running", now=NOW - 40 * DAY)
    board.claim(store.board, running, lock="h:1", now=NOW - 40 * DAY)
    for task_id in (old_done, archived, running):
        workspace(ctx, task_id)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    root = Path(settings["dispatch.workspace_root"])
    assert [(c.path, round(c.age_days)) for c in plan.candidates] == [(root / old_done, 10),
                                                                      (root / archived, 9)]
    assert dict(plan.kept_workspaces) == {root / running: "task is running"}


def test_a_log_root_holding_the_databases_and_workspaces_spares_them(make_ctx, tmp_path: Path):
    """disk.log_roots = ["data"] must not take the board or a running task's files."""
    ctx = make_ctx(SPARKOPS_DISK_LOG_ROOTS='["data"]')
    running = board.create_task(ctx.store.board, "running", now=NOW - 40 * DAY)
    board.claim(ctx.store.board, running, lock="h:1", now=NOW - 40 * DAY)
    ws = workspace(ctx, running)
    board_file = Path(ctx.store.board.path)
    backdate(board_file, 30)
    old = write(tmp_path / "data" / "old.log", age_days=30)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    assert [c.path for c in plan.candidates] == [old]
    assert plan.kept["a database file"] >= 2                      # kanban.db and sparkops.db
    assert plan.kept["inside the workspace root"] == 1
    disk.clean(ctx, now=NOW, force=True)
    assert board_file.exists() and (ws / "src" / "main.py").exists() and not old.exists()


def test_a_log_root_inside_the_workspace_root_is_refused(make_ctx, tmp_path: Path):
    first = make_ctx()
    running = board.create_task(first.store.board, "running", now=NOW - 40 * DAY)
    board.claim(first.store.board, running, lock="h:1", now=NOW - 40 * DAY)
    old = write(workspace(first, running) / "logs" / "old.log", age_days=30)
    root = tmp_path / "data" / "workspaces" / running / "logs"
    ctx = make_ctx(SPARKOPS_DISK_LOG_ROOTS=json.dumps([str(root)]))

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    assert plan.candidates == []
    why = f"log root {root} is inside the workspace root {tmp_path / 'data' / 'workspaces'}"
    assert plan.refused == [(root, why + "; refusing to clean it")]
    assert old.exists()


def test_a_task_reopened_after_the_plan_keeps_its_workspace(ctx: JobContext, monkeypatch):
    task = done_task(ctx, "done", finished_days_ago=10)
    ws = workspace(ctx, task)
    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)
    assert [c.path for c in plan.candidates] == [ws]
    with ctx.store.board.write() as conn:          # another tool reopens it meanwhile
        conn.execute(update(tasks).where(tasks.c.id == task).values(status="ready"))
    monkeypatch.setattr(cleanup_plan, "plan_cleanup", lambda *_a, **_k: plan)

    report = disk.clean(ctx, now=NOW, force=True)

    assert report.deleted == [] and ws.exists()
    assert report.kept["task changed since the plan"] == 1


def test_the_tree_changing_between_plan_and_delete_is_checked_again(ctx: JobContext, tmp_path: Path,
                                                                    monkeypatch):
    logs = Path(ctx.settings["disk.log_roots"][0])
    swapped_log = write(logs / "swapped.log", age_days=30)
    vanished_log = write(logs / "vanished.log", age_days=20)
    ws = workspace(ctx, done_task(ctx, "done", finished_days_ago=10))
    outside = tmp_path / "outside"
    precious = write(outside / "precious.txt", age_days=30)
    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)
    assert [c.path for c in plan.candidates] == [swapped_log, vanished_log, ws]
    swapped_log.unlink()
    swapped_log.symlink_to(precious)                 # a log became a link out of the root
    vanished_log.unlink()                            # someone else deleted it
    shutil.rmtree(ws)
    ws.symlink_to(outside)                           # a workspace became a link out of the root
    monkeypatch.setattr(cleanup_plan, "plan_cleanup", lambda *_a, **_k: plan)

    report = disk.clean(ctx, now=NOW, force=True)

    assert report.deleted == [] and report.freed_bytes == 0
    assert dict(report.errors) == {
        swapped_log: f"refused: now a symlink to {precious}, outside {logs}",
        ws: f"refused: now a symlink to {outside}, outside {ws.parent}",
    }
    assert precious.exists() and swapped_log.is_symlink() and ws.is_symlink()


def test_a_finished_workspace_holding_a_live_tasks_workspace_is_kept(ctx: JobContext):
    done = done_task(ctx, "done", finished_days_ago=10)
    ws = workspace(ctx, done)
    running = board.create_task(ctx.store.board, "running", now=NOW - 5 * DAY)
    board.claim(ctx.store.board, running, lock="h:1", now=NOW - 5 * DAY)
    with ctx.store.board.write() as conn:
        conn.execute(update(tasks).where(tasks.c.id == running).values(workspace_path=str(ws / "src")))

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    assert plan.candidates == []
    assert dict(plan.kept_workspaces) == {ws: f"holds the workspace of running task {running}"}


def test_hard_links_inside_a_workspace_count_once(ctx: JobContext):
    ws = workspace(ctx, done_task(ctx, "done", finished_days_ago=10), size=40_000)
    os.link(ws / "src" / "main.py", ws / "src" / "copy.py")

    (candidate,) = cleanup_plan.plan_cleanup(ctx, now=NOW).candidates

    assert candidate.bytes == du(ws) - os.lstat(ws / "src" / "copy.py").st_blocks * 512


def test_plan_walks_ten_thousand_files(ctx: JobContext):
    runs = Path(ctx.settings["dispatch.run_log_root"])
    old = set()
    for i in range(10_000):
        path = write(runs / f"t_{i // 100:08x}" / f"run-{i}.log", age_days=8 if i % 2 else 6, size=1)
        if i % 2:
            old.add(path)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    assert {c.path for c in plan.candidates} == old
    assert plan.kept["log newer than 7 days"] == 5000


# -- safety -------------------------------------------------------------------------------


def test_symlinks_out_of_a_root_are_refused_and_links_inside_deleted_as_links(ctx: JobContext,
                                                                              tmp_path: Path):
    logs = Path(ctx.settings["disk.log_roots"][0])
    ws_root = Path(ctx.settings["dispatch.workspace_root"])
    outside = tmp_path / "outside"
    target = write(outside / "precious.log", age_days=30)
    write(outside / "dir" / "precious.bin", age_days=30)
    (logs / "sub").mkdir(parents=True)
    (logs / "evil.log").symlink_to(target)
    (logs / "sub" / "evil_dir").symlink_to(outside / "dir")
    (logs / "sub" / "dotdot.log").symlink_to("../../../outside/precious.log")
    kept_target = write(logs / "fresh.log", age_days=1)
    (logs / "alias.log").symlink_to(kept_target)
    for link in ("evil.log", "sub/evil_dir", "sub/dotdot.log", "alias.log"):
        backdate(logs / link, 30)
    task = done_task(ctx, "done", finished_days_ago=10)
    ws_root.mkdir(parents=True, exist_ok=True)
    (ws_root / task).symlink_to(outside)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    refused = {path: why for path, why in plan.refused}
    assert set(refused) == {logs / "evil.log", logs / "sub" / "evil_dir", logs / "sub" / "dotdot.log",
                            ws_root / task}
    assert refused[logs / "evil.log"] == f"symlink to {target}, outside the log root {logs}"
    assert refused[ws_root / task].startswith(f"symlink to {outside}, outside the workspace root")
    link = next(c for c in plan.candidates if c.path == logs / "alias.log")
    assert link.is_link and link.bytes == 0 and [c.path for c in plan.candidates] == [link.path]

    before = snapshot(outside)
    report = disk.clean(ctx, now=NOW, force=True)

    assert snapshot(outside) == before
    assert [c.path for c in report.deleted] == [logs / "alias.log"]
    assert not os.path.lexists(logs / "alias.log") and kept_target.exists()
    assert all(os.path.islink(p) for p in refused)
    assert report.refused == plan.refused


def test_a_root_that_is_slash_home_or_not_a_directory_is_refused_whole(make_ctx, tmp_path,
                                                                       monkeypatch):
    home = tmp_path / "home" / "me"
    home.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    a_file = write(tmp_path / "a-file", age_days=30)
    roots = ["/", "/tmp/../", str(home), str(tmp_path / "home"), str(a_file), str(tmp_path / "nope")]
    ctx = make_ctx(SPARKOPS_DISK_LOG_ROOTS=json.dumps(roots), SPARKOPS_DISPATCH_WORKSPACE_ROOT="~")

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)

    assert plan.candidates == []
    assert plan.refused == [
        (Path("/"), "log root / is the file system root; refusing to clean it"),
        (Path("/tmp/.."), "log root /tmp/.. (resolves to /) is the file system root; refusing to clean it"),
        (home, f"log root {home} is the home directory; refusing to clean it"),
        (tmp_path / "home", (f"log root {tmp_path / 'home'} contains the home directory {home}; "
                             "refusing to clean it")),
        (a_file, f"log root {a_file} is not a directory; refusing to clean it"),
        (home, f"workspace root {home} is the home directory; refusing to clean it"),
    ]
    assert plan.kept["root does not exist"] == 1                  # tmp_path/nope: not a refusal
    assert ctx.settings["dispatch.workspace_root"] == home         # "~" as the config resolved it
    report = disk.clean(ctx, now=NOW, force=True)
    assert report.deleted == [] and a_file.exists() and report.refused == plan.refused


# -- cleaning -----------------------------------------------------------------------------


def test_dry_run_changes_nothing_and_lists_the_plan(ctx: JobContext):
    logs = Path(ctx.settings["disk.log_roots"][0])
    for i in range(5):
        write(logs / f"old-{i}.log", age_days=10 + i)
    workspace(ctx, done_task(ctx, "done", finished_days_ago=10))
    data = Path(ctx.settings["disk.paths"][0])
    before = snapshot(data)

    plan = cleanup_plan.plan_cleanup(ctx, now=NOW)
    report = disk.clean(ctx, now=NOW, dry_run=True, measure=fake_usage(data, percent=95))

    assert report.dry_run and report.triggered
    assert report.deleted == plan.candidates and len(plan.candidates) == 6
    assert report.freed_bytes == plan.bytes
    assert snapshot(data) == before
    assert "dry run, would free" in disk.summary(report)


def test_clean_does_nothing_below_the_threshold(ctx: JobContext):
    old = write(Path(ctx.settings["disk.log_roots"][0]) / "old.log", age_days=30)
    data = Path(ctx.settings["disk.paths"][0])

    report = disk.clean(ctx, now=NOW, measure=fake_usage(data, percent=50))

    assert not report.triggered and report.deleted == [] and report.freed_bytes == 0
    assert old.exists()
    assert re.fullmatch(rf"disk {re.escape(str(data))} 50%: below 85%, nothing to clean",
                        disk.summary(report))


def test_clean_only_touches_file_systems_above_the_threshold(ctx: JobContext):
    old = write(Path(ctx.settings["disk.log_roots"][0]) / "old.log", age_days=30)
    data = Path(ctx.settings["disk.paths"][0])

    def elsewhere(paths):  # another file system is full; this one's files do not help it
        return [DiskUsage(Path("/elsewhere"), None, 100, 95, 5, 95.0, device=-1)]

    report = disk.clean(ctx, now=NOW, measure=elsewhere)

    assert report.triggered and report.deleted == [] and old.exists()
    assert report.kept["on a file system below the threshold"] == 1
    assert [u.path for u in report.still_over] == [Path("/elsewhere")]
    assert disk.summary(report) == "disk /elsewhere 95% -> 95%: nothing old enough to delete"
    assert data.exists()


@pytest.mark.parametrize("recheck_every", [1, 5])
def test_clean_deletes_oldest_first_and_stops_once_under_the_threshold(ctx: JobContext, recheck_every):
    logs = Path(ctx.settings["disk.log_roots"][0])
    files = [write(logs / f"run-{i:02d}.log", age_days=10 + i, size=100_000) for i in range(20)]
    data = Path(ctx.settings["disk.paths"][0])
    measure = fake_usage(logs, percent=90, total=16_000_000)
    size = du(files[0])
    needed = math.ceil((90 - 85) / 100 * 16_000_000 / size)       # deletions that get it to 85%

    report = disk.clean(ctx, now=NOW, measure=measure, recheck_every=recheck_every)

    expected = math.ceil(needed / recheck_every) * recheck_every
    assert [c.path for c in report.deleted] == list(reversed(files))[:expected]   # oldest first
    assert all(p.exists() for p in files[: 20 - expected])
    assert report.remaining == 20 - expected > 0
    assert report.freed_bytes == expected * size == sum(c.bytes for c in report.deleted)
    before, after = report.usage_before[0], report.usage_after[0]
    assert before.percent > 85 >= after.percent
    assert report.still_over == []
    assert before.used_bytes - after.used_bytes == report.freed_bytes
    assert (after.used_bytes + recheck_every * size) * 100 / 16_000_000 > 85  # not a batch too late
    assert disk.summary(report) == (
        f"disk {data} {before.percent:.0f}% -> {after.percent:.0f}%: "
        f"freed {disk._human(expected * size)} ({expected} logs, 0 workspaces)")


def test_errors_deleting_are_reported_not_raised(ctx: JobContext):
    logs = Path(ctx.settings["disk.log_roots"][0])
    stuck_log = write(logs / "locked" / "stuck.log", age_days=30)
    other_log = write(logs / "other.log", age_days=20)
    task = done_task(ctx, "done", finished_days_ago=10)
    ws = workspace(ctx, task, size=50_000)
    stuck_file = write(ws / "locked" / "stuck.bin", age_days=30)
    ws_bytes = du(ws)

    with undeletable(stuck_log), undeletable(stuck_file):
        report = disk.clean(ctx, now=NOW, force=True)
        left = du(ws)

    errors = dict(report.errors)
    assert set(errors) == {stuck_log, ws}
    assert "Operation not permitted" in errors[stuck_log] or "Permission denied" in errors[stuck_log]
    assert errors[ws].startswith("partly deleted (")
    assert [c.path for c in report.deleted] == [other_log]
    assert not other_log.exists() and stuck_log.exists() and stuck_file.exists()
    assert not (ws / "src").exists()
    assert report.freed_bytes == du_known(report.deleted) + (ws_bytes - left)
    assert disk.summary(report).endswith("; forced, 2 errors")


def du_known(deleted: list[Candidate]) -> int:
    return sum(c.bytes for c in deleted)


def test_summary_and_job_report(make_ctx):
    ctx = make_ctx(SPARKOPS_DISK_THRESHOLD_PERCENT="100")
    write(Path(ctx.settings["disk.log_roots"][0]) / "old.log", age_days=30)
    workspace(ctx, done_task(ctx, "done", finished_days_ago=10))

    idle = disk.run(ctx, now=NOW)                 # real usage: never above 100%
    assert not idle.acted and idle.summary.endswith("below 100%, nothing to clean")

    forced = disk.run(ctx, now=NOW, force=True)
    assert forced.acted
    assert re.fullmatch(r"disk .+ \d+% -> \d+%: freed [\d.]+ kB \(1 log, 1 workspace\); forced",
                        forced.summary), forced.summary
    assert json.loads(json.dumps(forced.details))["freed_bytes"] == forced.details["freed_bytes"] > 0
    assert disk._human(3_200_000_000) == "3.2 GB" and disk._human(512) == "512 B"
