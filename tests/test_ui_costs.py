"""What runs spent, where people look: the Board's cards and task detail, and the
Sprint review's "Where the GPU went", rendered with AppTest over a real SQLite board
and ops database whose usage was kept the way the shims keep it (samples through
:mod:`sparkops.meters.ledger`, an agent's own report); plus the sums themselves
(:mod:`sparkops.sprint.costs`)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import make_settings, run_cli, run_page

from sparkops.board import model
from sparkops.board import transitions as board
from sparkops.meters import ledger
from sparkops.meters.reported import Reported
from sparkops.meters.sample import Sample
from sparkops.meters.spend import Prices
from sparkops.sprint import costs
from sparkops.sprint.export import read_csv_rows
from sparkops.storage.store import open_store

BOARD, REVIEW = "pages/1_Board.py", "pages/4_Sprint_review.py"
OK = {"vllm": "ok", "gpu": "ok"}


def sample(at: float, prompt: float, generated: float, energy_j: float, util: float = 50.0) -> Sample:
    return Sample(at=at, prompt_tokens=prompt, generation_tokens=generated, requests=prompt / 100,
                  energy_j=energy_j, gpu_util_pct=util, sources=OK)


def metered_run(store, task_id: str, *, at: float, prompt: float, generated: float, wh: float,
                outcome: str | None) -> int:
    """A run of ``task_id`` from ``at`` for 10 minutes that used these figures (one
    run at a time: exact), ended with ``outcome`` (None: still running)."""
    run_id = board.claim(store.board, task_id, lock="gb10:1", now=at).run_id
    base = 10_000.0 * run_id  # the host's counters only grow
    ledger.record(store.ops, run_id=run_id, task_id=task_id, host="gb10", sample=sample(at, base, base, base))
    ledger.record(store.ops, run_id=run_id, task_id=task_id, host="gb10", ended=outcome is not None,
                  sample=sample(at + 600, base + prompt, base + generated, base + wh * 3600))
    if outcome == "completed":
        board.complete(store.board, task_id, run_id=run_id, summary="ok", now=at + 600)
    elif outcome == "crashed":
        board.fail(store.board, task_id, run_id=run_id, outcome=model.Outcome.CRASHED, error="died",
                   failure_limit=5, now=at + 600)
    return run_id


@pytest.fixture
def spent_board(app_env: Path, monkeypatch):
    """A priced sprint: ``api`` completed after a crashed try (both metered),
    ``docs`` completed with its agent's own report, ``idle`` never metered."""
    monkeypatch.setenv("SPARKOPS_USAGE_ENERGY_PRICE_PER_KWH", "0.30")
    monkeypatch.setenv("SPARKOPS_USAGE_API_PRICE_PER_MILLION_PROMPT_TOKENS", "3")
    monkeypatch.setenv("SPARKOPS_USAGE_API_PRICE_PER_MILLION_GENERATION_TOKENS", "15")
    monkeypatch.setenv("SPARKOPS_USAGE_CURRENCY", "EUR")
    settings = make_settings(app_env)
    store = open_store(settings, create=True)
    now = time.time()
    ids = {
        "api": board.create_task(store.board, "[P1] API", assignee="backend", now=now - 9000),
        "docs": board.create_task(store.board, "[P2] Docs", assignee="writer", now=now - 9000),
        "idle": board.create_task(store.board, "[P2] Idle", assignee="writer", now=now - 9000),
    }
    crashed = metered_run(store, ids["api"], at=now - 8000, prompt=20_000, generated=2_000, wh=40, outcome="crashed")
    done = metered_run(store, ids["api"], at=now - 6000, prompt=30_000, generated=3_000, wh=60, outcome="completed")
    docs = metered_run(store, ids["docs"], at=now - 4000, prompt=1_000, generated=500, wh=5, outcome=None)
    board.complete(store.board, ids["docs"], run_id=docs, summary="ok", now=now - 3000)
    ledger.report(store.ops, run_id=docs, task_id=ids["docs"], host="gb10",
                  reported=Reported(prompt_tokens=4_000, generation_tokens=1_000, cost=0.5, currency="EUR"))
    ids.update(crashed=str(crashed), done=str(done), docs_run=str(docs))
    store.dispose()
    return ids


