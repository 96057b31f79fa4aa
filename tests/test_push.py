"""The push job against a real OpenSSH server: the export lands whole, only changed
files travel, a server killed mid-upload leaves the previous files as they were."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
from conftest import NOW, make_settings, remote_env, run_cli

from sparkops.board import transitions as board
from sparkops.jobs.framework import JobContext
from sparkops.net import ssh as remote
from sparkops.remote import push
from sparkops.runner.registry import run_job
from sparkops.sprint import export
from sparkops.storage.store import open_store


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def env(ssh_server, tmp_path) -> dict[str, str]:
    return {**remote_env(ssh_server, tmp_path), "SPARKOPS_REMOTE_PUSH_HOST": "vps",
            "SPARKOPS_REMOTE_PUSH_DIR": str(tmp_path / "vps" / "www" / "board"),
            "SPARKOPS_EXPORT_DIR": str(tmp_path / "exports")}


@pytest.fixture
def ctx(env, tmp_path):
    settings = make_settings(tmp_path, **env)
    store = open_store(settings, create=True, now=NOW)
    yield JobContext.create(settings, store)
    store.dispose()


def remote_dir(ctx) -> Path:
    return Path(ctx.settings["remote.push_dir"])  # the server is this machine: look at its files


def test_push_copies_the_export_and_then_only_what_changed(ctx):
    board.create_task(ctx.store.board, "first task", now=NOW)
    assert run_job(ctx, "export", now=NOW).ok
    there = remote_dir(ctx)

    first = push.push(ctx, now=NOW)
    assert first.sent == list(export.FILES) and first.unchanged == []
    assert sorted(p.name for p in there.iterdir()) == sorted(export.FILES)  # no temporaries left
    for name in export.FILES:
        local = Path(ctx.settings["export.dir"]) / name
        assert digest(there / name) == digest(local)
        assert int((there / name).stat().st_mtime) == int(local.stat().st_mtime)
    assert export.verify_export(there) == []  # board.json's checksums hold on the remote side

    again = push.push(ctx, now=NOW + 60)
    assert again.sent == [] and again.unchanged == list(export.FILES)
    assert "nothing changed" in again.summary()

    inodes = {name: (there / name).stat().st_ino for name in export.FILES}
    board.create_task(ctx.store.board, "second task", now=NOW + 120)
    assert run_job(ctx, "export", now=NOW + 120).ok
    third = push.push(ctx, now=NOW + 180)
    assert "tasks.csv" in third.sent and third.sent[-1] == export.JSON_FILE  # board.json goes last
    assert "runs.csv" in third.unchanged  # no run in either export: the same bytes stay put
    assert set(third.sent) | set(third.unchanged) == set(export.FILES)
    for name in third.sent:  # replaced by a rename: a new file, never the old one written over
        assert (there / name).stat().st_ino != inodes[name]
        assert digest(there / name) == digest(Path(ctx.settings["export.dir"]) / name)
    for name in third.unchanged:
        assert (there / name).stat().st_ino == inodes[name]
    rows = export.read_csv_rows(there / "tasks.csv")
    assert sorted(r["title"] for r in rows) == ["first task", "second task"]

    state = remote.load_state(ctx.store.ops, ctx.host, push.KIND, "vps")
    assert state.status == "ok" and state.data["sent"] == third.sent
    assert set(state.data["files"]) == set(export.FILES)


def test_a_file_changed_on_the_remote_side_is_sent_again(ctx):
    board.create_task(ctx.store.board, "a task", now=NOW)
    run_job(ctx, "export", now=NOW)
    push.push(ctx, now=NOW)
    tampered = remote_dir(ctx) / "runs.csv"
    tampered.write_text("someone edited this\r\n")
    result = push.push(ctx, now=NOW + 60)
    assert result.sent == ["runs.csv"]
    assert digest(tampered) == digest(Path(ctx.settings["export.dir"]) / "runs.csv")


def test_a_server_killed_mid_upload_leaves_the_previous_remote_files_intact(ctx, ssh_server):
    exports = Path(ctx.settings["export.dir"])
    exports.mkdir(parents=True)
    for name in export.FILES:
        (exports / name).write_bytes(f"version 1 of {name}\n".encode())
    push.push(ctx, now=NOW)
    there = remote_dir(ctx)
    before = {name: (there / name).read_bytes() for name in export.FILES}

    big = os.urandom(48 * 1024 * 1024)  # big enough to be caught halfway
    (exports / "tasks.csv").write_bytes(big)
    (exports / export.JSON_FILE).write_bytes(b"version 2\n")
    seen: list[int] = []

    def kill_halfway(name: str, sent: int, total: int) -> None:
        seen.append(sent)
        if name == "tasks.csv" and sent >= total // 3 and ssh_server.proc is not None:
            ssh_server.kill()

    with pytest.raises(push.PushError) as broke:
        push.push(ctx, now=NOW + 60, progress=kill_halfway)
    assert "broke after 0 of 5 file(s)" in str(broke.value) and broke.value.sent == []
    assert seen and 0 < max(seen) < len(big)
    for name in export.FILES:  # every remote file is the previous one, whole
        assert (there / name).read_bytes() == before[name]
    leftovers = [p.name for p in there.iterdir() if push.TEMP_MARK in p.name]
    assert leftovers and leftovers[0].startswith(".tasks.csv")  # the half upload, under another name
    state = remote.load_state(ctx.store.ops, ctx.host, push.KIND, "vps")
    assert state.status == "error" and "broke" in state.detail

    ssh_server.start()  # the server is back: the next push finishes and tidies up
    result = push.push(ctx, now=NOW + 120)
    assert result.stale_removed == len(leftovers)
    assert sorted(result.sent) == sorted(["tasks.csv", export.JSON_FILE])
    assert (there / "tasks.csv").read_bytes() == big
    assert sorted(p.name for p in there.iterdir()) == sorted(export.FILES)


def test_push_through_the_cli_and_the_job(ctx, env, tmp_path):
    board.create_task(ctx.store.board, "a task", now=NOW)
    assert run_job(ctx, "export").ok
    done = run_cli("remote", "push", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("push: ok: sent 5 file(s)") and "to vps:" in done.stdout
    job = run_cli("job", "run", "push", cwd=tmp_path, env=env)
    assert job.returncode == 0 and "push: ok: nothing changed: 5 file(s) already on vps" in job.stdout

    no_host = {**env, "SPARKOPS_REMOTE_PUSH_HOST": ""}
    refused = run_cli("remote", "push", cwd=tmp_path, env=no_host)
    assert refused.returncode == 2 and "no push host" in refused.stderr


def test_an_untrusted_host_gets_nothing(ctx, env, tmp_path):
    (tmp_path / "known_hosts").write_text("")  # the server's key is not known
    board.create_task(ctx.store.board, "a task", now=NOW)
    run_job(ctx, "export", now=NOW)
    result = run_job(ctx, "push", now=NOW)
    assert result.outcome == "error" and "HostKeyUnknown" in result.error and "trust-host vps" in result.error
    assert not remote_dir(ctx).exists()


def test_nothing_to_push_before_the_first_export(ctx):
    result = run_job(ctx, "push", now=NOW, trigger="schedule")
    assert result.ok and not result.acted and "no export" in result.summary
