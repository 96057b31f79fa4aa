"""The operations pages (Home's health, Jobs, Playbook, Events and alerts), rendered
in process with Streamlit's AppTest over real SQLite files: what they show on an
empty, a busy and a Hermes-made board, their buttons (audited, the playbook's only
after a confirmation), their error boxes and their CSV downloads; and the pure
helpers of the view modules (:mod:`sparkops.ui.home_view`, ``jobs_view``, ``events_view``, ...)."""

from __future__ import annotations

import io
import json
import re
import shutil
import socket
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import ROOT, make_settings, run_page
from sqlalchemy import select

from sparkops.board import queries, runs
from sparkops.board import transitions as board
from sparkops.control import actions
from sparkops.jobs.framework import JobContext, JobSpec
from sparkops.runner import registry
from sparkops.runner.loop import Runner
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_hosts, ops_job_runs
from sparkops.storage.store import open_store
from sparkops.watch import alerts, services

HOST = "gb10-test"
PAGES = ("Home.py", "pages/5_Jobs.py", "pages/6_Playbook.py", "pages/7_Events.py", "pages/8_Fleet.py")
#: Only the gateway is watched, on a port where nothing listens (a check fails fast).
SERVICES = {"vllm": {"enabled": False}, "redis": {"enabled": False}, "ui": {"enabled": False},
            "tunnel": {"enabled": False}, "gateway": {"port": 1}}
ENV = {
    "SPARKOPS_HOST_NAME": HOST,
    "SPARKOPS_SERVICES": json.dumps(SERVICES),
    "SPARKOPS_REVIEW_MODEL_URL": "",  # no narrative: the review never waits for a model
    "SPARKOPS_DISK_THRESHOLD_PERCENT": "100",  # a full test disk is not this test's business
}
FORMULA = "=HYPERLINK(\"http://evil\")"


@pytest.fixture
def app_env(app_env, monkeypatch):
    """conftest's app env with the settings of these tests (ENV)."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return app_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(tmp_path: Path, **env: str):
    return make_settings(tmp_path, **{**ENV, **env})


def with_ctx(tmp_path: Path, fn, **env: str):
    """Run ``fn(ctx)`` on a job context of the test's databases (created if need be)."""
    settings = settings_for(tmp_path, **env)
    store = open_store(settings, create=True)
    try:
        return fn(JobContext.create(settings, store))
    finally:
        store.dispose()


def empty_board(tmp_path: Path) -> None:
    with_ctx(tmp_path, lambda ctx: None)


def heartbeat(ctx: JobContext, at: float | None = None) -> None:
    """The runner's own heartbeat row in ops_hosts, as a live runner writes it."""
    Runner(ctx, clock=(lambda: at) if at is not None else time.time).heartbeat_host()


def service(ctx: JobContext, name: str, status: str, detail: str) -> None:
    ts = int(time.time())
    services.save_state(ctx.store.ops, ctx.host, services.ServiceState(
        name, status=status, since=ts, checked_at=ts, detail=detail))


def busy_board(tmp_path: Path) -> None:
    """The demo sprint with job runs (one failed), an alert, an audited press, a
    live runner and a service that is down."""
    from sparkops.demo.sprint import seed_demo

    def fill(ctx: JobContext) -> None:
        seed_demo(ctx.store.board)
        for name in ("promote", "review", "export"):
            assert run_job(ctx, name).ok
        boom = JobSpec("boom", lambda ctx, now=None: 1 / 0, "dispatch.interval_seconds", "fails")
        assert run_job(ctx, "boom", specs={"boom": boom}).outcome == "error"
        alerts.notify(ctx, alerts.Alert("service:gateway", "error", "gateway is down", FORMULA))
        actions.run_job_now(ctx, "cli:tester", "promote")
        heartbeat(ctx)
        service(ctx, "gateway", "down", "tcp check failed: Connection refused")

    with_ctx(tmp_path, fill)


