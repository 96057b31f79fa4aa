"""The review job: the report (metrics, phases, boundaries, risks) and its narrative
from a local OpenAI-compatible server that answers, is too slow, talks nonsense, or
is not there at all."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import NOW, make_settings
from sqlalchemy import select

from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.jobs.framework import JobContext
from sparkops.meters import ledger
from sparkops.meters.sample import Sample
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_alerts, ops_reports
from sparkops.storage.store import open_store


class ModelServer:
    """A stand-in for vLLM's OpenAI API on 127.0.0.1: ``mode`` is answer | slow | garbage."""

    def __init__(self, mode: str = "answer", delay: float = 0.0):
        self.mode, self.delay, self.requests = mode, delay, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def reply(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self.reply(200, json.dumps({"data": [{"id": "qwen3-vl"}]}).encode())

            def do_POST(self) -> None:  # noqa: N802
                length = int(self.headers.get("Content-Length", 0))
                server.requests.append(json.loads(self.rfile.read(length)))
                if server.mode == "slow":
                    time.sleep(server.delay)
                if server.mode == "garbage":
                    self.reply(200, b"<html>502 bad gateway</html>")
                    return
                self.reply(200, json.dumps({"choices": [{"message": {
                    "role": "assistant", "content": "The sprint is on track; unblock t_x next."}}]}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def model():
    servers = []

    def start(mode="answer", delay=0.0):
        servers.append(ModelServer(mode, delay))
        return servers[-1]
    yield start
    for s in servers:
        s.close()


def make_ctx(tmp_path, **env):
    settings = make_settings(tmp_path, SPARKOPS_REVIEW_REPORTS_DIR=str(tmp_path / "reports"), **env)
    store = open_store(settings, create=True, now=NOW)
    return JobContext.create(settings, store)


def sprint(ctx):
    db = ctx.store.board
    a = board.create_task(db, "[P1] design", now=NOW - 7200)
    b = board.create_task(db, "[P1] build", now=NOW - 7000)
    c = board.create_task(db, "[P2] ship", parents=[b], now=NOW - 6000)
    board.complete(db, a, result="ok", now=NOW - 3600)
    run = board.claim(db, b, lock="h:1", now=NOW - 3000).run_id
    board.complete(db, b, run_id=run, result="ok", now=NOW - 1800)
    return a, b, c


def test_the_report_with_a_narrative_from_the_local_model(tmp_path, model):
    server = model("answer")
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL=server.url)
    sprint(ctx)
    result = run_job(ctx, "review", now=NOW)
    assert result.ok, result.error
    path = tmp_path / "reports" / result.details["path"].rsplit("/", 1)[1]
    text = path.read_text()
    assert text.startswith("# Sprint review, ")
    assert "| P1 | 2 | 2 | 0 |" in text  # the phase table
    assert "- P1 finished at" in text  # the boundary since the last review
    assert "The sprint is on track" in text and result.details["narrative"] == "ok"
    [request] = server.requests
    assert request["model"] == "qwen3-vl"  # asked /v1/models for it
    assert "Sprint review" in request["messages"][0]["content"]
    with ctx.store.ops.read() as conn:
        [row] = conn.execute(select(ops_reports)).all()
        alerts = conn.execute(select(ops_alerts.c.key, ops_alerts.c.level)).all()
    assert row.markdown == text and row.narrative == "ok"
    assert ("phase:P1", "info") in alerts

    second = run_job(ctx, "review", now=NOW + 600)  # nothing new: no boundary again
    text2 = (tmp_path / "reports" / second.details["path"].rsplit("/", 1)[1]).read_text()
    assert "## Phase boundaries since the last review\n\n- none" in text2


@pytest.mark.parametrize("mode, status, fragment", [
    ("slow", "timed out", "did not answer within 0.5s"),
    ("garbage", "garbage", "not a chat completion"),
])
def test_a_slow_or_confused_model_leaves_the_deterministic_report(tmp_path, model, mode, status, fragment):
    server = model(mode, delay=3)
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL=server.url, SPARKOPS_REVIEW_MODEL="m",
                   SPARKOPS_REVIEW_MODEL_TIMEOUT_SECONDS="0.5")
    sprint(ctx)
    started = time.monotonic()
    result = run_job(ctx, "review", now=NOW)
    assert time.monotonic() - started < 2.5
    assert result.ok and result.details["narrative"] == status
    text = (tmp_path / "reports" / result.details["path"].rsplit("/", 1)[1]).read_text()
    assert "## Summary" in text and "_No narrative: " in text and fragment in text


def test_no_model_server_at_all(tmp_path):
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL="http://127.0.0.1:9/v1/chat/completions",
                   SPARKOPS_REVIEW_MODEL="m")
    sprint(ctx)
    result = run_job(ctx, "review", now=NOW)
    assert result.ok and result.details["narrative"] == "unreachable"
    off = make_ctx(tmp_path / "off", SPARKOPS_REVIEW_MODEL_URL="")
    assert run_job(off, "review", now=NOW).details["narrative"] == "off"


