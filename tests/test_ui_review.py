"""The GPU and Sprint review pages, rendered in process with Streamlit's AppTest over
real SQLite files: an empty board, a busy demo sprint and the Hermes-made fixture
board; the GPU through the fake NVML (the one edge faked) with a real process; the
buttons' jobs and their audit rows; the CSV downloads; a failing action."""

from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_settings, run_page
from sqlalchemy import select

from sparkops.board import model
from sparkops.board import transitions as board
from sparkops.jobs.framework import JobContext
from sparkops.meters.nvml_fake import GIB, LIBRARY_NOT_FOUND, NOT_SUPPORTED, Fail, FakeDevice, FakeNvml
from sparkops.runner.registry import run_job
from sparkops.sprint.export import PHASE_COLUMNS, RUN_COLUMNS, TASK_COLUMNS, read_csv_rows
from sparkops.storage.schema import ops_audit, ops_gpu_samples
from sparkops.storage.store import open_store
from sparkops.ui import data
from sparkops.watch import services

FIXTURE_DB = ROOT / "tests" / "fixtures" / "hermes_board.db"
GPU_PAGE, REVIEW_PAGE = "pages/3_GPU.py", "pages/4_Sprint_review.py"
INJECTIONS = ("=HYPERLINK(\"http://evil\") [P3]", "+1+1 [P3]", "-2+3 [P3]", "@SUM(A1) [P3]")
MARKER = "sparkops-ui-review-gpu-worker"


@pytest.fixture
def app_env(app_env, monkeypatch):
    """conftest's app env with no model for the review's narrative and no NVML
    unless a test sets one."""
    monkeypatch.setenv("SPARKOPS_REVIEW_MODEL_URL", "")
    monkeypatch.setattr(data, "NVML", FakeNvml(init_error=LIBRARY_NOT_FOUND))
    return app_env


def job_ctx(tmp_path: Path) -> JobContext:
    settings = make_settings(tmp_path, SPARKOPS_REVIEW_MODEL_URL="")
    return JobContext.create(settings, open_store(settings, create=True))


def busy_board(tmp_path: Path) -> JobContext:
    """The demo sprint, more work done in the last hours (phase P1 finished), a
    task running, a failed run, titles a spreadsheet would run, a review report,
    GPU samples and a vLLM state."""
    from sparkops.demo.sprint import seed_demo

    ctx = job_ctx(tmp_path)
    db, now = ctx.store.board, int(time.time())
    ids = seed_demo(db, now=now)
    api, matching, endpoints = ids[2:5]
    for n, task_id in enumerate((api, matching)):  # api finishes P1 and makes P2 ready
        run = board.claim(db, task_id, lock="demo:0", now=now - 7000 + n * 1200).run_id
        board.complete(db, task_id, run_id=run, summary="done", now=now - 6000 + n * 1800)
    run = board.claim(db, endpoints, lock="demo:0", now=now - 2900).run_id
    board.fail(db, endpoints, run_id=run, outcome=model.Outcome.CRASHED, error="worker crashed",
               failure_limit=3, now=now - 2000)
    board.claim(db, endpoints, lock="demo:0", now=now - 600)  # running now
    for title in INJECTIONS:
        board.create_task(db, title, body="=cmd|' /C calc'!A0", now=now - 1000)
    assert run_job(ctx, "review", now=now - 60).ok
    nvml = FakeNvml(FakeDevice(name="NVIDIA GB10", memory=Fail(NOT_SUPPORTED), compute=[(os.getpid(), 2 * GIB)]))
    for minutes in (50, 40, 30, 20, 10):
        assert run_job(ctx, "gpu-sample", now=now - minutes * 60, nvml=nvml).ok
    services.save_state(ctx.store.ops, ctx.host, services.ServiceState(
        name="vllm", status="up", since=now - 7200, checked_at=now - 30, detail="vLLM healthy: 2 running, 1 waiting",
        memory={"health": "ok", "running": 2.0, "waiting": 1.0, "generation_tokens": 123456.0,
                "models": ["qwen3-coder-30b"]}))
    return ctx


def audit_rows(ctx: JobContext) -> list:
    with ctx.store.ops.read() as conn:
        return conn.execute(select(ops_audit.c.actor, ops_audit.c.action, ops_audit.c.result,
                                   ops_audit.c.message)).all()