def hermes_board(tmp_path: Path) -> None:
    """A copy of the board Hermes made (the fixture itself is never opened)."""
    (tmp_path / "data").mkdir()
    shutil.copyfile(ROOT / "tests" / "fixtures" / "hermes_board.db", tmp_path / "data" / "kanban.db")
    empty_board(tmp_path)  # `sparkops init` on it: the ops database


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def audit_rows(tmp_path: Path) -> list[tuple]:
    """The audit, oldest first; a press in the app is by ``ui@<client address>``
    (AppTest has no real client, so the address is left out here)."""
    def who(actor: str) -> str:
        return "ui@" if actor.startswith("ui@") else actor
    return with_ctx(tmp_path, lambda ctx: [(who(r["actor"]), r["action"], r["target"], r["result"])
                                           for r in reversed(actions.audit_log(ctx.store.ops))])


# -- every page on every kind of board ------------------------------------------------------


@pytest.mark.parametrize("make", [empty_board, busy_board, hermes_board], ids=["empty", "busy", "hermes"])
def test_every_page_renders_on_every_kind_of_board(app_env, make):
    make(app_env)
    for path in PAGES:
        at = run_page(path)
        assert not at.exception, (path, at.exception)
        assert at.title, path


def test_home_shows_health_and_a_red_banner_for_what_is_down(app_env):
    busy_board(app_env)
    at = run_page("Home.py")
    assert not at.exception
    [banner] = [e.value.replace("\\", "") for e in at.error]  # markdown-escaped
    assert "service gateway is down: tcp check failed" in banner
    assert "stuck: 1 ready task but no run started for" in banner  # from the review
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Jobs runner"] == "alive" and metrics["Capacity used"] == "0/1"
    assert metrics["GPU"] in ("ok", "no NVML")
    assert metrics["Open tasks"] == "8"
    services_line = [m.value for m in at.markdown if m.value.startswith("**Services**")]
    assert services_line == ["**Services** · 🔴 gateway down"]
    assert len(at.dataframe) == 2  # recent alerts and events; no active run, no phase finished


def test_home_is_green_when_all_is_well(app_env):
    def well(ctx):
        heartbeat(ctx)
        service(ctx, "gateway", "up", "127.0.0.1:1 accepts connections")
        assert run_job(ctx, "review").ok
    with_ctx(app_env, well)
    at = run_page("Home.py")
    assert not at.exception and not at.error
    assert "All green on gb10-test" in at.success[0].value
    assert {m.label: m.value for m in at.metric}["Jobs runner"] == "alive"


def test_home_is_red_when_the_runner_is_silent_or_the_disk_is_full(app_env, monkeypatch):
    def silent(ctx):
        heartbeat(ctx, at=time.time() - 120)  # three beats missed, and then some
        service(ctx, "gateway", "up", "fine")
    with_ctx(app_env, silent)
    monkeypatch.setenv("SPARKOPS_DISK_THRESHOLD_PERCENT", "1")
    at = run_page("Home.py")
    assert not at.exception
    [banner] = [e.value.replace("\\", "") for e in at.error]  # markdown-escaped
    assert re.search(r"the jobs runner on gb10-test is down: last heartbeat 2m0\ds ago", banner)
    assert "(disk.threshold_percent = 1)" in banner
    assert {m.label: m.value for m in at.metric}["Jobs runner"] == "down"


# -- unknown is never green (issue 14) --------------------------------------------------------------

#: A URL shown escaped for markdown (``http://127\.0\.0\.1``): unreadable, and its link broken.
ESCAPED_URL = re.compile(r"https?://\S*\\[.:/]")


def every_text(at) -> list[str]:
    """Every piece of text a page shows (markdown, captions, boxes, metrics)."""
    shown = [e.value for kind in ("markdown", "caption", "success", "info", "warning", "error", "title",
                                  "subheader") for e in getattr(at, kind)]
    return shown + [f"{m.label}: {m.value}" for m in at.metric]


def test_right_after_start_nothing_is_called_green(app_env):
    """A live runner, but no watchdog pass and no review yet: Home, Jobs and the
    Playbook say "not checked", never "all green", "all well" or "none happening"."""
    with_ctx(app_env, heartbeat)
    home = run_page("Home.py")
    assert not home.exception and not home.success and not home.error
    [waiting] = [i.value for i in home.info if i.icon == "⏳"]
    assert waiting.startswith("**Not checked yet**")
    assert "service gateway: not checked yet" in waiting.replace("\\", "")
    assert "the sprint: not reviewed yet" in waiting.replace("\\", "")
    assert "**Services** · ⏳ gateway not checked yet" in texts(home.markdown)

    playbook = run_page("pages/6_Playbook.py")
    assert not playbook.exception and not playbook.success
    assert any(i.startswith("Not checked yet: Gateway stopped while an agent was working")
               for i in texts(playbook.info))
    assert ":gray-badge[Happening now: not checked yet]" in texts(playbook.markdown)

    jobs_page = run_page("pages/5_Jobs.py")
    assert not jobs_page.exception
    assert not any(m.startswith("✅") for m in texts(jobs_page.markdown))  # no job has run yet