def test_the_sums_of_a_sprint(spent_board, app_env):
    store = open_store(make_settings(app_env))
    try:
        prices = Prices(per_kwh=0.30, prompt_per_million=3, generation_per_million=15, currency="EUR")
        phase_of = {spent_board["api"]: "P1", spent_board["docs"]: "P2", spent_board["idle"]: "P2"}
        found = costs.compute(store.board, store.ops, prices, phase_of=phase_of, since=time.time() - 86400)
        spent = costs.task_spend(store.ops, prices, [spent_board["api"], spent_board["idle"]])
    finally:
        store.dispose()
    t = found.total
    assert (t.runs, t.metered, t.reported, t.estimated) == (3, 3, 1, 0)
    # the docs run's agent counted its own tokens: they win over the measured ones
    assert (t.prompt_tokens, t.generation_tokens) == (20_000 + 30_000 + 4_000, 2_000 + 3_000 + 1_000)
    assert t.energy_wh == pytest.approx(105) and t.energy_cost == pytest.approx(0.105 * 0.30)
    assert t.paid == 0.5 and t.cost == pytest.approx(0.105 * 0.30 + 0.5)
    assert t.api_cost == pytest.approx(54_000 * 3 / 1e6 + 6_000 * 15 / 1e6)
    by_outcome = costs.by(found, "outcome").set_index("outcome")
    assert by_outcome.loc["crashed", "energy_wh"] == pytest.approx(40)  # what the failed try wasted
    assert by_outcome.loc["crashed", "tokens"] == 22_000
    assert costs.by(found, "host").set_index("host").loc["gb10", "runs"] == 3
    by_phase = costs.by(found, "phase").set_index("phase")
    assert by_phase.loc["P1", "runs"] == 2 and by_phase.loc["P1", "tokens"] == 55_000
    top = costs.most_expensive(found)
    assert list(top["task_id"]) == [spent_board["docs"], spent_board["api"]]  # by cost: the paid API wins
    per_task = costs.tokens_per_completed_task(found)
    assert per_task["tasks"].sum() == 2 and per_task["tokens"].sum() == 55_000 + 5_000
    assert spent[spent_board["api"]].tokens == 55_000 and spent[spent_board["api"]].metered == 2
    assert spent_board["idle"] not in spent  # never metered: absent, not zero


