"""The Board and Runs pages, rendered in process with Streamlit's AppTest over real
SQLite boards (empty, a busy demo sprint with running tasks and real run logs, and
the Hermes-made fixture): what they show, their filters, the detail view and every
action button, each checked in the database and in the audit."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, make_settings, run_page

from sparkops.board import queries, runs
from sparkops.board import transitions as board
from sparkops.control import actions
from sparkops.demo.sprint import DEMO_TASKS, seed_demo
from sparkops.engine.runlog import run_log_path
from sparkops.storage.store import Store, open_store

BOARD = "pages/1_Board.py"
RUNS = "pages/2_Runs.py"
FIXTURE_DB = ROOT / "tests" / "fixtures" / "hermes_board.db"
OTHER_HOST = "gpu-box-2"  # a worker that is not on this machine
OTHER_PID = 4242


def open_test_store(tmp_path: Path) -> Store:
    return open_store(make_settings(tmp_path), create=True)


# -- the three boards --------------------------------------------------------------------------


def empty_board(tmp_path: Path) -> dict[str, str]:
    open_test_store(tmp_path).dispose()
    return {}


def busy_board(tmp_path: Path) -> dict[str, str]:
    """The demo sprint with two tasks running: ``api`` claimed on this host with a
    150-line run log, and an added ``bench`` task claimed by a worker on another host."""
    settings = make_settings(tmp_path)
    store = open_store(settings, create=True)
    try:
        ids = dict(zip([t.key for t in DEMO_TASKS], seed_demo(store.board)))
        api = board.claim_next(store.board, host="testhost", lock="testhost:111", capacity=4)
        assert api is not None and api.task_id == ids["api"]
        log = run_log_path(settings, api.task_id, api.run_id)
        log.parent.mkdir(parents=True)
        log.write_text("".join(f"agent line {n}\n" for n in range(1, 151)))
        ids["bench"] = board.create_task(store.board, "[P2] Benchmark the engine on the GPU box",
                                         assignee="integrator", priority=1)
        other = board.claim(store.board, ids["bench"], lock=f"{OTHER_HOST}:99")
        runs.record_process(store.board, ids["bench"], run_id=other.run_id, claim_lock=f"{OTHER_HOST}:99",
                            worker_pid=None, identity={"process": {
                                 "host": OTHER_HOST, "boot_id": "b",
                                 "agent": {"pid": OTHER_PID, "start": 1.0, "pgid": OTHER_PID}}})
        ids["api_run"], ids["bench_run"] = str(api.run_id), str(other.run_id)
        return ids
    finally:
        store.dispose()


def hermes_board(tmp_path: Path) -> dict[str, str]:
    """A private copy of the Hermes-made fixture (never opened in place)."""
    (tmp_path / "data").mkdir()
    shutil.copyfile(FIXTURE_DB, tmp_path / "data" / "kanban.db")
    open_test_store(tmp_path).dispose()
    return {"running": "t_95a31707", "done": "t_aff49253"}


BOARDS = {"empty": empty_board, "busy": busy_board, "hermes": hermes_board}


# -- reading the database and the page ------------------------------------------------------------


def task_row(tmp_path: Path, task_id: str) -> dict[str, Any]:
    store = open_store(make_settings(tmp_path))
    try:
        return queries.task_detail(store.board, task_id)
    finally:
        store.dispose()


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    store = open_store(make_settings(tmp_path))
    try:
        return list(reversed(actions.audit_log(store.ops)))
    finally:
        store.dispose()


def cards(at) -> list[str]:
    return [m.value for m in at.markdown if "`t_" in m.value and "@" in m.value and "phase" not in m.value]


def texts_of(elements) -> list[str]:
    return [e.value for e in elements]


def column_headers(at) -> list[str]:
    return [m.value for m in at.markdown if m.value.startswith("**") and " · " in m.value
            and "`t_" not in m.value]


def no_trouble(at) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def open_task(at, task_id: str):
    at.button(key=f"open_{task_id}").click().run()
    no_trouble(at)
    return at


def press(at, name: str):
    at.button(key=f"board_do_{name}").click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def submit_form(at, label: str):
    [button] = [b for b in at.button if b.label == label]
    button.click().run()
    assert not at.exception, [e.value for e in at.exception]
    return at


# -- every page renders on every board ------------------------------------------------------------


@pytest.mark.parametrize("kind", list(BOARDS))
def test_pages_render_on_empty_busy_and_hermes_boards(app_env, kind):
    ids = BOARDS[kind](app_env)
    at = run_page(BOARD)
    no_trouble(at)
    expected = {"empty": 0, "busy": 11, "hermes": 8}[kind]  # archived tasks hidden
    assert at.caption[0].value == f"{expected} of {expected} tasks"
    assert len(cards(at)) == expected
    if kind != "empty":
        running = ids.get("api") or ids["running"]
        open_task(at, running)
        assert any("Log of run" in m.value for m in at.markdown)

    runs = run_page(RUNS)
    no_trouble(runs)
    if kind == "empty":
        assert any("No run yet" in m.value for m in runs.markdown)
    else:
        assert len(runs.dataframe) == 2  # live and past runs
        assert len(runs.dataframe[0].value) == (2 if kind == "busy" else 1)


def test_hermes_running_task_without_a_log_says_so(app_env):
    ids = hermes_board(app_env)
    at = open_task(run_page(BOARD), ids["running"])
    assert any("does not exist" in i.value for i in at.info)
    runs = run_page(RUNS)
    assert runs.selectbox(key="runs_pick").value == 5  # the open run comes first
    frame = runs.dataframe[0].value
    assert list(frame["host"]) == ["vm"] and list(frame["task"]) == [ids["running"]]
    assert any("No log file for run 5" in i.value for i in runs.info)


# -- the board -----------------------------------------------------------------------------------


def test_filters_narrow_the_columns(app_env):
    ids = busy_board(app_env)
    at = run_page(BOARD)
    assert column_headers(at) == ["**⏳ Todo** · 6", "**▶️ Ready** · 0", "**🟢 Running** · 2",
                                  "**⛔ Blocked** · 1", "**✅ Done** · 2"]
    at.selectbox[1].select("P3").run()  # phase, from the [P3] title tags
    assert at.caption[0].value == "3 of 11 tasks"
    assert all("P3" in c for c in cards(at))
    at.selectbox[2].select(3).run()  # and priority 3: none in P3
    assert at.caption[0].value == "0 of 11 tasks"
    at.selectbox[1].select("(any)").run()
    assert at.caption[0].value == "3 of 11 tasks"  # repo, schema, matching
    at.selectbox[2].select("(any)").run()
    at.selectbox[0].select("tester").run()
    assert at.caption[0].value == "2 of 11 tasks"
    at.selectbox[0].select("(everyone)").run()
    at.text_input[0].input(ids["api"]).run()
    [card] = cards(at)
    assert "FastAPI skeleton" in card and "running" in card and "P1" in card
    assert column_headers(at)[2] == "**🟢 Running** · 1"


def test_archived_toggle_shows_the_archived_column(app_env):
    ids = busy_board(app_env)
    at = open_task(run_page(BOARD), ids["runbook"])
    press(at, "archive")
    assert "**🗄️ Archived** · 1" not in column_headers(at)
    assert at.caption[0].value == "10 of 10 tasks"
    at.toggle[0].set_value(True).run()
    assert "**🗄️ Archived** · 1" in column_headers(at)
    assert at.caption[0].value == "11 of 11 tasks"


def test_task_text_is_shown_as_text_not_markup(app_env):
    store = open_test_store(app_env)
    try:
        task_id = board.create_task(store.board, "Fix <b>it</b> [now](http://x) **bold**",
                                    body="# not a heading\n<script>x</script>")
    finally:
        store.dispose()
    at = open_task(run_page(BOARD), task_id)
    [card] = cards(at)
    assert r"\<b\>it\</b\> \[now\]\(`http://x`\) \*\*bold\*\*" in card  # a URL as code: no link
    assert any(m.value == r"\# not a heading  " + "\n" + r"\<script\>x\</script\>" for m in at.markdown)


def test_a_blocked_tasks_kind_and_reason_are_on_its_card_and_in_its_detail(app_env, hermes_bin):
    """Blocked with a kind (the demo's needs_input), without a reason, and by Hermes'
    own ``block`` verb: each card says why."""
    ids = busy_board(app_env)
    store = open_test_store(app_env)
    try:
        bare = board.create_task(store.board, "blocked without a word")
        board.block(store.board, bare, reason=None)
        by_hermes = board.create_task(store.board, "blocked by hermes")
    finally:
        store.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HERMES_", "SPARKOPS_"))}
    env.update(HERMES_HOME=str(app_env / "hermes-home"), HERMES_KANBAN_DB=str(app_env / "data" / "kanban.db"))
    subprocess.run([str(hermes_bin), "kanban", "block", by_hermes, "waiting", "for", "the", "GPU", "quota"],
                   env=env, check=True, capture_output=True, timeout=120)
    at = run_page(BOARD)
    no_trouble(at)
    reason = r"Needs an API key for the market data vendor; ask the operator\."
    [feed] = [c for c in cards(at) if ids["feed"] in c]
    assert feed.endswith("  \n⛔ **needs input**: " + reason)
    [card] = [c for c in cards(at) if bare in c]
    assert card.endswith("⛔ **blocked**: no reason given")
    [card] = [c for c in cards(at) if by_hermes in c]
    assert card.endswith(": waiting for the GPU quota")

    at = open_task(at, ids["feed"])
    header = next(m.value for m in at.markdown if m.value.startswith(f"`{ids['feed']}`"))
    assert "⛔ **needs input**: " + reason in header and "(since " in header
    [box] = texts_of(at.warning)
    assert box.startswith("**needs input**: " + reason)


def test_the_done_column_is_capped_with_show_more(app_env):
    store = open_test_store(app_env)
    try:
        done = [board.create_task(store.board, f"finished {n}") for n in range(12)]
        for task_id in done:
            board.complete(store.board, task_id, result="ok")
    finally:
        store.dispose()
    at = run_page(BOARD)
    no_trouble(at)
    assert sum(1 for c in cards(at) if "finished " in c) == 8
    more = at.button(key="board_show_more_done")
    assert more.label == "Show more (4 not shown)"
    more.click().run()
    no_trouble(at)
    assert sum(1 for c in cards(at) if "finished " in c) == 12
    assert not [b for b in at.button if b.key == "board_show_more_done"]


def test_detail_shows_body_links_runs_and_the_log_tail(app_env):
    ids = busy_board(app_env)
    at = open_task(run_page(BOARD), ids["api"])
    assert at.subheader[0].value == r"\[P1\] FastAPI skeleton with a /health endpoint"
    [log] = [c.value for c in at.code]
    assert log.splitlines()[-1] == "agent line 150" and len(log.splitlines()) == 100
    assert "agent line 50\n" not in log
    assert any("(running; tailing)" in m.value for m in at.markdown)
    runs = at.dataframe[0].value
    assert list(runs["outcome"]) == ["running"] and list(runs["host"]) == ["testhost"]
    assert any(ids["repo"] in m.value for m in at.markdown)  # its parent
    at.button(key="board_close").click().run()
    assert not at.subheader and not at.code


def test_every_action_changes_the_board_and_is_audited(app_env):
    ids = busy_board(app_env)
    feed, loadtest, api = ids["feed"], ids["loadtest"], ids["api"]
    at = open_task(run_page(BOARD), feed)

    at.number_input(key=f"board_prio_{feed}").set_value(7)
    press(at, "priority")
    assert task_row(app_env, feed)["task"]["priority"] == 7
    assert "priority 1 -> 7" in at.success[0].value

    at.text_area(key=f"board_comment_{feed}").input("vendor key is in the vault")
    submit_form(at, "Add comment")
    assert [c["body"] for c in task_row(app_env, feed)["comments"]] == ["vendor key is in the vault"]
    assert any("vendor key is in the vault" in m.value for m in at.markdown)

    press(at, "unblock")
    assert task_row(app_env, feed)["task"]["status"] == "ready"

    at.text_input(key=f"board_reason_{feed}").input("waiting for the vendor")
    submit_form(at, "⛔ Block")
    detail = task_row(app_env, feed)
    assert detail["task"]["status"] == "blocked"
    assert detail["events"][-1]["payload"]["reason"] == "waiting for the vendor"

    press(at, "requeue")
    assert task_row(app_env, feed)["task"]["status"] == "ready"

    press(at, "workspace")
    assert (app_env / "data" / "workspaces" / feed / "TASK.md").is_file()

    open_task(at, loadtest)  # todo: its parent (matching) is unfinished
    press(at, "promote")
    assert "parents not finished" in at.error[0].value
    assert task_row(app_env, loadtest)["task"]["status"] == "todo"
    at.checkbox(key=f"board_force_{loadtest}").check()
    press(at, "promote")
    assert task_row(app_env, loadtest)["task"]["status"] == "ready"

    press(at, "archive")
    assert task_row(app_env, loadtest)["task"]["status"] == "archived"

    open_task(at, api)
    press(at, "reclaim")
    detail = task_row(app_env, api)
    assert detail["task"]["status"] == "ready" and detail["runs"][-1]["outcome"] == "reclaimed"
    assert "reclaimed" in at.success[0].value

    at.text_input(key="board_new_title").input("Write the release notes")
    at.text_area(key="board_new_body").input("for *v1*")
    at.text_input(key="board_new_assignee").input("Writer")
    at.number_input(key="board_new_priority").set_value(2)
    at.multiselect(key="board_new_parents").select(ids["runbook"])
    submit_form(at, "Create task")
    assert at.success[0].value.startswith("created t_")
    new_id = at.success[0].value.split()[1]
    created = task_row(app_env, new_id)
    assert created["task"]["title"] == "Write the release notes" and created["task"]["assignee"] == "writer"
    assert created["task"]["priority"] == 2 and created["parents"] == [ids["runbook"]]
    assert created["task"]["status"] == "todo"
    assert at.subheader[0].value == "Write the release notes"  # its detail opens

    rows = audit(app_env)
    assert [(r["action"], r["target"], r["result"]) for r in rows] == [
        ("task.priority", feed, "ok"), ("task.comment", feed, "ok"), ("task.unblock", feed, "ok"),
        ("task.block", feed, "ok"), ("task.requeue", feed, "ok"), ("task.recreate_workspace", feed, "ok"),
        ("task.promote", loadtest, "refused"), ("task.promote", loadtest, "ok"),
        ("task.archive", loadtest, "ok"), ("task.reclaim", api, "ok"), ("task.create", None, "ok"),
    ]
    assert all(r["actor"].startswith("ui@") for r in rows)


def test_failing_actions_show_a_readable_error(app_env):
    ids = busy_board(app_env)
    at = open_task(run_page(BOARD), ids["bench"])  # running, on another host
    press(at, "unblock")
    assert "unblock applies to blocked, scheduled tasks" in at.error[0].value
    press(at, "reclaim")
    assert f"runs on host {OTHER_HOST}" in at.error[0].value
    assert task_row(app_env, ids["bench"])["task"]["status"] == "running"

    open_task(at, ids["repo"])  # done
    at.text_input(key=f"board_reason_{ids['repo']}").input("too late")
    submit_form(at, "⛔ Block")
    assert "block" in at.error[0].value and "done" in at.error[0].value
    at.text_area(key=f"board_comment_{ids['repo']}").input("   ")
    submit_form(at, "Add comment")
    assert "a comment needs text" in at.error[0].value
    at.text_area(key="board_new_body").input("kept when refused")
    submit_form(at, "Create task")  # no title
    assert "a task needs a title" in at.error[0].value
    assert at.text_area(key="board_new_body").value == "kept when refused"
    assert task_row(app_env, ids["repo"])["task"]["status"] == "done"
    assert [(r["action"], r["result"]) for r in audit(app_env)] == [
        ("task.unblock", "refused"), ("task.reclaim", "refused"), ("task.block", "refused"),
        ("task.comment", "refused"), ("task.create", "refused")]


# -- runs and logs -------------------------------------------------------------------------------


def test_runs_page_lists_runs_and_shows_a_chosen_runs_log(app_env):
    ids = busy_board(app_env)
    at = run_page(RUNS)
    no_trouble(at)
    live, past = (d.value for d in at.dataframe)
    assert set(live["task"]) == {ids["api"], ids["bench"]}
    other = live[live["task"] == ids["bench"]].iloc[0]
    assert other["host"] == OTHER_HOST and other["pid"] == OTHER_PID
    assert list(past["outcome"]) == ["blocked", "completed", "completed"]  # the demo's runs

    at.selectbox(key="runs_pick").select(int(ids["api_run"])).run()
    [log] = [c.value for c in at.code]
    assert log.splitlines()[-1] == "agent line 150"
    assert any("tailing" in m.value for m in at.markdown)

    at.selectbox(key="runs_pick").select(int(ids["bench_run"])).run()
    assert not at.code and any("does not exist" in i.value for i in at.info)

    at.selectbox(key="runs_outcome").select("completed").run()
    live, past = (d.value for d in at.dataframe)
    assert live.empty and len(past) == 2
    at.selectbox(key="runs_outcome").select("(any)").run()
    at.text_input(key="runs_task").input(ids["api"]).run()
    live, past = (d.value for d in at.dataframe)
    assert list(live["task"]) == [ids["api"]] and past.empty


def test_a_task_that_is_gone_leaves_the_board_usable(app_env):
    busy_board(app_env)
    at = run_page(BOARD)
    at.session_state["board_open"] = "t_00000000"
    at.run()
    no_trouble(at)
    assert "not on this board" in at.warning[0].value
    assert at.caption[0].value == "11 of 11 tasks"
    at.button(key="board_close").click().run()
    assert not at.warning


def test_in_hermes_mode_the_board_names_the_ready_tasks_hermes_skips(app_env, monkeypatch):
    store = open_test_store(app_env)
    try:
        board.create_task(store.board, "No owner yet")
        board.create_task(store.board, "Owned", assignee="default")
    finally:
        store.dispose()
    native = run_page(BOARD)
    no_trouble(native)
    assert not [w for w in native.warning if "no assignee" in w.value]  # native mode starts any task

    monkeypatch.setenv("SPARKOPS_DISPATCH_MODE", "hermes")
    at = run_page(BOARD)
    no_trouble(at)
    [note] = [w.value for w in at.warning if "no assignee" in w.value]
    assert note.startswith("1 ready task(s) have no assignee: Hermes' dispatcher")