def test_after_a_pass_a_service_that_is_down_is_said_on_jobs_not_ok(app_env):
    with_ctx(app_env, heartbeat)
    with_ctx(app_env, lambda ctx: run_job(ctx, "watchdog"))  # the gateway is declared, on port 1: down
    at = run_page("pages/5_Jobs.py")
    assert not at.exception
    [line] = [m for m in texts(at.markdown) if "at " in m and "found" in m]
    assert line.startswith("⚠️ ran, found 1 problem at ")
    assert not any(m.startswith("✅ ok") for m in texts(at.markdown))


def test_services_this_box_does_not_have_are_not_configured_not_red(app_env, monkeypatch):
    """The seed's default services (vLLM on :8000, the gateway, redis, the tunnel,
    the UI's own health URL) on a box that runs none of them: after the watchdog's
    first pass and a review, Home is green for what it looked at and lists them as
    not configured with the line that turns each on or off; the Playbook lists
    their cards as not applicable; no URL anywhere is shown escaped."""
    # only redis is declared (on a port where nothing listens); the rest are the seed's defaults
    env = {"SPARKOPS_UI_PORT": str(free_port()), "SPARKOPS_SERVICES": json.dumps({"redis": {"port": free_port()}})}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def first_checks(ctx):
        heartbeat(ctx)
        assert run_job(ctx, "watchdog").ok and run_job(ctx, "review").ok
        return {name: s.status for name, s in services.load_states(ctx.store.ops, ctx.host).items()}
    states = with_ctx(app_env, first_checks, **env)
    absent = {name for name, status in states.items() if status == "not_configured"}
    assert {"ui", "redis"} - absent == {"redis"}  # redis is declared (its port): down, not absent
    home = run_page("Home.py")
    assert not home.exception
    [red] = texts(home.error)
    assert "service redis is down" in red.replace("\\", "") and "vllm" not in red
    [not_here] = [c for c in texts(home.caption) if c.startswith("**Not configured on this host**")]
    assert "ui: not found on this host" in not_here.replace("\\", "")
    assert "`[services.ui] enabled = false`" in not_here

    playbook = run_page("pages/6_Playbook.py")
    assert not playbook.exception
    [listed] = [m for m in texts(playbook.markdown) if m.startswith("**Not applicable on this host**")]
    assert "Traefik" in listed and "Kanban board shows stale data" in listed
    for at in (home, playbook, run_page("pages/5_Jobs.py"), run_page("pages/7_Events.py")):
        assert not [t for t in every_text(at) if ESCAPED_URL.search(t)]


def test_home_is_green_only_for_what_it_looked_at(app_env, monkeypatch):
    declared = json.dumps({**SERVICES, "gateway": {"enabled": False}, "ui": {"url": "http://127.0.0.1:1/x"}})
    monkeypatch.setenv("SPARKOPS_SERVICES", declared)

    def all_checked(ctx):
        heartbeat(ctx)
        assert run_job(ctx, "review").ok
        service(ctx, "ui", "up", "HTTP 200 from http://127.0.0.1:1/x")
    with_ctx(app_env, all_checked, SPARKOPS_SERVICES=declared)
    at = run_page("Home.py")
    assert not at.exception and not at.error and not [i for i in at.info if i.icon == "⏳"]
    [green] = texts(at.success)
    assert green.startswith("All green on gb10-test: services (ui), the jobs runner")
    assert "the disks, the sprint." in green


# -- Jobs ----------------------------------------------------------------------------------------


