"""SparkOps and Hermes Kanban (hermes-agent 0.19) work the same board file.

Two kinds of tests:

* **Fixture tests** (always run, no Hermes needed): ``tests/fixtures/hermes_board.db``
  was made by the real ``hermes kanban`` CLI (``make_hermes_board.sh``), and
  ``hermes_board.expected.json`` is what Hermes itself reported about it. SparkOps,
  through the library and the real CLI, must list, show and count a copy of it the
  same way, and must be able to work it. The committed file is never opened in place.
* **Live tests** (need Hermes): a board made by ``hermes kanban`` is read by SparkOps,
  and a board made by SparkOps is read (and worked) by ``hermes kanban``. Hermes is
  ``$SPARKOPS_TEST_HERMES`` or ``<repo>/.venv-hermes/bin/hermes``; without it these
  tests are skipped, except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import make_settings, run_cli

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.core.errors import StaleRun, TransitionRefused
from sparkops.storage.schema import CORE_BOARD_TABLES
from sparkops.storage.store import Store, open_store

FIXTURES = Path(__file__).resolve().parent / "fixtures"
FIXTURE_DB = FIXTURES / "hermes_board.db"
EXPECTED: dict[str, Any] = json.loads((FIXTURES / "hermes_board.expected.json").read_text())
NAMES: dict[str, str] = EXPECTED["names"]
EXP_TASKS: dict[str, dict[str, Any]] = EXPECTED["tasks"]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fixture_dir_state() -> dict[str, str]:
    return {p.name: _sha256(p) for p in sorted(FIXTURES.iterdir()) if p.is_file()}


@pytest.fixture(scope="module", autouse=True)
def fixture_files_stay_untouched():
    """Whatever the tests of this module do, tests/fixtures ends as it began."""
    before = _fixture_dir_state()
    yield
    assert _fixture_dir_state() == before


# -- helpers ------------------------------------------------------------------------


def board_env(db: Path, ops: Path) -> dict[str, str]:
    return {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{db}",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{ops}"}


def cli_json(*args: str, cwd: Path, env: dict[str, str]) -> Any:
    result = run_cli(*args, "--json", cwd=cwd, env=env)
    assert result.returncode == 0, f"sparkops {' '.join(args)}: {result.stderr}"
    return json.loads(result.stdout)


def cli_ok(*args: str, cwd: Path, env: dict[str, str]) -> str:
    result = run_cli(*args, cwd=cwd, env=env)
    assert result.returncode == 0, f"sparkops {' '.join(args)}: {result.stderr}"
    return result.stdout.strip()


def run_view(run: dict[str, Any]) -> dict[str, Any]:
    """The parts of a run both tools must agree on."""
    return {"status": run["status"], "outcome": run["outcome"], "profile": run["profile"],
            "summary": run["summary"], "ended": run["ended_at"] is not None}


def counts_from_list(rows: list[dict[str, Any]]) -> tuple[dict, dict]:
    """Per-status and per-assignee counts of a task list."""
    by_status = dict(Counter(r["status"] for r in rows))
    by_assignee: dict[str, dict[str, int]] = {}
    for r in rows:
        if r["assignee"] is not None:
            by_assignee.setdefault(r["assignee"], Counter())[r["status"]] += 1
    return by_status, {who: dict(c) for who, c in by_assignee.items()}


def schema_snapshot(db: Path, *, immutable: bool = False) -> tuple[list[tuple], int]:
    """sqlite_master and user_version, read without writing anything (``immutable``
    also keeps SQLite from creating -wal/-shm files next to a WAL database)."""
    conn = sqlite3.connect(f"file:{db}?mode=ro" + ("&immutable=1" if immutable else ""), uri=True)
    try:
        rows = sorted(conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master"),
                      key=lambda r: (r[0], r[1]))
        return rows, conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


# -- the fixture ----------------------------------------------------------------------


@pytest.fixture
def hermes_copy(tmp_path: Path) -> Path:
    """A private copy of the Hermes-made board."""
    dest = tmp_path / "board" / "kanban.db"
    dest.parent.mkdir()
    shutil.copyfile(FIXTURE_DB, dest)
    return dest


@pytest.fixture
def fixture_store(hermes_copy: Path, tmp_path: Path):
    settings = make_settings(tmp_path, board_url=f"sqlite:///{hermes_copy}",
                             ops_url=f"sqlite:///{tmp_path}/ops/sparkops.db")
    st = open_store(settings, create=True)
    try:
        yield st
    finally:
        st.dispose()


def test_fixture_is_a_complete_hermes_board_on_its_own(hermes_copy: Path):
    """The committed file needs no -wal/-shm (the copy is the .db alone), is
    untouched by SparkOps (no user_version) and holds exactly the tasks the
    expected json describes."""
    wal = FIXTURE_DB.with_name(FIXTURE_DB.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0, f"{wal} holds data the .db lacks"
    header = FIXTURE_DB.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00"
    assert header[18] == header[19] == 2  # Hermes' WAL mode, kept as Hermes left it
    conn = sqlite3.connect(hermes_copy)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert set(CORE_BOARD_TABLES) <= tables
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 0
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in conn.execute("SELECT id FROM tasks")}
    finally:
        conn.close()
    assert ids == set(EXP_TASKS) == set(NAMES.values())
    # The board is varied: every one of these situations is in it.
    statuses = Counter(t["status"] for t in EXP_TASKS.values())
    assert {"todo", "ready", "running", "blocked", "done", "archived"} <= set(statuses)
    assert len({t["assignee"] for t in EXP_TASKS.values()}) >= 3
    assert any(len(t["runs"]) >= 2 for t in EXP_TASKS.values())
    assert any(t["comments"] for t in EXP_TASKS.values())
    assert EXP_TASKS[NAMES["api"]]["event_kinds"][-1] == "promoted"


def test_library_lists_the_hermes_board_like_hermes(fixture_store: Store):
    rows = queries.list_tasks(fixture_store.board, include_archived=True)
    assert [r["id"] for r in rows] == EXPECTED["list_order"]
    for row in rows:
        exp = EXP_TASKS[row["id"]]
        got = {k: row[k] for k in ("title", "status", "assignee", "priority", "created_by")}
        assert got == {k: exp[k] for k in got}, row["id"]
    active = queries.list_tasks(fixture_store.board)
    assert [r["id"] for r in active] == [
        i for i in EXPECTED["list_order"] if EXP_TASKS[i]["status"] != "archived"]
    blocked = queries.list_tasks(fixture_store.board, status="blocked")
    assert [r["id"] for r in blocked] == [NAMES["flaky"]]
    alice = queries.list_tasks(fixture_store.board, assignee="alice")
    assert {r["id"] for r in alice} == {
        i for i, t in EXP_TASKS.items() if t["assignee"] == "alice" and t["status"] != "archived"}


def test_library_shows_the_hermes_board_like_hermes(fixture_store: Store):
    for task_id, exp in EXP_TASKS.items():
        detail = queries.task_detail(fixture_store.board, task_id)
        task = detail["task"]
        assert (task["status"], task["title"], task["body"], task["result"]) == (
            exp["status"], exp["title"], exp["body"], exp["result"]), task_id
        assert sorted(detail["parents"]) == exp["parents"], task_id
        assert sorted(detail["children"]) == exp["children"], task_id
        assert [{"author": c["author"], "body": c["body"]} for c in detail["comments"]] == \
            exp["comments"], task_id
        assert [e["kind"] for e in detail["events"]] == exp["event_kinds"], task_id
        assert [run_view(r) for r in detail["runs"]] == exp["runs"], task_id


def test_library_runs_like_hermes(fixture_store: Store):
    for task_id, exp in EXP_TASKS.items():
        runs = queries.list_runs(fixture_store.board, task_id=task_id)
        assert [run_view(r) for r in reversed(runs)] == exp["runs"], task_id  # newest first
    active = queries.list_runs(fixture_store.board, active_only=True)
    assert [r["task_id"] for r in active] == [NAMES["bench"]]
    outcomes = Counter(r["outcome"] for r in queries.list_runs(fixture_store.board))
    expected_outcomes = Counter(r["outcome"] for t in EXP_TASKS.values() for r in t["runs"])
    assert outcomes == expected_outcomes


def test_library_counts_exactly_like_hermes_stats(fixture_store: Store):
    exp = EXPECTED["stats"]
    stats = queries.board_stats(fixture_store.board, now=exp["oldest_ready_created_at"] + 100)
    assert (stats["by_status"], stats["by_assignee"]) == (exp["by_status"], exp["by_assignee"])
    assert stats["oldest_ready_age_seconds"] == 100
    assert stats["active_runs"] == 1
    archived = sum(1 for t in EXP_TASKS.values() if t["status"] == "archived")
    assert archived >= 1 and stats["archived"] == archived


def test_cli_reads_the_hermes_board_like_hermes(hermes_copy: Path, tmp_path: Path):
    env = board_env(hermes_copy, tmp_path / "ops" / "sparkops.db")
    cli_ok("init", cwd=tmp_path, env=env)

    listed = cli_json("task", "list", "--archived", cwd=tmp_path, env=env)
    assert [t["id"] for t in listed] == EXPECTED["list_order"]
    assert {t["id"]: t["status"] for t in listed} == {i: t["status"] for i, t in EXP_TASKS.items()}
    assert {t["id"]: t["title"] for t in listed} == {i: t["title"] for i, t in EXP_TASKS.items()}
    assert counts_from_list(cli_json("task", "list", cwd=tmp_path, env=env)) == (
        EXPECTED["stats"]["by_status"], EXPECTED["stats"]["by_assignee"])

    stats = cli_json("stats", cwd=tmp_path, env=env)
    assert (stats["by_status"], stats["by_assignee"]) == (EXPECTED["stats"]["by_status"],
                                                          EXPECTED["stats"]["by_assignee"])
    assert stats["active_runs"] == 1

    runs = cli_json("runs", "--limit", "1000", cwd=tmp_path, env=env)
    for task_id, exp in EXP_TASKS.items():
        mine = sorted((r for r in runs if r["task_id"] == task_id), key=lambda r: r["id"])
        assert [run_view(r) for r in mine] == exp["runs"], task_id

    for task_id, exp in EXP_TASKS.items():
        detail = cli_json("task", "show", task_id, cwd=tmp_path, env=env)
        assert detail["task"]["status"] == exp["status"]
        assert sorted(detail["parents"]) == exp["parents"]
        assert sorted(detail["children"]) == exp["children"]
        assert [c["body"] for c in detail["comments"]] == [c["body"] for c in exp["comments"]]
        assert [e["kind"] for e in detail["events"]] == exp["event_kinds"]
        assert [run_view(r) for r in detail["runs"]] == exp["runs"]

    events = cli_json("events", NAMES["deps"], cwd=tmp_path, env=env)
    assert [e["kind"] for e in reversed(events)] == EXP_TASKS[NAMES["deps"]]["event_kinds"]


def test_sparkops_works_the_hermes_board(fixture_store: Store, hermes_copy: Path, tmp_path: Path):
    db = fixture_store.board
    api, docs, deploy = NAMES["api"], NAMES["docs"], NAMES["deploy"]

    # A child Hermes promoted is claimable; its child waits for both parents.
    change = board.claim(db, api, lock="sparkhost:4242")
    assert change.to_status == "running" and change.run_id is not None
    board.complete(db, api, run_id=change.run_id, result="API done")
    assert queries.get_task(db, deploy)["status"] == "todo"  # docs not finished yet
    with pytest.raises(TransitionRefused):
        board.claim(db, deploy, lock="sparkhost:4242")
    run = board.claim(db, docs, lock="sparkhost:4242").run_id
    board.complete(db, docs, run_id=run, result="docs written")
    detail = queries.task_detail(db, deploy)
    assert detail["task"]["status"] == "ready"
    assert detail["events"][-1]["kind"] == "promoted"

    # The run Hermes left open is the fencing token: a stale one is refused,
    # the live one completes the task.
    bench = queries.get_task(db, NAMES["bench"])
    hermes_run = bench["current_run_id"]
    assert hermes_run is not None
    with pytest.raises(StaleRun):
        board.complete(db, NAMES["bench"], run_id=hermes_run + 1000)
    board.complete(db, NAMES["bench"], run_id=hermes_run, result="812 tok/s")
    runs = queries.list_runs(db, task_id=NAMES["bench"])
    assert [(r["id"], r["status"], r["outcome"]) for r in runs] == [(hermes_run, "done", "completed")]

    # A task Hermes blocked is unblocked by SparkOps; comments go through the CLI.
    assert board.unblock(db, NAMES["flaky"]).to_status == "ready"
    env = board_env(hermes_copy, tmp_path / "ops" / "sparkops.db")
    cli_ok("task", "comment", NAMES["flaky"], "credentials", "arrived", "--author", "ops",
           cwd=tmp_path, env=env)
    flaky = queries.task_detail(db, NAMES["flaky"])
    assert [c["body"] for c in flaky["comments"]][-1] == "credentials arrived"

    by_status = {s: n for s, n in queries.board_stats(db)["by_status"].items() if s != "archived"}
    assert by_status == {"done": 5, "ready": 3}
    # Working the board added no table, index or column to Hermes' schema.
    assert schema_snapshot(hermes_copy)[0] == schema_snapshot(FIXTURE_DB, immutable=True)[0]


def test_fixture_file_is_never_modified(hermes_copy: Path, tmp_path: Path):
    """Opening, migrating and writing the copy leaves the committed file as it was."""
    before = _sha256(FIXTURE_DB)
    dir_before = _fixture_dir_state()
    env = board_env(hermes_copy, tmp_path / "ops" / "sparkops.db")
    cli_ok("init", cwd=tmp_path, env=env)
    cli_ok("task", "create", "One more", "--assignee", "dave", cwd=tmp_path, env=env)
    assert _sha256(hermes_copy) != before  # the copy did change...
    assert _sha256(FIXTURE_DB) == before  # ...the fixture did not
    assert _fixture_dir_state() == dir_before  # no sidecar appeared next to it either


# -- live: the real hermes kanban CLI --------------------------------------------------


class Hermes:
    """``hermes kanban`` on one board file, with its home in tmp_path."""

    def __init__(self, binary: Path, home: Path, db: Path):
        self.binary = binary
        self.env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("HERMES_", "SPARKOPS_"))}
        self.env.update(HERMES_HOME=str(home), HERMES_KANBAN_DB=str(db))

    def __call__(self, *args: str) -> str:
        result = subprocess.run([str(self.binary), "kanban", *args], env=self.env,
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (
            f"hermes kanban {' '.join(args)} exited {result.returncode}:\n"
            f"{result.stdout}\n{result.stderr}")
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self(*args, "--json"))

    def create(self, title: str, *args: str) -> str:
        return self.json("create", title, *args)["id"]


def test_hermes_made_board_reads_in_sparkops(hermes_bin: Path, tmp_path: Path):
    db = tmp_path / "board" / "kanban.db"
    hk = Hermes(hermes_bin, tmp_path / "hermes-home", db)
    hk("init")
    plan = hk.create("Plan the sprint", "--assignee", "alice", "--priority", "5",
                     "--body", "Pick the phase 1 tasks.")
    build = hk.create("Build it", "--assignee", "bob", "--priority", "4", "--parent", plan)
    check = hk.create("Check GPU memory", "--assignee", "carol", "--priority", "3")
    ship = hk.create("Ship it", "--assignee", "bob", "--priority", "2")
    hk("link", check, ship)
    serve = hk.create("Serve the model", "--assignee", "alice", "--priority", "1")
    hk("claim", plan)
    hk("comment", plan, "Phase 1 is five tasks.", "--author", "alice")
    hk("complete", plan, "--result", "planned")
    hk("claim", check)
    hk("block", check, "nvidia-smi", "says", "not", "supported")
    hk("comment", build, "Start with the schema.", "--author", "carol")
    hk("claim", serve)

    h_list = hk.json("list", "--archived")
    h_stats = hk.json("stats")
    h_show = {t["id"]: hk.json("show", t["id"]) for t in h_list}
    h_runs = {t["id"]: hk.json("runs", t["id"]) for t in h_list}
    assert {t["id"]: t["status"] for t in h_list} == {
        plan: "done", build: "ready", check: "blocked", ship: "todo", serve: "running"}

    settings = make_settings(tmp_path, board_url=f"sqlite:///{db}",
                             ops_url=f"sqlite:///{tmp_path}/ops/sparkops.db")
    store = open_store(settings, create=True)
    try:
        rows = queries.list_tasks(store.board, include_archived=True)
        assert [r["id"] for r in rows] == [t["id"] for t in h_list]
        for row, ht in zip(rows, h_list):
            for key in ("title", "status", "assignee", "priority", "created_by",
                        "created_at", "started_at", "completed_at"):
                assert row[key] == ht[key], (row["id"], key)
        stats = queries.board_stats(store.board, now=h_stats["now"])
        assert stats["by_status"] == h_stats["by_status"]
        assert stats["by_assignee"] == h_stats["by_assignee"]
        assert stats["oldest_ready_age_seconds"] == h_stats["oldest_ready_age_seconds"]
        for task_id, hs in h_show.items():
            detail = queries.task_detail(store.board, task_id)
            assert detail["parents"] == sorted(hs["parents"]), task_id
            assert detail["children"] == sorted(hs["children"]), task_id
            assert [(c["author"], c["body"]) for c in detail["comments"]] == \
                [(c["author"], c["body"]) for c in hs["comments"]], task_id
            assert [(e["kind"], e["payload"], e["run_id"]) for e in detail["events"]] == \
                [(e["kind"], e["payload"], e["run_id"]) for e in hs["events"]], task_id
            assert [run_view(r) for r in detail["runs"]] == [run_view(r) for r in h_runs[task_id]]
        assert [run_view(r) for r in queries.list_runs(store.board, task_id=check)] == [
            {"status": "blocked", "outcome": "blocked", "profile": "carol",
             "summary": "nvidia-smi says not supported", "ended": True}]
        assert [r["task_id"] for r in queries.list_runs(store.board, active_only=True)] == [serve]
    finally:
        store.dispose()

    env = board_env(db, tmp_path / "ops" / "sparkops.db")
    cli_stats = cli_json("stats", cwd=tmp_path, env=env)
    assert (cli_stats["by_status"], cli_stats["by_assignee"]) == (
        h_stats["by_status"], h_stats["by_assignee"])
    cli_list = cli_json("task", "list", "--archived", cwd=tmp_path, env=env)
    assert [(t["id"], t["status"]) for t in cli_list] == [(t["id"], t["status"]) for t in h_list]
    shown = cli_json("task", "show", build, cwd=tmp_path, env=env)
    assert shown["parents"] == [plan] and [e["kind"] for e in shown["events"]] == [
        e["kind"] for e in h_show[build]["events"]]


def test_sparkops_made_board_reads_in_hermes(hermes_bin: Path, tmp_path: Path):
    db = tmp_path / "board" / "kanban.db"
    env = board_env(db, tmp_path / "ops" / "sparkops.db")

    def sp(*args: str) -> str:
        return cli_ok(*args, cwd=tmp_path, env=env)

    sp("init")
    parent = sp("task", "create", "Write the schema", "--assignee", "alice", "--priority", "6",
                "--body", "All five core tables.")
    child = sp("task", "create", "Write the queries", "--assignee", "bob", "--priority", "5",
               "--parent", parent)
    later = sp("task", "create", "Write the pages", "--assignee", "bob", "--priority", "4")
    sp("task", "link", parent, later)
    stuck = sp("task", "create", "Talk to the GPU", "--assignee", "carol", "--priority", "3")
    busy = sp("task", "create", "Long benchmark", "--assignee", "alice", "--priority", "2")
    manual = sp("task", "create", "Decide on Postgres", "--priority", "1")
    old = sp("task", "create", "Old idea", "--assignee", "carol", "--priority", "0")

    settings = make_settings(tmp_path, board_url=f"sqlite:///{db}",
                             ops_url=f"sqlite:///{tmp_path}/ops/sparkops.db")
    store = open_store(settings)
    try:
        run = board.claim(store.board, parent, lock="sparkhost:101").run_id
        sp("task", "complete", parent, "--run", str(run), "--result", "schema written")
        board.claim(store.board, stuck, lock="sparkhost:102")
        sp("task", "block", stuck, "no", "NVML", "library")
        board.claim(store.board, busy, lock="sparkhost:103")
        sp("task", "block", manual, "needs", "a", "human")  # never claimed: a synthesized run
        sp("task", "promote", manual, "--actor", "ops")
        sp("task", "comment", parent, "Reviewed.", "--author", "carol")
        sp("task", "comment", child, "Use SQLAlchemy Core.", "--author", "alice")
        sp("task", "archive", old)

        # What SparkOps reports.
        s_list = queries.list_tasks(store.board, include_archived=True)
        s_active = queries.list_tasks(store.board)
        s_stats = queries.board_stats(store.board)
        s_detail = {t["id"]: queries.task_detail(store.board, t["id"]) for t in s_list}
        assert {t["id"]: t["status"] for t in s_list} == {
            parent: "done", child: "ready", later: "ready", stuck: "blocked", busy: "running",
            manual: "ready", old: "archived"}
        schema_before = schema_snapshot(db)
        dump_before = _dump(db)

        # What Hermes reports about the same file.
        hk = Hermes(hermes_bin, tmp_path / "hermes-home", db)
        h_list = hk.json("list", "--archived")
        h_show = {t["id"]: hk.json("show", t["id"]) for t in s_list}
        h_runs = {t["id"]: hk.json("runs", t["id"]) for t in s_list}
        h_stats = hk.json("stats")

        assert [(t["id"], t["status"]) for t in h_list] == [(t["id"], t["status"]) for t in s_list]
        for ht, st in zip(h_list, s_list):
            for key in ("title", "assignee", "priority", "created_at", "started_at", "completed_at"):
                assert ht[key] == st[key], (st["id"], key)
        assert (h_stats["by_status"], h_stats["by_assignee"]) == counts_from_list(s_active)
        assert (h_stats["by_status"], h_stats["by_assignee"]) == (s_stats["by_status"], s_stats["by_assignee"])
        ready_created = [t["created_at"] for t in s_list if t["status"] == "ready"]
        assert h_stats["now"] - h_stats["oldest_ready_age_seconds"] == min(ready_created)
        for task_id, detail in s_detail.items():
            hs = h_show[task_id]
            assert hs["task"]["status"] == detail["task"]["status"]
            assert hs["task"]["body"] == detail["task"]["body"]
            assert hs["task"]["result"] == detail["task"]["result"]
            assert sorted(hs["parents"]) == detail["parents"], task_id
            assert sorted(hs["children"]) == detail["children"], task_id
            assert [(c["author"], c["body"]) for c in hs["comments"]] == \
                [(c["author"], c["body"]) for c in detail["comments"]], task_id
            assert [(e["kind"], e["payload"], e["run_id"]) for e in hs["events"]] == \
                [(e["kind"], e["payload"], e["run_id"]) for e in detail["events"]], task_id
            assert [run_view(r) for r in hs["runs"]] == [run_view(r) for r in detail["runs"]]
            assert [run_view(r) for r in h_runs[task_id]] == [run_view(r) for r in detail["runs"]]
        assert [(r["outcome"], r["status"]) for r in h_runs[parent]] == [("completed", "done")]
        assert [(r["outcome"], r["summary"]) for r in h_runs[stuck]] == [
            ("blocked", "no NVML library")]
        assert [(r["outcome"], r["ended_at"]) for r in h_runs[busy]] == [(None, None)]
        assert [r["outcome"] for r in h_runs[manual]] == ["blocked"]
        assert h_show[parent]["latest_summary"] == "schema written"

        # Reading changed nothing: not the schema, not a row.
        assert schema_snapshot(db) == schema_before
        assert _dump(db) == dump_before

        # And Hermes can work it: claim and complete a task SparkOps promoted, and
        # finish the run SparkOps opened. SparkOps sees both.
        hk("claim", child)
        hk("complete", child, "--result", "queries written")
        hk("complete", busy, "--result", "benchmark done")
        assert queries.get_task(store.board, child)["status"] == "done"
        assert queries.get_task(store.board, busy)["status"] == "done"
        assert [(r["status"], r["outcome"], r["profile"]) for r in
                queries.list_runs(store.board, task_id=busy)] == [("done", "completed", "alice")]
        assert [(r["status"], r["outcome"], r["profile"]) for r in
                queries.list_runs(store.board, task_id=child)] == [("done", "completed", "bob")]
        assert schema_snapshot(db)[0] == schema_before[0]
    finally:
        store.dispose()


def _dump(db: Path) -> list[str]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()