def test_cards_and_detail_show_what_a_task_spent(spent_board, app_env):
    at = run_page(BOARD)
    assert not at.exception, [e.value for e in at.exception]
    cards = {m.value.split("**")[1]: m.value for m in at.markdown if m.value.startswith("**")}
    assert "🪙 55k tokens · ⚡ 100.0 Wh · 0.030 EUR" in cards[r"\[P1\] API"]
    assert "🪙 5.0k tokens · ⚡ 5.0 Wh · 0.501 EUR" in cards[r"\[P2\] Docs"]
    assert "🪙" not in cards[r"\[P2\] Idle"]

    at.button(key=f"open_{spent_board['api']}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    [usage] = [m.value for m in at.markdown if m.value.startswith("**Usage**")]
    assert usage.startswith("**Usage** (2 metered runs (retries included)): 50,000 prompt + 5,000 generated "
                            "tokens in 500 requests · energy 100.0 Wh · GPU busy 10m")
    assert "cost 0.030 EUR" in usage and "on a hosted API 0.225 EUR" in usage
    runs = at.dataframe[0].value.set_index("run")
    assert runs.loc[int(spent_board["crashed"]), "tokens"] == 22_000
    assert runs.loc[int(spent_board["done"]), "energy (Wh)"] == pytest.approx(60)

    at.button(key="board_close").click().run()
    at.button(key=f"open_{spent_board['idle']}").click().run()
    assert not [m for m in at.markdown if m.value.startswith("**Usage**")]  # never ran: nothing to say


def test_the_sprint_review_says_where_the_gpu_went(spent_board, app_env, monkeypatch):
    monkeypatch.setenv("SPARKOPS_REVIEW_MODEL_URL", "")
    at = run_page(REVIEW)
    assert not at.exception, [e.value for e in at.exception]
    assert "Where the GPU went" in [s.value for s in at.subheader]
    tiles = {m.label: m.value for m in at.metric}
    assert tiles["Tokens"] == "60k" and tiles["GPU energy"] == "105.0 Wh"
    assert tiles["Cost"] == "0.531 EUR" and tiles["On a hosted API"] == "0.252 EUR"
    assert tiles["GPU busy"] == "0.25 h"
    tables = [d.value for d in at.dataframe]
    by_phase = next(t for t in tables if "phase" in t.columns and "energy (Wh)" in t.columns).set_index("phase")
    assert by_phase.loc["P1", "tokens"] == 55_000 and by_phase.loc["P1", "runs"] == 2
    assert "cost (EUR)" in by_phase.columns and "on a hosted API (EUR)" in by_phase.columns
    top = next(t for t in tables if "task_id" in t.columns)
    assert list(top["task_id"]) == [spent_board["docs"], spent_board["api"]]

    at.radio(key="review_costs_by").set_value("outcome").run()
    by_outcome = next(d.value for d in at.dataframe if "outcome" in d.value.columns).set_index("outcome")
    assert by_outcome.loc["crashed", "energy (Wh)"] == pytest.approx(40)


def test_unmeasured_is_said_never_zero(app_env, monkeypatch):
    monkeypatch.setenv("SPARKOPS_REVIEW_MODEL_URL", "")
    store = open_store(make_settings(app_env), create=True)
    task_id = board.create_task(store.board, "unmetered")
    run_id = board.claim(store.board, task_id, lock="gb10:1").run_id
    board.complete(store.board, task_id, run_id=run_id, summary="ok")
    store.dispose()
    at = run_page(REVIEW)
    assert any(i.value.startswith("Not measured: no run in the window was metered") for i in at.info)
    assert "Tokens" not in {m.label for m in at.metric}
    at = run_page(BOARD)
    at.button(key=f"open_{task_id}").click().run()
    [usage] = [m.value for m in at.markdown if m.value.startswith("**Usage**")]
    assert usage.startswith("**Usage**: not measured.")


def test_the_reviews_export_downloads_carry_the_figures(spent_board, app_env, monkeypatch, downloads):
    """Export now on the Sprint review, then its runs.csv and tasks.csv downloads: the
    figures come back as they were kept (an unmetered task's cells empty)."""
    monkeypatch.setenv("SPARKOPS_REVIEW_MODEL_URL", "")
    at = run_page(REVIEW)
    at.button[1].click().run()  # Export now
    assert not at.exception and at.success[0].value.startswith("export: ")
    for name in ("runs.csv", "tasks.csv"):
        (app_env / f"downloaded-{name}").write_bytes(downloads[name]())
    runs = {int(r["id"]): r for r in read_csv_rows(app_env / "downloaded-runs.csv")}
    crashed, done, docs = (runs[int(spent_board[k])] for k in ("crashed", "done", "docs_run"))
    assert (crashed["outcome"], crashed["prompt_tokens"], crashed["generation_tokens"]) == (
        "crashed", "20000.0", "2000.0")
    assert float(crashed["energy_wh"]) == pytest.approx(40) and float(done["energy_wh"]) == pytest.approx(60)
    assert (docs["prompt_tokens"], docs["usage_reported"], docs["paid"]) == ("4000.0", "1", "0.5")
    tasks = {r["id"]: r for r in read_csv_rows(app_env / "downloaded-tasks.csv")}
    assert float(tasks[spent_board["api"]]["tokens"]) == 55_000  # both runs, the crashed try included
    assert float(tasks[spent_board["api"]]["cost"]) == pytest.approx(0.1 * 0.30)
    assert tasks[spent_board["idle"]]["tokens"] == "" and tasks[spent_board["idle"]]["energy_wh"] == ""


def test_the_command_line_says_the_same(spent_board, app_env):
    """`sparkops task show` and `sparkops costs`, real subprocesses on the same board."""
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{app_env}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{app_env}/data/sparkops.db",
           "SPARKOPS_USAGE_ENERGY_PRICE_PER_KWH": "0.30", "SPARKOPS_USAGE_CURRENCY": "EUR"}
    shown = run_cli("task", "show", spent_board["api"], cwd=app_env, env=env)
    assert shown.returncode == 0, shown.stderr
    assert ("  usage:     55k tokens (50,000 prompt + 5,000 generated), energy 100.0 Wh, GPU busy 0.17 h, "
            "cost 0.030 EUR (2 metered runs)") in shown.stdout
    as_json = json.loads(run_cli("task", "show", spent_board["api"], "--json", cwd=app_env, env=env).stdout)
    assert as_json["usage"]["task"]["tokens"] == 55_000 and as_json["usage"]["currency"] == "EUR"
    assert as_json["usage"]["runs"][spent_board["crashed"]]["energy_wh"] == pytest.approx(40)
    idle = run_cli("task", "show", spent_board["idle"], cwd=app_env, env=env)
    assert "usage:" not in idle.stdout  # never ran: nothing to say

    costs_out = run_cli("costs", "--by", "outcome", "--json", cwd=app_env, env=env)
    assert costs_out.returncode == 0, costs_out.stderr
    found = json.loads(costs_out.stdout)
    assert found["total"]["tokens"] == 60_000 and found["total"]["metered"] == 3
    crashed = next(r for r in found["rows"] if r["outcome"] == "crashed")
    assert crashed["energy_wh"] == pytest.approx(40) and crashed["tokens"] == 22_000
    assert [r["task_id"] for r in found["most_expensive"]] == [spent_board["docs"], spent_board["api"]]
    words = run_cli("costs", cwd=app_env, env=env)
    assert "60k tokens" in words.stdout and "By phase:" in words.stdout
    bad = run_cli("costs", "--hours", "0", cwd=app_env, env=env)
    assert bad.returncode == 2 and bad.stderr.strip() == "sparkops: error: --hours must be more than 0, got 0"