def test_every_run_now_button_runs_its_job_and_is_audited(app_env):
    empty_board(app_env)
    with_ctx(app_env, heartbeat)
    at = run_page("pages/5_Jobs.py")
    names = list(registry.all_jobs())
    assert [b.label for b in at.button] == ["Run now"] * len(names)
    for name in names:
        at.button(key=f"jobs.run.{name}").click().run()
        assert not at.exception, name
    assert not at.error, texts(at.error)
    shown = texts(at.success)
    assert len(shown) == len(names) and all(any(s.startswith(f"{n}: ") for s in shown) for n in names)
    assert audit_rows(app_env) == [("ui@", f"job.{n}", n, "ok") for n in names]

    def recorded(ctx):
        with ctx.store.ops.read() as conn:
            return conn.execute(select(ops_job_runs.c.job, ops_job_runs.c.trigger)
                                .order_by(ops_job_runs.c.id)).all()
    assert with_ctx(app_env, recorded) == [(n, "ui") for n in names]
    # the page shows the runs it just made, and the next one (the runner is alive)
    lines = [m.value for m in at.markdown if m.value.startswith(("✅ ok at ", "⚠️ ran, found "))]
    assert len(lines) == len(names)
    # the watchdog ran fine but found the gateway (declared, on port 1) down: not "ok"
    assert [line for line in lines if line.startswith("⚠️")] == [
        next(m.value for m in at.markdown if m.value.startswith("⚠️ ran, found 1 problem at "))]
    # the next run of each job, except those with nothing to do here (no remote host set)
    unset = {"push": "remote.push_host", "tunnel": "remote.tunnel_host", "remote-gpu": "remote.gpu_hosts"}
    assert sum(m.value.startswith("Next: \\~") for m in at.markdown) == len(names) - len(unset)
    for needs in unset.values():
        assert f"Next: not configured: nothing to do until {needs} is set".replace(".", "\\.").replace(
            "_", "\\_") in [m.value for m in at.markdown]
    assert {m.label: m.value for m in at.metric}["State"] == "alive"


def test_a_failing_job_shows_an_error_box(app_env, monkeypatch):
    empty_board(app_env)
    monkeypatch.setenv("SPARKOPS_DISPATCH_MODE", "hermes")
    monkeypatch.setenv("SPARKOPS_DISPATCH_HERMES_ARGV", json.dumps(["/nonexistent/hermes"]))
    at = run_page("pages/5_Jobs.py")
    assert "the jobs runner has never run on gb10-test" in at.error[0].value
    at.button(key="jobs.run.dispatch").click().run()
    assert not at.exception
    [failed] = [e.value for e in at.error if e.value.startswith("dispatch:")]
    assert "failed" in failed
    assert audit_rows(app_env) == [("ui@", "job.dispatch", "dispatch", "refused")]


# -- Playbook -------------------------------------------------------------------------------------


def test_the_reclaim_fix_needs_the_confirmation_and_then_closes_the_dead_run(app_env):
    def dead_claim(ctx):
        ago = int(time.time()) - 3600  # claimed an hour ago; its worker never started
        task = board.create_task(ctx.store.board, "stuck", now=ago)
        board.claim_next(ctx.store.board, host=ctx.host, lock=f"{ctx.host}:999999", capacity=1, now=ago)
        return task
    task = with_ctx(app_env, dead_claim)

    def open_runs(ctx):
        return runs.count_open_runs(ctx.store.board, ctx.host)

    at = run_page("pages/6_Playbook.py")
    assert not at.exception
    card = next(c for c in at.markdown if "At capacity" in c.value)
    assert card is not None and ":red-badge[Happening now: yes]" in texts(at.markdown)
    assert any(f"would close {task} run 1 as spawn_failed" in c.value for c in at.code)
    assert at.button(key="playbook.apply.0.reclaim").disabled  # not without the confirmation
    assert with_ctx(app_env, open_runs) == 1 and audit_rows(app_env) == []  # diagnosing changed nothing

    at.checkbox(key="playbook.confirm.0.reclaim").check().run()
    assert not at.button(key="playbook.apply.0.reclaim").disabled
    at.button(key="playbook.apply.0.reclaim").click().run()
    assert not at.exception
    assert with_ctx(app_env, open_runs) == 0
    assert with_ctx(app_env, lambda ctx: queries.get_task(ctx.store.board, task)["status"]) == "ready"
    assert audit_rows(app_env) == [("ui@", "job.reclaim", "reclaim", "ok")]
    assert any(f"reclaim: {task} run 1: spawn_failed" in s.value for s in at.success)
    assert at.checkbox(key="playbook.confirm.0.reclaim").value is False  # confirm again next time