def test_an_empty_board_still_gets_a_report(tmp_path):
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL="")
    result = run_job(ctx, "review", now=NOW)
    assert result.ok, result.error
    assert "## Phases" in (tmp_path / "reports" / result.details["path"].rsplit("/", 1)[1]).read_text()


def test_promotion_of_the_next_phase_when_configured(tmp_path):
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL="", SPARKOPS_REVIEW_PROMOTE_NEXT_PHASE="true")
    first = board.create_task(ctx.store.board, "[P1] first", now=NOW - 100)
    parked = board.create_task(ctx.store.board, "[P2] parked", now=NOW - 100)
    board.block(ctx.store.board, parked, kind="dependency", reason="after P1", now=NOW - 90)
    board.complete(ctx.store.board, first, result="ok", now=NOW - 50)
    result = run_job(ctx, "review", now=NOW)
    assert result.details["boundaries"][0]["promoted"] == [parked]


def test_the_report_says_what_the_window_cost(tmp_path):
    """Its cost section: the window's runs' tokens and energy by phase and outcome, the
    costliest tasks by id; a board whose runs were never metered says so."""
    ctx = make_ctx(tmp_path, SPARKOPS_REVIEW_MODEL_URL="", SPARKOPS_USAGE_ENERGY_PRICE_PER_KWH="0.5")
    db, ops = ctx.store.board, ctx.store.ops
    unmetered = run_job(ctx, "review", now=NOW)
    assert "## Cost\n\n- Runs in the window: 0; not measured" in report_markdown(ctx, unmetered)

    task = board.create_task(db, "[P1] build", now=NOW - 7000)
    for n, (outcome, wh) in enumerate((("crashed", 30.0), ("completed", 70.0))):
        at = NOW - 6000 + n * 2000
        run = board.claim(db, task, lock="h:1", now=at).run_id
        base = 1_000_000.0 * (n + 1)
        ledger.record(ops, run_id=run, task_id=task, host="h", sample=Sample(
            at=at, prompt_tokens=base, energy_j=base, sources={"vllm": "ok", "gpu": "ok"}))
        ledger.record(ops, run_id=run, task_id=task, host="h", ended=True, sample=Sample(
            at=at + 900, prompt_tokens=base + 10_000, energy_j=base + wh * 3600, sources={"vllm": "ok", "gpu": "ok"}))
        if outcome == "crashed":
            board.fail(db, task, run_id=run, outcome=Outcome.CRASHED, error="x", failure_limit=5, now=at + 900)
        else:
            board.complete(db, task, run_id=run, result="ok", now=at + 900)
    markdown = report_markdown(ctx, run_job(ctx, "review", now=NOW))
    cost = markdown.split("## Cost\n\n", 1)[1].split("\n## ", 1)[0]
    assert cost.startswith("- Runs in the window: 2; 20k tokens (20,000 prompt + not measured generated), "
                           "energy 100.0 Wh, GPU busy not measured, cost 0.050 USD (2 metered runs)")
    assert "| P1 | 2 | 20k tokens | 100.0 Wh | 0.050 USD |" in cost
    assert "| crashed | 1 | 10k tokens | 30.0 Wh | 0.015 USD |" in cost  # what the failed try wasted
    assert f"Costliest tasks: {task} (20k tokens, 100.0 Wh)" in cost


def report_markdown(ctx, result) -> str:
    assert result.ok, result.error
    with ctx.store.ops.read() as conn:
        return conn.execute(select(ops_reports.c.markdown).where(
            ops_reports.c.id == result.details["report_id"])).scalar_one()