def texts(at) -> str:
    """Everything the page wrote as text, in one string."""
    parts = [e.value for kind in ("markdown", "caption", "info", "error", "warning", "success", "subheader")
             for e in getattr(at, kind)]
    parts += [f"{m.label} {m.value}" for m in at.metric]
    return "\n".join(str(p) for p in parts)


def charts(at) -> list:
    return at.get("vega_lite_chart")


def assert_clean(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


# -- rendering on three boards -----------------------------------------------------------------------


def test_pages_on_an_empty_board(app_env):
    job_ctx(app_env).store.dispose()
    gpu_page = run_page(GPU_PAGE)
    assert_clean(gpu_page)
    [info] = [i.value for i in gpu_page.info if "No GPU data" in i.value]
    assert "NVML library not found" in info
    assert "No GPU sample" in texts(gpu_page)
    assert "Not checked yet" in texts(gpu_page)  # the default vLLM service, never checked

    review_page = run_page(REVIEW_PAGE)
    assert_clean(review_page)
    metrics = {m.label: m.value for m in review_page.metric}
    assert metrics["Completed"] == "0" and metrics["Open"] == "0" and metrics["Blocked"] == "0"
    shown = texts(review_page)
    assert "No review report yet" in shown and "No export in" in shown and "No blocked task" in shown
    assert not review_page.download_button


def test_pages_on_a_busy_sprint(app_env, monkeypatch):
    busy_board(app_env)
    monkeypatch.setattr(data, "NVML",
                        FakeNvml(FakeDevice(name="NVIDIA H100 80GB HBM3", compute=[(os.getpid(), GIB)])))

    gpu_page = run_page(GPU_PAGE)
    assert_clean(gpu_page)
    shown = texts(gpu_page)
    assert "GPU 0 · NVIDIA H100 80GB HBM3" in shown and "unified memory" not in shown.lower()
    assert len(charts(gpu_page)) == 2  # utilization and memory history
    assert "🟢 **up**" in shown and "Models: qwen3\\-coder\\-30b" in shown
    vllm = {m.label: m.value for m in gpu_page.metric}
    assert vllm["Running requests"] == "2" and vllm["Waiting requests"] == "1"
    assert vllm["Generation tokens"] == "123,456"

    review_page = run_page(REVIEW_PAGE)
    assert_clean(review_page)
    metrics = {m.label: m.value for m in review_page.metric}
    assert metrics["Completed"] == "4" and metrics["Blocked"] == "1" and metrics["Runs open now"] == "1"
    assert metrics["Failure rate"] == "17%"  # one crash among the 6 runs that ended (a block is one)
    frames = {tuple(d.value.columns): d.value for d in review_page.dataframe}
    phase_table = frames[("phase", "total", "done", "archived", "open", "blocked", "running",
                          "last completed", "ETA")]
    assert list(phase_table["phase"])[:3] == ["P1", "P2", "P3"]
    assert phase_table.set_index("phase").loc["P1", "ETA"] == "done"
    assert phase_table.set_index("phase").loc["P2", "ETA"].startswith("in ")
    blocked = frames[("task", "title", "blocked for", "since", "reason")]
    assert "Needs an API key" in blocked["reason"].iloc[0]
    boundary_table = frames[("phase", "finished", "tasks", "last task", "promoted", "recorded")]
    assert list(boundary_table["phase"]) == ["P1"]
    assert len(charts(review_page)) == 5  # burn-up, throughput, lead and cycle time, WIP
    shown = texts(review_page)
    assert "# Sprint review, " in shown and "_No narrative: review.model_url is empty_" in shown

    review_page.selectbox(key="review_window_hours").select(6.0).run()  # the window is kept
    review_page.radio(key="review_throughput_per").set_value("day").run()
    assert_clean(review_page)
    assert review_page.selectbox(key="review_window_hours").value == 6.0
    [completed] = [m for m in review_page.metric if m.label == "Completed"]
    assert completed.help == "Tasks completed in the last 6 hours"


def test_pages_on_the_hermes_board(app_env):
    (app_env / "data").mkdir()
    shutil.copyfile(FIXTURE_DB, app_env / "data" / "kanban.db")  # never the fixture in place
    ctx = job_ctx(app_env)
    assert run_job(ctx, "review").ok
    assert_clean(run_page(GPU_PAGE))
    at = run_page(REVIEW_PAGE)
    assert_clean(at)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Open"] == "6" and metrics["Blocked"] == "1"  # as `hermes kanban stats` counted
    assert "# Sprint review, " in texts(at)


# -- the GPU ---------------------------------------------------------------------------------------


@pytest.fixture
def gpu_worker():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", MARKER])
    yield proc
    proc.kill()
    proc.wait()


def test_gpu_page_shows_unified_memory_and_the_process(app_env, gpu_worker, monkeypatch):
    ctx = job_ctx(app_env)
    gb10 = FakeDevice(name="NVIDIA GB10", memory=Fail(NOT_SUPPORTED), power_mw=Fail(NOT_SUPPORTED),
                      compute=[(gpu_worker.pid, 30 * GIB)])
    monkeypatch.setattr(data, "NVML", FakeNvml(gb10))
    at = run_page(GPU_PAGE)
    assert_clean(at)
    shown = texts(at)
    assert "GPU 0 · NVIDIA GB10 · unified memory" in shown
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Unified memory"].startswith("30.0 of ") and tiles["Power"] == "-"
    [processes] = [d.value for d in at.dataframe]
    [row] = processes.to_dict("records")
    assert row["pid"] == gpu_worker.pid and row["memory (GiB)"] == 30.0 and MARKER in row["command line"]

    at.button[0].click().run()  # Sample now: the same (fake) NVML, stored, audited
    assert_clean(at)
    assert "stored a sample of 1 GPU(s)" in at.success[0].value
    with ctx.store.ops.read() as conn:
        [sample] = conn.execute(select(ops_gpu_samples)).all()
    assert sample.name == "NVIDIA GB10" and sample.unified == 1 and sample.processes == 1
    [(actor, action, result, _)] = audit_rows(ctx)
    assert actor.startswith("ui@") and (action, result) == ("job.gpu-sample", "ok")
    assert len(charts(at)) == 2


def test_gpu_page_without_nvml_shows_why(app_env):
    job_ctx(app_env)
    at = run_page(GPU_PAGE)
    assert_clean(at)
    assert any("No GPU data" in i.value and "NVML library not found" in i.value for i in at.info)
    assert not at.dataframe


# -- buttons and downloads -----------------------------------------------------------------------------


def test_review_buttons_run_their_jobs_and_downloads_are_the_export(app_env, downloads):
    ctx = busy_board(app_env)
    at = run_page(REVIEW_PAGE)
    reports_before = len(at.selectbox[1].options)
    at.button[0].click().run()  # Write a review now
    assert_clean(at)
    assert at.success[0].value.startswith("review: report ")
    assert len(at.selectbox[1].options) == reports_before + 1

    at.button[1].click().run()  # Export now
    assert_clean(at)
    assert at.success[0].value.startswith("export: ")
    assert [(a, r) for _, a, r, _ in audit_rows(ctx)] == [("job.review", "ok"), ("job.export", "ok")]
    assert sorted(downloads) == ["phases.csv", "runs.csv", "tasks.csv"]

    expected = {"tasks.csv": TASK_COLUMNS, "runs.csv": RUN_COLUMNS, "phases.csv": PHASE_COLUMNS}
    for name, columns in expected.items():
        data = downloads[name]()
        assert data == (app_env / "exports" / name).read_bytes()
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))
        assert rows[0] == [c.name for c in columns]
        assert not [cell for row in rows for cell in row if cell[:1] in ("=", "+", "-", "@")]
    tasks = read_csv_rows(app_env / "exports" / "tasks.csv")
    titles = {row["title"] for row in tasks}
    assert set(INJECTIONS) <= titles and len(tasks) == 14
    phases = {row["phase"]: row for row in read_csv_rows(app_env / "exports" / "phases.csv")}
    assert phases["P1"]["done"] == "3" and phases["P1"]["open"] == "0"


def test_a_failing_action_shows_an_error_box(app_env, monkeypatch):
    ctx = job_ctx(app_env)
    (app_env / "not-a-dir").write_text("a file\n")
    monkeypatch.setenv("SPARKOPS_EXPORT_DIR", str(app_env / "not-a-dir" / "exports"))
    at = run_page(REVIEW_PAGE)
    at.button[1].click().run()
    assert not at.exception
    [error] = [e.value for e in at.error]
    assert error.startswith("export: failed") and "not-a-dir" in error
    [(_, action, result, _)] = audit_rows(ctx)
    assert (action, result) == ("job.export", "refused")