def test_a_refused_fix_shows_an_error_box_and_is_audited(app_env):
    empty_board(app_env)
    with_ctx(app_env, lambda ctx: service(ctx, "gateway", "down", "Connection refused"))
    at = run_page("pages/6_Playbook.py")
    [index] = [i for i, c in enumerate(at.checkbox) if c.key.endswith(".restart.gateway")]
    at.checkbox[index].check().run()
    at.button(key=at.checkbox[index].key.replace(".confirm.", ".apply.")).click().run()
    assert not at.exception
    assert any("services.gateway.restart_argv is not configured" in e.value for e in at.error)
    assert audit_rows(app_env) == [("ui@", "service.restart", "gateway", "refused")]


# -- Events and alerts ------------------------------------------------------------------------------


@pytest.fixture
def downloads(monkeypatch):
    """The files the page handed to st.download_button, by file name."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    served: dict[str, bytes] = {}
    original = MemoryMediaFileStorage.load_and_get_id

    def spy(self, path_or_data, mimetype, kind, filename=None):
        if filename:
            served[filename] = path_or_data
        return original(self, path_or_data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", spy)
    return served


def test_events_tabs_filter_and_download_csv_that_parses_back(app_env, downloads):
    busy_board(app_env)
    at = run_page("pages/7_Events.py")
    assert not at.exception
    assert [t.label for t in at.tabs] == ["Task events", "Job runs", "Alerts", "Audit"]
    assert sorted(downloads) == ["alerts.csv", "audit.csv", "job_runs.csv", "task_events.csv"]

    def frame(name: str) -> pd.DataFrame:
        return pd.read_csv(io.BytesIO(downloads[name]), dtype=str, keep_default_na=False)

    runs = frame("job_runs.csv")
    assert sorted(runs["job"]) == ["boom", "export", "promote", "promote", "review"]
    assert runs.loc[runs["job"] == "boom", "error"].item() == "ZeroDivisionError: division by zero"
    alerts_csv = frame("alerts.csv")
    assert alerts_csv["message"].tolist() == ["'" + FORMULA]  # a formula never runs in a spreadsheet
    assert alerts_csv["outcome"].tolist() == ["logged"]
    assert frame("audit.csv")[["who", "action", "result"]].values.tolist() == [["cli:tester", "job.promote", "ok"]]
    events = frame("task_events.csv")
    assert {"created", "claimed", "completed", "blocked"} <= set(events["event"])

    # filters: a job and an outcome, a kind, text; the downloads follow them
    at.multiselect(key="runs.outcomes").select("error").run()
    assert frame("job_runs.csv")["job"].tolist() == ["boom"]
    at.multiselect(key="events.kinds").select("blocked").run()
    assert frame("task_events.csv")["event"].tolist() == ["blocked"]
    at.text_input(key="alerts.text").input("no such thing").run()
    assert frame("alerts.csv").empty
    at.multiselect(key="audit.results").select("refused").run()
    assert frame("audit.csv").empty
    assert not at.exception


def test_the_events_page_shows_an_error_box_when_the_board_is_not_a_database(app_env):
    (app_env / "data").mkdir()
    (app_env / "data" / "kanban.db").write_text("not a database\n")
    for path in PAGES[1:]:
        at = run_page(path)
        assert not at.exception
        assert "is not a SQLite database" in at.error[0].value


# -- the pure helpers ------------------------------------------------------------------------------


def test_runner_status_and_next_run():
    from sparkops.ui import data, jobs_view

    row = {"host": "h", "pid": 7, "started_at": 1000, "heartbeat_at": 1030, "stopped_at": None,
           "info": json.dumps({"jobs": {"review": 600.0}, "mode": "native"})}
    alive = data.runner_status([row], "h", 1120)
    assert alive.alive and alive.heartbeat_age == 90 and alive.intervals == {"review": 600.0}
    assert data.runner_status([row], "h", 1121).state == "down"
    assert data.runner_status([{**row, "stopped_at": 1030}], "h", 1031).state == "stopped"
    assert data.runner_status([row], "other", 1031).problem.startswith("the jobs runner has never run")
    # next run: the first base + k * interval after now; none while the runner is not alive
    assert jobs_view.next_run(1100, 60, alive, 1120) == 1160
    assert jobs_view.next_run(None, 60, alive, 1120) == 1180  # from the runner's start: after now
    assert jobs_view.next_run(1100, 60, data.runner_status([row], "h", 2000), 2000) is None


def test_red_items_name_zombies_disks_and_only_fresh_stuck_signals():
    from sparkops.meters import gpu
    from sparkops.ui import data, home_view
    from sparkops.watch import zombie_rule
    from sparkops.watch.disk import DiskUsage

    runner = data.RunnerStatus("h", "alive", pid=1, started_at=0, heartbeat_at=100, heartbeat_age=0)
    zombie = zombie_rule.Zombie(pid=42, device_index=0, used_memory_mb=110 * 1024, command_line="python -m vllm.x",
                                reason="holds 110.0 GB", killable=True)
    stuck = {"ready_idle": {"active": True, "ready_tasks": 2, "idle_seconds": 7200},
             "over_max_runs": {"active": False}, "no_completion": {"active": False}}
    snapshot = gpu.GpuSnapshot(False, "no NVML here")

    def health(review_at: int):
        return home_view.assemble_health(
            now=10_000, host="h", specs=[], states={}, runner=runner, capacity_used=1, capacity_total=1,
            snapshot=snapshot, zombies=[zombie],
            disks=[DiskUsage(Path("/data"), Path("/"), 100, 91, 9, 91.0)], disk_threshold=85,
            review={"now": review_at, "stuck": stuck}, review_interval=600)

    red = health(review_at=9_000).red()
    assert red[0].startswith("GPU zombie: would kill pid 42")
    assert red[1] == "disk /data is 91% full (disk.threshold_percent = 85)"
    assert red[2] == "stuck: 2 ready tasks but no run started for 2h00m"
    assert len(health(review_at=1_000).red()) == 2  # a review that old does not speak for now
    assert health(review_at=9_000).gpu_summary == "no NVML: no NVML here"


def test_csv_escapes_formulas_and_filters_keep_choices():
    from sparkops.ui import events_view

    frame = pd.DataFrame({"a": ["=1+1", "+x", "-y", "@z", "plain", "'q"], "n": [1, 2, 3, 4, 5, 6]})
    back = pd.read_csv(io.BytesIO(events_view.csv_bytes(frame)), dtype=str)
    assert back["a"].tolist() == ["'=1+1", "'+x", "'-y", "'@z", "plain", "''q"]
    assert events_view.filter_text(frame, "PLAIN")["n"].tolist() == [5]
    assert events_view.filter_in(frame, "a", [])["n"].tolist() == [1, 2, 3, 4, 5, 6]
    assert events_view.options(["b", "a"], ["c", ""], ["zz"]) == ["a", "b", "c", "zz"]
    assert events_view.since_epoch("last hour", at=7290) == 3660  # to the minute
    assert events_view.since_epoch("all time", at=7290) is None


def test_fleet_page_shows_each_host_its_runs_and_the_hosts_that_are_down(app_env):
    def fill(ctx: JobContext) -> None:
        heartbeat(ctx)  # this host's runner, alive
        with ctx.store.ops.write() as conn:
            conn.execute(ops_hosts.insert().values(
                host="spark-2", pid=7, boot_id="b", version="0.7.0", capacity=2, started_at=1,
                heartbeat_at=int(time.time()) - 3600,
                info=json.dumps({"labels": ["gpu=gb10"], "gpu": {"devices": [{"name": "NVIDIA GB10",
                                                                             "unified": True}]}})))
        task_id = board.create_task(ctx.store.board, "held by spark-2")
        board.claim(ctx.store.board, task_id, lock="spark-2:7")

    with_ctx(app_env, fill)
    at = run_page("pages/8_Fleet.py")
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Hosts up"] == "1/2" and metrics["Hosts down"] == "1" and metrics["Runs open"] == "1"
    [down] = [e.value.replace("\\", "") for e in at.error]  # markdown-escaped
    assert "spark-2" in down and "1 open run(s) are reclaimed by the other hosts" in down
    frame = at.dataframe[0].value
    row = frame[frame["host"] == "spark-2"].iloc[0]
    assert row["state"] == "🔴 down" and row["runs"] == "1/2"
    assert row["GPUs"] == "NVIDIA GB10 (unified)" and row["labels"] == "gpu=gb10"
    assert [e.label for e in at.expander] == ["spark-2 · 1 run"]
    assert list(at.dataframe[1].value["title"]) == ["held by spark-2"]
