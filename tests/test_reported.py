"""Usage an agent reports itself: the shapes hosted agents write (Claude Code, Codex,
OpenAI, SparkOps' own), every bad figure refused with its name before anything is
written, and ``sparkops task complete|block --usage-json`` keeping it for the run
(the direct path, a real subprocess on a real SQLite board; the shim's path is in
tests/test_meters.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_settings, run_cli

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.errors import InvalidInput
from sparkops.meters import ledger
from sparkops.meters.reported import Reported, of_arguments, parse
from sparkops.storage.store import open_store

#: Claude Code's result message (``claude -p --output-format json``), trimmed.
CLAUDE_RESULT = {"type": "result", "subtype": "success", "total_cost_usd": 0.1834,
                 "usage": {"input_tokens": 1200, "cache_creation_input_tokens": 300,
                           "cache_read_input_tokens": 4500, "output_tokens": 880}}
#: Codex's ``turn.completed`` event (``codex exec --json``): cached tokens are inside input_tokens.
CODEX_TURN = {"type": "turn.completed", "usage": {"input_tokens": 9000, "cached_input_tokens": 6000,
                                                  "output_tokens": 700}}
OPENAI_REPLY = {"model": "gpt-x", "usage": {"prompt_tokens": 51, "completion_tokens": 7, "total_tokens": 58}}


def test_the_shapes_agents_write():
    assert parse(CLAUDE_RESULT, where="w") == Reported(prompt_tokens=6000, generation_tokens=880, cost=0.1834,
                                                       currency="USD")
    assert parse(CODEX_TURN, where="w") == Reported(prompt_tokens=9000, generation_tokens=700)
    assert parse(OPENAI_REPLY, where="w") == Reported(prompt_tokens=51, generation_tokens=7, model="gpt-x")
    own = {"prompt_tokens": 10, "generation_tokens": 2, "cost": 1.5, "currency": "EUR"}
    assert parse(own, where="w") == Reported(prompt_tokens=10, generation_tokens=2, cost=1.5, currency="EUR")
    assert Reported.from_dict(parse(own, where="w").as_dict()) == parse(own, where="w")


@pytest.mark.parametrize("data, named", [
    ({"prompt_tokens": -1}, "prompt_tokens must be a number of at least 0, got -1"),
    ({"usage": {"output_tokens": "many"}}, "output_tokens must be a number of at least 0, got 'many'"),
    ({"cost": True}, "cost must be a number of at least 0, got True"),
    ({"prompt_tokens": 1, "model": "x\n[evil](http://e)"}, "model must be a short line of text"),
    ({"tokens": 5}, "has no token counts or cost"),
    ([1, 2], "must be a JSON object"),
])
def test_a_bad_figure_is_refused_by_name(data, named):
    with pytest.raises(InvalidInput, match=named.replace("[", r"\[").replace("(", r"\(")):
        parse(data, where="the report")


def test_flags_win_over_the_file(tmp_path: Path):
    usage_file = tmp_path / "usage.json"
    usage_file.write_text(json.dumps(CLAUDE_RESULT))
    assert of_arguments(str(usage_file), generation_tokens=5) == Reported(
        prompt_tokens=6000, generation_tokens=5, cost=0.1834, currency="USD")
    assert of_arguments(None) is None
    with pytest.raises(InvalidInput, match="--usage-json .*not JSON"):
        (tmp_path / "bad.json").write_text("{nope")
        of_arguments(str(tmp_path / "bad.json"))
    with pytest.raises(InvalidInput, match="cannot read"):
        of_arguments(str(tmp_path / "missing.json"))


@pytest.fixture
def running(tmp_path: Path):
    """A task running as run R on a real SQLite board, and the CLI's environment."""
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    store = open_store(make_settings(tmp_path), create=True)
    task_id = board.create_task(store.board, "priced work")
    run_id = board.claim(store.board, task_id, lock="elsewhere:1").run_id
    yield store, task_id, run_id, env
    store.dispose()


def test_complete_keeps_the_usage_the_agent_reports(running, tmp_path: Path):
    store, task_id, run_id, env = running
    (tmp_path / "result.json").write_text(json.dumps(CLAUDE_RESULT))
    done = run_cli("task", "complete", task_id, "--run", str(run_id), "--usage-json", "result.json",
                   cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    kept = ledger.of_runs(store.ops, [run_id])[run_id]
    assert kept.reported == Reported(prompt_tokens=6000, generation_tokens=880, cost=0.1834, currency="USD")
    assert kept.prompt_tokens is None and kept.prompt == 6000 and kept.tokens == 6880  # nothing measured here


def test_block_with_flags_keeps_them(running, tmp_path: Path):
    store, task_id, run_id, env = running
    done = run_cli("task", "block", task_id, "needs", "a", "key", "--run", str(run_id), "--prompt-tokens", "300",
                   "--cost", "0.02", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert ledger.of_runs(store.ops, [run_id])[run_id].reported == Reported(prompt_tokens=300, cost=0.02)


def test_a_bad_usage_report_changes_nothing(running, tmp_path: Path):
    store, task_id, run_id, env = running
    (tmp_path / "bad.json").write_text(json.dumps({"usage": {"input_tokens": -5}}))
    done = run_cli("task", "complete", task_id, "--run", str(run_id), "--usage-json", "bad.json",
                   cwd=tmp_path, env=env)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "sparkops: error: --usage-json bad.json: input_tokens must be a number of at least 0, got -5"]
    assert queries.get_task(store.board, task_id)["status"] == "running"
    assert ledger.of_runs(store.ops, [run_id]) == {}
