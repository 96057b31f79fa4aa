"""Export: the files read back to the database's rows (csv module, pandas, JSON),
exact times and durations, odd text and formula cells, phases, each run's and task's
usage read back to the ops database's (and empty where not measured), atomic
replacement (a failed rename, an error, a real SIGKILL before and between the
renames, readers during exports), the columns against docs/export.md, and both
backends."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import tracemalloc
from pathlib import Path

import pandas as pd
import pytest
from conftest import NOW, ROOT, make_settings
from sqlalchemy import insert, select

from sparkops.board import phases
from sparkops.board import transitions as board
from sparkops.board.model import Outcome
from sparkops.config import mask_url
from sparkops.core.errors import StorageError
from sparkops.jobs.framework import JobBusy, JobContext, JobLock
from sparkops.meters import ledger
from sparkops.meters.reported import Reported
from sparkops.meters.sample import Sample
from sparkops.meters.spend import Prices, Spend, total
from sparkops.meters.usage import Usage
from sparkops.sprint import cells, export, export_usage
from sparkops.sprint.export import (
    CSV_FILES,
    EVENT_COLUMNS,
    FILES,
    PHASE_COLUMNS,
    RUN_COLUMNS,
    RUN_USAGE_COLUMNS,
    TASK_COLUMNS,
    TASK_USAGE_COLUMNS,
    read_csv_rows,
    verify_export,
)
from sparkops.storage.schema import ops_events, ops_reports, ops_run_usage, task_events, task_links, task_runs, tasks

DOC = ROOT / "docs" / "export.md"
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")

#: Text that must survive: CSV syntax, newlines, unicode, and formula look-alikes.
ODD = [
    'commas, "quotes", and ""doubled""',
    "line one\nline two\r\nline three\rend",
    "unicode: café Straße 日本語 emoji 🚀👩‍💻 RTL שלום עולם مرحبا",
    "=cmd()", "+SUM(A1)", "-1+1", "@SUM(A1:A9)", "\tleading tab", "\rleading CR",
    "'already quoted", "''twice", "=HYPERLINK(\"http://x\",\"y\")", "trailing space ", " leading space",
    "", "a,b\n=c",
]


def iso(value) -> str:
    """Independent of the code under test: datetime's own formatting."""
    if value is None:
        return ""
    return dt.datetime.fromtimestamp(value, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def text(value) -> str:
    return "" if value is None else str(value)


@pytest.fixture
def ctx(sqlite_store, tmp_path) -> JobContext:
    return JobContext.create(make_settings(tmp_path), sqlite_store)


def build_board(db) -> dict[str, str]:
    """Four tasks through the state machine: one done, one running, one blocked,
    one archived, with dependencies."""
    a = board.create_task(db, "Design the schema", assignee="builder", priority=2, created_by="lead",
                          body="Tables and indexes.", now=NOW)
    b = board.create_task(db, "Build it", parents=[a], now=NOW + 10)
    c = board.create_task(db, "Document it", parents=[a, b], now=NOW + 20)
    d = board.create_task(db, "Spike", now=NOW + 30)
    board.claim(db, a, lock="host:1", now=NOW + 100)
    board.complete(db, a, result="schema done", summary="done, 3 tables", now=NOW + 400)
    board.claim(db, b, lock="host:1", now=NOW + 500)
    board.block(db, d, reason="needs a decision", kind="needs_input", now=NOW + 600)
    board.archive(db, c, now=NOW + 700)
    return {"a": a, "b": b, "c": c, "d": d}


def db_rows(db, table) -> list[dict]:
    with db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(table).order_by(table.c.id))]


def files_bytes(directory: Path) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in FILES}


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in FILES and p.name != export.LOCK_NAME)


def load_board(directory: Path) -> dict:
    return json.loads((directory / "board.json").read_text(encoding="utf-8"))


def json_records(board_json: dict, table: str) -> list[dict]:
    return [dict(zip(board_json[table]["columns"], row)) for row in board_json[table]["rows"]]


# -- the files read back to the database -----------------------------------------------


def test_tasks_runs_and_events_read_back_to_the_database_rows(ctx, sqlite_store, tmp_path):
    ids = build_board(sqlite_store.board)
    phase_of = {ids["a"]: "P1", ids["b"]: "P2", ids["c"]: "P2"}
    result = export.export(ctx, now=NOW + 1000, phase_of=phase_of, metrics={"throughput": 1.5})
    out = tmp_path / "exports"
    assert result.directory == out and leftovers(out) == []

    db_tasks = db_rows(sqlite_store.board, tasks)
    with sqlite_store.board.read() as conn:
        links = conn.execute(select(task_links.c.parent_id, task_links.c.child_id)).all()
    runs_of = {t["id"]: sum(r["task_id"] == t["id"] for r in db_rows(sqlite_store.board, task_runs))
               for t in db_tasks}
    expected_tasks = [{
        "id": t["id"], "title": t["title"], "phase": phase_of.get(t["id"], "(none)"), "status": t["status"],
        "assignee": text(t["assignee"]), "priority": text(t["priority"]), "created_by": text(t["created_by"]),
        "created_at": iso(t["created_at"]), "started_at": iso(t["started_at"]),
        "completed_at": iso(t["completed_at"]),
        "lead_time_seconds": text(t["completed_at"] and t["completed_at"] - t["created_at"]),
        "cycle_time_seconds": text(t["completed_at"] and t["started_at"] and t["completed_at"] - t["started_at"]),
        "runs": str(runs_of[t["id"]]),
        "parents": " ".join(sorted(p for p, c in links if c == t["id"])),
        "consecutive_failures": text(t["consecutive_failures"]), "block_kind": text(t["block_kind"]),
        "last_failure_error": text(t["last_failure_error"]), "result": text(t["result"]), "body": text(t["body"]),
        **{c.name: "" for c in TASK_USAGE_COLUMNS},  # no run was metered
    } for t in db_tasks]
    assert read_csv_rows(out / "tasks.csv") == expected_tasks
    by_id = {t["id"]: t for t in read_csv_rows(out / "tasks.csv")}
    assert by_id[ids["a"]]["lead_time_seconds"] == "400" and by_id[ids["a"]]["cycle_time_seconds"] == "300"
    assert by_id[ids["c"]]["parents"] == " ".join(sorted([ids["a"], ids["b"]]))
    assert [by_id[ids[k]]["status"] for k in "abcd"] == ["done", "running", "archived", "blocked"]

    db_runs = db_rows(sqlite_store.board, task_runs)
    assert len(db_runs) >= 2
    assert read_csv_rows(out / "runs.csv") == [{
        "id": str(r["id"]), "task_id": r["task_id"], "phase": phase_of.get(r["task_id"], "(none)"),
        "profile": text(r["profile"]), "step_key": text(r["step_key"]), "status": r["status"],
        "outcome": text(r["outcome"]), "started_at": iso(r["started_at"]), "ended_at": iso(r["ended_at"]),
        "duration_seconds": text(r["ended_at"] and r["ended_at"] - r["started_at"]),
        "last_heartbeat_at": iso(r["last_heartbeat_at"]), "claim_lock": text(r["claim_lock"]),
        "worker_pid": text(r["worker_pid"]), "summary": text(r["summary"]), "error": text(r["error"]),
        "metadata": text(r["metadata"]), **{c.name: "" for c in RUN_USAGE_COLUMNS},
    } for r in db_runs]

    db_events = db_rows(sqlite_store.board, task_events)
    assert read_csv_rows(out / "events.csv") == [{
        "id": str(e["id"]), "task_id": e["task_id"], "run_id": text(e["run_id"]), "kind": e["kind"],
        "created_at": iso(e["created_at"]), "payload": text(e["payload"]),
    } for e in db_events]

    # board.json: the same rows, typed, text raw
    doc = load_board(out)
    assert doc["format"] == "sparkops-board-export" and doc["version"] == 1
    assert doc["generated_at"] == iso(NOW + 1000)
    assert doc["board"] == mask_url(sqlite_store.board.url)
    assert doc["metrics"] == {"throughput": 1.5}
    for table, columns in (("tasks", TASK_COLUMNS), ("runs", RUN_COLUMNS), ("events", EVENT_COLUMNS)):
        assert doc[table]["columns"] == [c.name for c in columns]
    assert [(t["id"], t["status"], t["priority"], t["created_at"], t["lead_time_seconds"], t["parents"])
            for t in json_records(doc, "tasks")] == [
        (t["id"], t["status"], t["priority"], iso(t["created_at"]),
         t["completed_at"] - t["created_at"] if t["completed_at"] else None,
         sorted(p for p, c in links if c == t["id"])) for t in db_tasks]
    assert [(r["id"], r["task_id"], r["ended_at"], r["metadata"]) for r in json_records(doc, "runs")] == [
        (r["id"], r["task_id"], iso(r["ended_at"]) or None, r["metadata"]) for r in db_runs]
    assert json_records(doc, "events") == [{**e, "created_at": iso(e["created_at"])} for e in db_events]
    for name in CSV_FILES:
        data = (out / name).read_bytes()
        assert doc["files"][name] == {"rows": len(read_csv_rows(out / name)), "bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
        assert result.files[name].sha256 == doc["files"][name]["sha256"]
    assert verify_export(out) == []


def test_pandas_reads_the_same_rows_and_the_recipes_in_the_doc_run(ctx, sqlite_store, tmp_path,
                                                                   monkeypatch):
    ids = build_board(sqlite_store.board)
    board.create_task(sqlite_store.board, "=odd, \"title\"\nwith a newline 🚀", body="-1+1", now=NOW + 800)
    export.export(ctx, now=NOW + 1000, phase_of={ids["a"]: "P1"})
    out = tmp_path / "exports"
    for name in CSV_FILES:
        frame = pd.read_csv(out / name, dtype=str, keep_default_na=False)
        frame = frame.apply(lambda column: column.str.removeprefix("'"))
        assert list(frame.columns) == [c.name for c in CSV_FILES[name]]
        assert frame.to_dict("records") == read_csv_rows(out / name), name
    typed = pd.read_csv(out / "tasks.csv", parse_dates=["created_at", "completed_at"])
    assert str(typed["created_at"].dt.tz) == "UTC"
    assert [int(t.timestamp()) for t in typed["created_at"]] == [
        t["created_at"] for t in db_rows(sqlite_store.board, tasks)]

    # every python block of docs/export.md that reads exports/ runs as written
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    recipes = [b for b in blocks if "exports/" in b]
    assert len(recipes) >= 2
    monkeypatch.chdir(tmp_path)
    scopes = []
    for recipe in recipes:
        scopes.append({})
        exec(compile(recipe, str(DOC), "exec"), scopes[-1])  # noqa: S102 - our own documentation
    scope = next(s for s in scopes if "lead_time_by_phase" in s)
    assert scope["lead_time_by_phase"]["P1"] == 400
    events = next(s for s in scopes if "events" in s)["events"]
    assert list(events["id"]) == [e["id"] for e in db_rows(sqlite_store.board, task_events)]
    frame = scope["tasks"]
    assert str(frame["completed_at"].dt.tz) == "UTC" and frame["completed_at"].isna().sum() == 4
    assert "=odd, \"title\"\nwith a newline 🚀" in set(frame["title"])


def test_times_are_iso_utc_and_durations_exact_seconds(ctx, sqlite_store, tmp_path):
    at = 1_795_926_000  # 2026-11-29T04:20:00Z
    with sqlite_store.board.write() as conn:
        conn.execute(insert(tasks), [
            {"id": "t_done", "title": "done", "status": "done", "created_at": at - 86_400 - 1,
             "started_at": at - 3600, "completed_at": at, "workspace_kind": "scratch"},
            {"id": "t_new", "title": "new", "status": "todo", "created_at": 0, "started_at": None,
             "completed_at": None, "workspace_kind": "scratch"},
            {"id": "t_old", "title": "before 1970", "status": "todo", "created_at": -1, "started_at": None,
             "completed_at": None, "workspace_kind": "scratch"},
        ])
        conn.execute(insert(task_runs), [
            {"id": 7, "task_id": "t_done", "status": "done", "outcome": "completed", "started_at": at - 3600,
             "ended_at": at - 1, "last_heartbeat_at": at - 2},
            {"id": 8, "task_id": "t_done", "status": "running", "outcome": None, "started_at": at,
             "ended_at": None, "last_heartbeat_at": None},
        ])
        conn.execute(insert(task_events), [{"id": 3, "task_id": "t_done", "run_id": 7, "kind": "completed",
                                            "payload": None, "created_at": at}])
    export.export(ctx, now=at)
    out = tmp_path / "exports"
    got = {t["id"]: t for t in read_csv_rows(out / "tasks.csv")}
    assert (got["t_done"]["created_at"], got["t_done"]["started_at"], got["t_done"]["completed_at"]) == (
        "2026-11-28T04:19:59Z", "2026-11-29T03:20:00Z", "2026-11-29T04:20:00Z")
    assert (got["t_done"]["lead_time_seconds"], got["t_done"]["cycle_time_seconds"]) == ("86401", "3600")
    assert got["t_new"]["created_at"] == "1970-01-01T00:00:00Z"
    assert got["t_old"]["created_at"] == "1969-12-31T23:59:59Z"
    assert [got["t_new"][k] for k in ("started_at", "completed_at", "lead_time_seconds", "cycle_time_seconds")] \
        == ["", "", "", ""]
    runs = read_csv_rows(out / "runs.csv")
    assert [(r["id"], r["started_at"], r["ended_at"], r["duration_seconds"], r["last_heartbeat_at"])
            for r in runs] == [("7", "2026-11-29T03:20:00Z", "2026-11-29T04:19:59Z", "3599", "2026-11-29T04:19:58Z"),
                               ("8", "2026-11-29T04:20:00Z", "", "", "")]
    assert read_csv_rows(out / "events.csv") == [{"id": "3", "task_id": "t_done", "run_id": "7",
                                                  "kind": "completed", "created_at": "2026-11-29T04:20:00Z",
                                                  "payload": ""}]
    doc = load_board(out)
    assert json_records(doc, "runs")[1]["ended_at"] is None and json_records(doc, "runs")[0]["duration_seconds"] == 3599
    iso_shape = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
    for name, columns in CSV_FILES.items():
        for row in read_csv_rows(out / name):
            for column in columns:
                if column.kind == "time" and row[column.name]:
                    assert iso_shape.match(row[column.name]), (name, column.name, row[column.name])
                if column.kind in ("seconds", "integer") and row[column.name]:
                    assert re.fullmatch(r"-?\d+", row[column.name]), (name, column.name)


def test_iso_time_edges():
    assert cells.iso_time(None) is None
    assert cells.iso_time(1_795_926_000) == "2026-11-29T04:20:00Z"
    assert cells.iso_time(1_795_926_000.9) == "2026-11-29T04:20:00Z"  # whole seconds, floored
    assert cells.iso_time(253_402_300_799) == "9999-12-31T23:59:59Z"
    assert cells.iso_time(253_402_300_800) == "253402300800"  # past year 9999: the raw number
    assert cells.iso_time("garbage") == "garbage"
    values = [None, 0, 59, 86_399, 86_400, 1_795_926_000, -86_401, 10**15, "x", 1.5]
    assert cells.times(values) == [cells.iso_time(v) for v in values]


# -- odd text and formulas --------------------------------------------------------------


def test_odd_text_round_trips_and_no_cell_can_run_as_a_formula(ctx, sqlite_store, tmp_path):
    with sqlite_store.board.write() as conn:
        conn.execute(insert(tasks), [
            {"id": f"t_odd{i:02d}", "title": value, "body": value, "result": value, "assignee": value,
             "status": "done", "created_at": NOW, "workspace_kind": "scratch", "last_failure_error": value}
            for i, value in enumerate(ODD)])
        conn.execute(insert(task_runs), [{"task_id": f"t_odd{i:02d}", "status": "done", "started_at": NOW,
                                          "summary": value, "error": value, "metadata": value}
                                         for i, value in enumerate(ODD)])
        conn.execute(insert(task_events), [{"task_id": f"t_odd{i:02d}", "kind": value or "x", "payload": value,
                                            "created_at": NOW} for i, value in enumerate(ODD)])
    phase_of = {f"t_odd{i:02d}": value for i, value in enumerate(ODD) if value}
    export.export(ctx, now=NOW, phase_of=phase_of)
    out = tmp_path / "exports"

    got = read_csv_rows(out / "tasks.csv")
    assert [(t["title"], t["body"], t["result"], t["assignee"], t["last_failure_error"]) for t in got] == [
        (v, v, v, v, v) for v in ODD]
    assert [t["phase"] for t in got] == [v or "(none)" for v in ODD]
    assert [(r["summary"], r["error"], r["metadata"]) for r in read_csv_rows(out / "runs.csv")] == [
        (v, v, v) for v in ODD]
    assert [(e["kind"], e["payload"]) for e in read_csv_rows(out / "events.csv")] == [(v or "x", v) for v in ODD]
    listed = [p["phase"] for p in read_csv_rows(out / "phases.csv")]
    assert sorted(listed) == sorted({v or "(none)" for v in ODD}) and listed[-1] == "(none)"

    # what a spreadsheet sees: no cell that starts like a formula; escaped cells are ' + the text
    for name in CSV_FILES:
        with open(out / name, encoding="utf-8", newline="") as fh:
            raw = list(csv.reader(fh))
        for row in raw:
            for cell in row:
                assert not cell.startswith(FORMULA_START), (name, cell)
    with open(out / "tasks.csv", encoding="utf-8", newline="") as fh:
        titles = [row["title"] for row in csv.DictReader(fh)]
    assert titles == [("'" + v) if v.startswith(("=", "+", "-", "@", "\t", "\r", "'")) else v for v in ODD]
    assert (out / "tasks.csv").read_bytes()[:3] != b"\xef\xbb\xbf"  # no BOM

    # JSON keeps the raw text
    doc = load_board(out)
    assert [t["title"] for t in json_records(doc, "tasks")] == ODD
    assert [e["payload"] for e in json_records(doc, "events")] == ODD


def test_escape_is_reversible():
    for value in [*ODD, "'", "''", "'=", "=", "-", "x'", "\t"]:
        escaped = cells.escape_cell(value)
        assert not escaped.startswith(FORMULA_START)
        assert cells.unescape_cell(escaped) == value
    assert cells.escape_cell(None) is None and cells.escape_cell(5) == 5
    assert cells.escaped(["=a", 5, None, "b"]) == ["'=a", 5, None, "b"]  # SQLite may hold a number


# -- phases -----------------------------------------------------------------------------


def test_phases_csv_is_the_review_summary_and_the_tasks_grouped_by_phase(ctx, sqlite_store, tmp_path):
    db = sqlite_store.board
    build_board(db)
    e = board.create_task(db, "[P2] more", now=NOW + 40)
    board.claim(db, e, lock="host:1", now=NOW + 900)
    board.complete(db, e, now=NOW + 950)
    resolved = phases.resolve(db, sqlite_store.ops, [r"\[P(\d+)\]"])  # untagged tasks: by depth
    export.export(ctx, now=NOW + 1000, phase_of={t: p.phase for t, p in resolved.items()})
    out = tmp_path / "exports"
    expected = [{k: (iso(v) if k.endswith("_at") else str(v)) for k, v in row.items()}
                for row in phases.summary(db, resolved)]
    got = read_csv_rows(out / "phases.csv")
    assert got == expected
    assert [p["phase"] for p in got] == ["P1", "P2", "P3"]
    assert [c.name for c in PHASE_COLUMNS] == list(expected[0])
    # grouping tasks.csv by phase gives the same counts
    frame = pd.read_csv(out / "tasks.csv", dtype=str, keep_default_na=False)
    for row in got:
        members = frame[frame["phase"] == row["phase"]]
        assert int(row["total"]) == len(members)
        assert int(row["done"]) == (members["status"] == "done").sum()
        assert int(row["open"]) == (~members["status"].isin(["done", "archived"])).sum()
        assert int(row["blocked"]) == (members["status"] == "blocked").sum()
    assert load_board(out)["phases"]["rows"][0][0] == "P1"


def test_without_phases_every_task_is_in_none(ctx, sqlite_store, tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    assert {t["phase"] for t in read_csv_rows(out / "tasks.csv")} == {"(none)"}
    assert read_csv_rows(out / "phases.csv") == [{
        "phase": "(none)", "total": "4", "done": "1", "archived": "1", "open": "2", "blocked": "1",
        "running": "1", "first_created_at": iso(NOW), "last_completed_at": iso(NOW + 400)}]


def test_an_empty_board_exports_headers_and_valid_json(ctx, tmp_path):
    result = export.export(ctx, now=NOW)
    out = tmp_path / "exports"
    for name, columns in CSV_FILES.items():
        assert (out / name).read_bytes() == (",".join(c.name for c in columns) + "\r\n").encode()
        assert result.rows(name) == 0
    doc = load_board(out)
    assert [doc[t]["rows"] for t in ("tasks", "runs", "events", "phases")] == [[], [], [], []]
    assert doc["metrics"] is None
    assert doc["usage"] == {"currency": "USD", "energy_price_per_kwh": 0.0,
                            "api_price_per_million_prompt_tokens": 0.0,
                            "api_price_per_million_generation_tokens": 0.0, "total": Spend().as_dict()}
    assert result.summary().startswith("exported 0 tasks, 0 runs, 0 events, 0 phases to ")


# -- usage ----------------------------------------------------------------------------

#: Prices in a currency of their own, so that a cost reported in USD is not "paid".
PRICES = {"SPARKOPS_USAGE_ENERGY_PRICE_PER_KWH": "0.3", "SPARKOPS_USAGE_CURRENCY": "EUR",
          "SPARKOPS_USAGE_API_PRICE_PER_MILLION_PROMPT_TOKENS": "3",
          "SPARKOPS_USAGE_API_PRICE_PER_MILLION_GENERATION_TOKENS": "15"}
NUMBER_CELL = re.compile(r"\d+\.\d+(e[+-]\d+)?|\d+(\.\d+)?e[+-]\d+")  # what repr() makes of a float


class Host:
    """A host's meters, counting up as runs on it use them: a first and a last sample
    per run, kept with ``ledger.record``."""

    def __init__(self, ops, name: str = "h"):
        self.ops, self.name = ops, name
        self.counters = {"prompt_tokens": 0.0, "generation_tokens": 0.0, "requests": 0.0, "energy_j": 0.0}

    def sample(self, run_id: int, task_id: str, at: float, *, util: float = 50.0, ended: bool = False,
               **used: float) -> None:
        for name, amount in used.items():
            self.counters[name] += amount
        ledger.record(self.ops, run_id=run_id, task_id=task_id, host=self.name, ended=ended,
                      sample=Sample(at=at, **self.counters, gpu_util_pct=util, sources={"vllm": "ok", "gpu": "ok"}))

    def run(self, run_id: int, task_id: str, start: float, end: float, **used: float) -> None:
        """One run alone on the host from ``start`` to ``end``: its usage is exactly ``used``."""
        self.sample(run_id, task_id, start)
        self.sample(run_id, task_id, end, ended=True, **used)


def usage_board(store) -> dict:
    """Tasks and runs with every kind of usage: measured (a task failed once and
    retried), measured and reported, reported only (in another currency), two runs
    sharing a host (estimated), not metered at all, and a usage row whose run is not
    on the board."""
    db, ops = store.board, store.ops
    a = board.create_task(db, "metered, retried", now=NOW)
    r1 = board.claim(db, a, lock="host:1", now=NOW + 100).run_id
    board.fail(db, a, run_id=r1, outcome=Outcome.CRASHED, error="boom", failure_limit=3, now=NOW + 200)
    r2 = board.claim(db, a, lock="host:1", now=NOW + 300).run_id
    board.complete(db, a, now=NOW + 500)
    b = board.create_task(db, "not metered", now=NOW + 1)
    r3 = board.claim(db, b, lock="host:1", now=NOW + 600).run_id
    board.complete(db, b, now=NOW + 700)
    c = board.create_task(db, "reported only", now=NOW + 2)
    r4 = board.claim(db, c, lock="host:1", now=NOW + 800).run_id
    board.complete(db, c, now=NOW + 900)
    d = board.create_task(db, "shared host", now=NOW + 3)
    r5 = board.claim(db, d, lock="host:2", now=NOW + 1000).run_id
    board.complete(db, d, now=NOW + 1020)
    e = board.create_task(db, "shared host too", now=NOW + 4)
    r6 = board.claim(db, e, lock="host:2", now=NOW + 1010).run_id  # still running

    host = Host(ops)
    host.run(r1, a, NOW + 100, NOW + 200, prompt_tokens=1000, generation_tokens=500, requests=4, energy_j=7200)
    host.run(r2, a, NOW + 300, NOW + 500, prompt_tokens=2000, generation_tokens=800, requests=6,
             energy_j=3 * 3600)
    ledger.report(ops, run_id=r2, task_id=a, host="h",
                  reported=Reported(prompt_tokens=2500, generation_tokens=900, cost=0.25, currency="EUR"))
    ledger.report(ops, run_id=r4, task_id=c, host="h",
                  reported=Reported(prompt_tokens=40_000, generation_tokens=1_000, cost=1.5, currency="USD"))
    ledger.report(ops, run_id=9999, task_id=a, host="h", reported=Reported(prompt_tokens=10**6, cost=99.0))
    other = Host(ops, "h2")
    other.sample(r5, d, NOW + 1000)
    other.sample(r6, e, NOW + 1010, prompt_tokens=100, energy_j=360)
    other.sample(r5, d, NOW + 1020, ended=True, prompt_tokens=100, energy_j=360)
    other.sample(r6, e, NOW + 1030, prompt_tokens=100, energy_j=360)
    return {"tasks": {"a": a, "b": b, "c": c, "d": d, "e": e},
            "runs": {"r1": r1, "r2": r2, "r3": r3, "r4": r4, "r5": r5, "r6": r6}}


def expected_cell(value, kind: str) -> str:
    if value is None:
        return ""
    return str(int(value)) if kind == "integer" else repr(float(value))


def test_each_runs_usage_reads_back_to_the_ops_database_and_unmetered_runs_are_empty(sqlite_store, tmp_path,
                                                                                       monkeypatch):
    made = usage_board(sqlite_store)
    t, r = made["tasks"], made["runs"]
    ctx = JobContext.create(make_settings(tmp_path, **PRICES), sqlite_store)
    calls = []
    for name in ("of_runs", "of_tasks"):  # the usage is read per chunk of rows, not all at once
        real = getattr(ledger, name)
        monkeypatch.setattr(ledger, name, lambda db, ids, real=real, name=name: (calls.append((name, len(ids))),
                                                                                 real(db, ids))[1])
    monkeypatch.setattr(export, "CHUNK_ROWS", 2)
    export.export(ctx, now=NOW + 2000, phase_of={t["a"]: "P1", t["b"]: "P1"})
    out = tmp_path / "exports"
    assert {n for n, _ in calls} == {"of_runs", "of_tasks"} and max(size for _, size in calls) <= 2
    assert sum(size for n, size in calls if n == "of_runs") == 6

    runs = {int(row["id"]): row for row in read_csv_rows(out / "runs.csv")}
    assert list(runs) == sorted(r.values())
    names = [c.name for c in RUN_COLUMNS]
    assert names[:16] == ["id", "task_id", "phase", "profile", "step_key", "status", "outcome", "started_at",
                          "ended_at", "duration_seconds", "last_heartbeat_at", "claim_lock", "worker_pid",
                          "summary", "error", "metadata"]  # the columns before stay where they were
    assert names[16:] == ["prompt_tokens", "generation_tokens", "requests", "energy_wh", "gpu_seconds",
                          "usage_estimated", "usage_reported", "paid", "energy_cost", "api_cost"]

    def figures(run_id: int) -> dict:
        return {c.name: runs[run_id][c.name] for c in RUN_USAGE_COLUMNS}

    # measured alone on the host: exactly the counters' increase, priced
    assert figures(r["r1"]) == {
        "prompt_tokens": "1000.0", "generation_tokens": "500.0", "requests": "4.0", "energy_wh": "2.0",
        "gpu_seconds": "50.0", "usage_estimated": "0", "usage_reported": "0", "paid": "",
        "energy_cost": repr(2.0 / 1000 * 0.3), "api_cost": repr((1000 * 3 + 500 * 15) / 1e6)}
    # measured and reported: the agent's token counts, vLLM's requests, the GPUs' energy, what it paid
    assert figures(r["r2"]) == {
        "prompt_tokens": "2500.0", "generation_tokens": "900.0", "requests": "6.0", "energy_wh": "3.0",
        "gpu_seconds": "100.0", "usage_estimated": "0", "usage_reported": "1", "paid": "0.25",
        "energy_cost": repr(3.0 / 1000 * 0.3), "api_cost": repr((2500 * 3 + 900 * 15) / 1e6)}
    assert figures(r["r3"]) == {c.name: "" for c in RUN_USAGE_COLUMNS}  # not metered: empty, never 0
    # reported only, in USD while the prices are in EUR: not counted as paid
    assert figures(r["r4"]) == {
        "prompt_tokens": "40000.0", "generation_tokens": "1000.0", "requests": "", "energy_wh": "",
        "gpu_seconds": "", "usage_estimated": "0", "usage_reported": "1", "paid": "", "energy_cost": "",
        "api_cost": repr((40_000 * 3 + 1_000 * 15) / 1e6)}
    assert runs[r["r5"]]["usage_estimated"] == runs[r["r6"]]["usage_estimated"] == "1"  # shared a host
    assert float(runs[r["r5"]]["energy_wh"]) + float(runs[r["r6"]]["energy_wh"]) == pytest.approx(0.3)

    # every cell is the ledger's usage as a Spend, exactly (repr round-trips a float)
    usage = ledger.of_runs(sqlite_store.ops, list(runs))
    prices = Prices.of(ctx.settings)
    spends = {run_id: Spend.of(usage.get(run_id), prices) for run_id in runs}
    for run_id, row in runs.items():
        spend = spends[run_id]
        for column in RUN_USAGE_COLUMNS:
            attr = {"usage_estimated": "estimated", "usage_reported": "reported"}.get(column.name, column.name)
            value = getattr(spend, attr) if spend.metered else None
            assert row[column.name] == expected_cell(value, column.kind), (run_id, column.name)
            if row[column.name] and column.kind == "number":
                assert NUMBER_CELL.fullmatch(row[column.name]) and float(row[column.name]) == value

    # board.json: the same figures typed (null where not measured), the prices and the total
    doc = load_board(out)
    as_json = {row["id"]: row for row in json_records(doc, "runs")}
    assert all(as_json[r["r3"]][c.name] is None for c in RUN_USAGE_COLUMNS)
    assert as_json[r["r2"]]["prompt_tokens"] == 2500.0 and as_json[r["r2"]]["usage_reported"] == 1
    assert as_json[r["r1"]]["paid"] is None and as_json[r["r1"]]["energy_wh"] == 2.0
    expected_total = total(spends.values())  # the row for run 9999, not on the board, is left out
    assert {k: v for k, v in doc["usage"].items() if k != "total"} == {
        "currency": "EUR", "energy_price_per_kwh": 0.3, "api_price_per_million_prompt_tokens": 3.0,
        "api_price_per_million_generation_tokens": 15.0}
    assert doc["usage"]["total"] == pytest.approx(expected_total.as_dict())  # summed per chunk: in another order
    assert (doc["usage"]["total"]["runs"], doc["usage"]["total"]["metered"], doc["usage"]["total"]["reported"],
            doc["usage"]["total"]["estimated"], doc["usage"]["total"]["paid"]) == (6, 5, 2, 2, 0.25)
    assert verify_export(out) == []


def test_each_tasks_usage_sums_its_runs_retries_included(sqlite_store, tmp_path):
    made = usage_board(sqlite_store)
    t = made["tasks"]
    ctx = JobContext.create(make_settings(tmp_path, **PRICES), sqlite_store)
    export.export(ctx, now=NOW + 2000)
    out = tmp_path / "exports"
    tasks_ = {row["id"]: row for row in read_csv_rows(out / "tasks.csv")}
    assert [c.name for c in TASK_COLUMNS][-5:] == ["body", "tokens", "energy_wh", "gpu_seconds", "cost"]

    def figures(task_id: str) -> tuple:
        return tuple(tasks_[task_id][c.name] for c in TASK_USAGE_COLUMNS)

    # a: the failed run and its retry (1500 measured + 3400 reported tokens), not the row for run 9999
    assert tasks_[t["a"]]["runs"] == "2"
    assert figures(t["a"]) == ("4900.0", "5.0", "150.0", repr(2.0 / 1000 * 0.3 + 0.25 + 3.0 / 1000 * 0.3))
    assert figures(t["b"]) == ("", "", "", "")  # no run metered
    assert figures(t["c"]) == ("41000.0", "", "", "")  # no energy, and paid in another currency: no cost
    # grouping runs.csv by task gives the same sums
    frame = pd.read_csv(out / "runs.csv", dtype={"task_id": str})
    for task_id, row in tasks_.items():
        mine = frame[frame["task_id"] == task_id]
        sums = {"tokens": (mine["prompt_tokens"].sum(min_count=1), mine["generation_tokens"].sum(min_count=1)),
                "energy_wh": mine["energy_wh"].sum(min_count=1), "gpu_seconds": mine["gpu_seconds"].sum(min_count=1)}
        tokens = [v for v in sums.pop("tokens") if not math.isnan(v)]
        assert (float(row["tokens"]) if row["tokens"] else None) == (pytest.approx(sum(tokens)) if tokens else None)
        for name, value in sums.items():
            assert (float(row[name]) if row[name] else None) == (None if math.isnan(value) else pytest.approx(value))
    as_json = {row["id"]: row for row in json_records(load_board(out), "tasks")}
    assert (as_json[t["a"]]["tokens"], as_json[t["b"]]["tokens"], as_json[t["b"]]["cost"]) == (4900.0, None, None)

    # docs/export.md's recipe for the usage figures runs as written
    recipe = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
                  if "energy_wh_by_phase" in b)
    scope: dict = {}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(recipe, str(DOC), "exec"), scope)  # noqa: S102 - our own documentation
    finally:
        os.chdir(cwd)
    assert scope["energy_wh_by_phase"]["(none)"] == pytest.approx(2.0 + 3.0 + 0.3)


def test_no_usage_value_can_make_a_formula_or_a_bad_number(sqlite_store, tmp_path):
    db = sqlite_store.board
    ids = [board.create_task(db, f"task {i}", now=NOW + i) for i in range(3)]
    runs = [board.claim(db, task_id, lock="host:1", now=NOW + 10).run_id for task_id in ids]
    bad = {"prompt_tokens": "=cmd()", "generation_tokens": "+1", "requests": "@SUM(A1)", "energy_j": "-1+1",
           "gpu_seconds": "\t1", "estimated": "=1", "seconds": "'x"}
    with sqlite_store.ops.write() as conn:  # rows another tool (or a bug) could have written
        conn.execute(insert(ops_run_usage), [
            {"run_id": runs[0], "task_id": ids[0], "host": "h", "first_at": NOW, "last_at": NOW, "ended": 1,
             "data": json.dumps(bad), "reported": json.dumps({"prompt_tokens": "=2+2", "cost": "-3"})},
            {"run_id": runs[1], "task_id": ids[1], "host": "h", "first_at": NOW, "last_at": NOW, "ended": 1,
             "data": '{"prompt_tokens": Infinity, "energy_j": NaN, "gpu_seconds": -Infinity, "requests": 1e308}',
             "reported": None},
            {"run_id": runs[2], "task_id": ids[2], "host": "h", "first_at": NOW, "last_at": NOW, "ended": 1,
             "data": "not json", "reported": '{"generation_tokens": 1e-7}'},
        ])
    ctx = JobContext.create(make_settings(tmp_path, SPARKOPS_USAGE_ENERGY_PRICE_PER_KWH="0.3"), sqlite_store)
    export.export(ctx, now=NOW + 100)
    out = tmp_path / "exports"
    for name, columns in (("runs.csv", RUN_USAGE_COLUMNS), ("tasks.csv", TASK_USAGE_COLUMNS)):
        with open(out / name, encoding="utf-8", newline="") as fh:
            raw = list(csv.DictReader(fh))
        for row in raw:
            for column in columns:
                cell = row[column.name]
                assert cell == "" or (NUMBER_CELL.fullmatch(cell) if column.kind == "number"
                                      else cell in ("0", "1")), (name, column.name, cell)
                assert not cell.startswith((*FORMULA_START, "'"))
    got = {int(row["id"]): row for row in read_csv_rows(out / "runs.csv")}
    # the text is no figure: metered, but nothing measured
    assert [got[runs[0]][c.name] for c in RUN_USAGE_COLUMNS] == ["", "", "", "", "", "0", "0", "", "", ""]
    assert got[runs[1]]["requests"] == "1e+308"  # kept: a finite number
    assert [got[runs[1]][n] for n in ("prompt_tokens", "energy_wh", "gpu_seconds", "energy_cost")] == [""] * 4
    assert (got[runs[2]]["generation_tokens"], got[runs[2]]["usage_reported"]) == ("1e-07", "1")
    # board.json stays strict JSON: no NaN or Infinity anywhere, the total included
    def refuse(constant: str):
        raise ValueError(f"{constant} in board.json")
    doc = json.loads((out / "board.json").read_text(encoding="utf-8"), parse_constant=refuse)
    assert doc["usage"]["total"]["requests"] == 1e308 and doc["usage"]["total"]["prompt_tokens"] is None
    assert doc["usage"]["total"]["generation_tokens"] == 1e-07


def test_a_sum_of_spends_is_the_same_as_adding_them_one_by_one():
    prices = Prices(per_kwh=0.3, prompt_per_million=3.0, generation_per_million=15.0, currency="EUR")
    usages = [None, Usage(), Usage(prompt_tokens=10.0, energy_j=3600.0, estimated=True),
              Usage(generation_tokens=0.1, gpu_seconds=2.0, reported=Reported(prompt_tokens=0.2, cost=0.3)),
              Usage(requests=3.0, energy_j=0.7), Usage(prompt_tokens=1e-9, generation_tokens=1e12)]
    spends = [Spend.of(u, prices) for u in usages]
    for n in range(len(spends) + 1):
        one_by_one = Spend()
        for spend in spends[:n]:
            one_by_one = one_by_one + spend
        assert total(spends[:n]) == (one_by_one if n else Spend())  # exactly: the same additions in the same order
    assert total(spends[2:3]) is spends[2]
    assert export_usage.numbers([None, 1.5, 2, True, "=1", float("inf"), float("nan"), -0.5]) == [
        None, 1.5, 2.0, None, None, None, None, -0.5]


def test_an_ops_database_that_cannot_be_read_is_a_storage_error_and_changes_nothing(ctx, sqlite_store, tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    before = files_bytes(out)
    with sqlite_store.ops.write() as conn:
        conn.exec_driver_sql("DROP TABLE ops_run_usage")
    with pytest.raises(StorageError, match="cannot read the runs' usage for the export from the ops database "
                                           ".*ops_run_usage"):
        export.export(ctx, now=NOW + 2000)
    assert files_bytes(out) == before and leftovers(out) == []


# -- atomic replacement ------------------------------------------------------------------


@pytest.mark.parametrize("failing", FILES)
def test_a_failed_rename_leaves_the_whole_previous_export_byte_identical(ctx, sqlite_store, tmp_path,
                                                                         monkeypatch, failing):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000, metrics={"v": 1})
    out = tmp_path / "exports"
    before = files_bytes(out)
    board.create_task(sqlite_store.board, "a change", now=NOW + 1100)  # every file changes
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == failing:
            raise OSError(5, "Input/output error (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(export.ExportError, match=r"cannot export to .*: Input/output error \(simulated\); "
                                                 r"check export.dir"):
        export.export(ctx, now=NOW + 2000, metrics={"v": 2})
    assert files_bytes(out) == before
    assert leftovers(out) == []
    assert verify_export(out) == []
    monkeypatch.setattr(os, "replace", real_replace)
    export.export(ctx, now=NOW + 2000, metrics={"v": 2})
    assert load_board(out)["metrics"] == {"v": 2} and files_bytes(out)["tasks.csv"] != before["tasks.csv"]


def test_a_failed_first_export_leaves_nothing_behind(ctx, sqlite_store, tmp_path, monkeypatch):
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "board.json":
            raise OSError(28, "No space left on device (simulated)")
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(export.ExportError, match="No space left on device"):
        export.export(ctx, now=NOW)
    assert sorted(p.name for p in (tmp_path / "exports").iterdir()) == [export.LOCK_NAME]


def test_an_error_while_writing_leaves_the_previous_export_and_no_temporary_file(ctx, sqlite_store, tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    before = files_bytes(out)

    class Broken(dict):
        def get(self, key, default=None):
            raise RuntimeError("phase lookup failed")

    with pytest.raises(RuntimeError, match="phase lookup failed"):
        export.export(ctx, now=NOW + 2000, phase_of=Broken(x="P1"))
    assert files_bytes(out) == before and leftovers(out) == []


def test_a_board_that_cannot_be_read_is_a_storage_error_and_changes_nothing(ctx, sqlite_store, tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    before = files_bytes(out)
    with sqlite_store.board.write() as conn:
        conn.exec_driver_sql("DROP TABLE task_events")
    with pytest.raises(StorageError, match="cannot export from the board database .*task_events"):
        export.export(ctx, now=NOW + 2000)
    assert files_bytes(out) == before and leftovers(out) == []


KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from sparkops.sprint import export
    from sparkops.config import load_settings
    from sparkops.jobs.framework import JobContext
    from sparkops.storage.store import open_store

    name, at = sys.argv[1], int(sys.argv[2])
    real, calls = getattr(os, name), []

    def dying(*args, **kwargs):
        calls.append(args)
        if len(calls) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    setattr(os, name, dying)
    settings = load_settings(cwd=Path.cwd())
    export.export(JobContext.create(settings, open_store(settings)), now=2_000_000_000)
""")


def kill_export_at(tmp_path: Path, call: str, at: int) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")},
           "PYTHONPATH": str(ROOT),
           "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}
    done = subprocess.run([sys.executable, "-c", KILLER, call, str(at)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == -signal.SIGKILL, done.stderr


def test_a_process_killed_before_the_renames_leaves_the_previous_export(ctx, sqlite_store, tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    before = files_bytes(out)
    board.create_task(sqlite_store.board, "a change", now=NOW + 1100)
    kill_export_at(tmp_path, "fsync", 3)  # all five written, the third being fsync'ed
    assert files_bytes(out) == before
    assert len(leftovers(out)) == len(FILES)  # nobody was left to remove them ...
    assert all(re.fullmatch(r"\..+\.tmp-[0-9a-f]{12}", n) for n in leftovers(out))
    result = export.export(ctx, now=NOW + 2000)  # ... the next export does
    assert result.stale_removed == len(FILES) and leftovers(out) == [] and verify_export(out) == []


def test_a_process_killed_between_the_renames_leaves_whole_files_and_a_detectable_mix(ctx, sqlite_store,
                                                                                      tmp_path):
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW + 1000)
    out = tmp_path / "exports"
    before = files_bytes(out)
    board.create_task(sqlite_store.board, "a change", now=NOW + 1100)
    kill_export_at(tmp_path, "replace", 3)  # tasks.csv and runs.csv replaced, then killed
    after = files_bytes(out)
    assert after["tasks.csv"] != before["tasks.csv"]
    assert {n: after[n] for n in ("events.csv", "phases.csv", "board.json")} == \
        {n: before[n] for n in ("events.csv", "phases.csv", "board.json")}
    for name in CSV_FILES:  # every file is whole
        assert after[name].endswith(b"\r\n") and read_csv_rows(out / name) is not None
    load_board(out)
    problems = verify_export(out)
    assert any(p.startswith("tasks.csv is not the file board.json was exported with") for p in problems)
    export.export(ctx, now=NOW + 2000)
    assert verify_export(out) == [] and leftovers(out) == []


def test_readers_during_exports_never_see_a_partial_file(ctx, sqlite_store, tmp_path):
    with sqlite_store.board.write() as conn:
        conn.execute(insert(tasks), [{"id": f"t_{i:08x}", "title": f"task {i}", "body": "x" * 2000,
                                      "status": "ready", "created_at": NOW, "workspace_kind": "scratch"}
                                     for i in range(300)])
    out = tmp_path / "exports"
    export.export(ctx, now=NOW)
    counts, seen, failures = {300}, [], []
    stop = threading.Event()

    def read_forever() -> None:
        while not stop.is_set():
            try:
                data = (out / "tasks.csv").read_bytes()
                rows = list(csv.reader(data.decode("utf-8").splitlines(True)))
                doc = load_board(out)
                seen.append((len(rows) - 1, len(doc["tasks"]["rows"])))
                if not data.endswith(b"\r\n"):
                    failures.append("tasks.csv does not end with a row end")
            except Exception as exc:  # noqa: BLE001 - any failure is the finding
                failures.append(repr(exc))

    reader = threading.Thread(target=read_forever)
    reader.start()
    try:
        for i in range(300, 315):
            with sqlite_store.board.write() as conn:
                conn.execute(insert(tasks).values(id=f"t_{i:08x}", title=f"task {i}", body="y" * 2000,
                                                  status="ready", created_at=NOW, workspace_kind="scratch"))
            counts.add(i + 1)
            export.export(ctx, now=NOW + i)
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert seen and all(csv_rows in counts and json_rows in counts for csv_rows, json_rows in seen)
    assert len({csv_rows for csv_rows, _ in seen}) > 1  # it did read while exports ran


def test_one_export_at_a_time_per_directory(ctx, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    with JobLock(out / export.LOCK_NAME), pytest.raises(JobBusy, match="already running"):
        export.export(ctx, now=NOW)
    assert sorted(p.name for p in out.iterdir()) == [export.LOCK_NAME]


def test_an_export_dir_that_is_a_file_is_a_clear_error(ctx, tmp_path):
    (tmp_path / "exports").write_text("not a directory")
    with pytest.raises(export.ExportError, match="cannot export to .*exports.*export.dir"):
        export.export(ctx, now=NOW)


def test_memory_does_not_grow_with_the_number_of_events(ctx, sqlite_store, tmp_path):
    def peak_with(events: int) -> tuple[int, int]:
        with sqlite_store.board.write() as conn:
            conn.execute(task_events.delete())
            conn.execute(insert(task_events), [{"task_id": "t_1", "kind": "commented", "created_at": NOW + i,
                                                "payload": '{"author": "me", "len": 42}'} for i in range(events)])
        tracemalloc.start()
        try:
            result = export.export(ctx, now=NOW)
            return tracemalloc.get_traced_memory()[1], result.files["events.csv"].bytes
        finally:
            tracemalloc.stop()

    small, small_bytes = peak_with(10_000)
    large, large_bytes = peak_with(40_000)
    assert large_bytes > 3.5 * small_bytes
    assert large < 1.5 * small, (small, large)  # 4x the events, about the same peak


# -- the documentation --------------------------------------------------------------------


def documented_tables() -> dict[str, list[tuple[str, str]]]:
    sections = re.split(r"^### `([^`]+)`\n", DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {name: re.findall(r"^\| `(\w+)` \| (\w+) \|", body, flags=re.MULTILINE)
            for name, body in zip(sections[1::2], sections[2::2])}


def test_columns_are_exactly_as_documented(ctx, sqlite_store, tmp_path):
    tables = documented_tables()
    for name, columns in CSV_FILES.items():
        assert tables[name] == [(c.name, c.kind) for c in columns], f"docs/export.md and {name} differ"
    build_board(sqlite_store.board)
    export.export(ctx, now=NOW)
    out = tmp_path / "exports"
    for name in CSV_FILES:  # and the files' header rows are those
        with open(out / name, encoding="utf-8", newline="") as fh:
            assert next(csv.reader(fh)) == [c for c, _ in tables[name]]
    doc = DOC.read_text(encoding="utf-8")
    members_table = doc.split("### `board.json`", 1)[1].split("\n\n", 3)[2]
    documented = {m for line in members_table.splitlines()[2:] for m in re.findall(r"`(\w+)`", line.split("|")[1])}
    assert documented == set(load_board(out))
    for kind in {c.kind for columns in CSV_FILES.values() for c in columns}:
        assert f"*{kind}*" in doc or f"**{kind}**" in doc, f"type {kind} is not explained"


# -- the job, and both backends -------------------------------------------------------------


def test_the_job_resolves_phases_includes_review_metrics_and_records_an_event(ctx, sqlite_store, tmp_path):
    db = sqlite_store.board
    board.create_task(db, "[P1] first", now=NOW)
    board.create_task(db, "Phase 2: second", now=NOW + 1)
    with sqlite_store.ops.write() as conn:
        conn.execute(insert(ops_reports).values(created_at=NOW + 5, host="h", markdown="# review",
                                                metrics=json.dumps({"throughput_per_day": 3.0})))
    report = export.run(ctx, now=NOW + 10)
    out = tmp_path / "exports"
    assert report.acted and report.summary.startswith(f"exported 2 tasks, 0 runs, 2 events, 2 phases to {out} (")
    assert report.details["files"]["tasks.csv"]["rows"] == 2
    assert {t["phase"] for t in read_csv_rows(out / "tasks.csv")} == {"P1", "P2"}
    metrics = load_board(out)["metrics"]
    assert metrics["throughput_per_day"] == 3.0 and metrics["report_created_at"] == iso(NOW + 5)
    with sqlite_store.ops.read() as conn:
        event = conn.execute(select(ops_events).where(ops_events.c.kind == "export")).one()
    assert event.created_at == NOW + 10 and event.subject == str(out)
    assert json.loads(event.payload)["events.csv"] == {"rows": 2, "bytes": (out / "events.csv").stat().st_size}


def test_export_on_both_backends(store, tmp_path):
    ctx = JobContext.create(make_settings(tmp_path, board_url=store.board.url, ops_url=store.ops.url), store)
    ids = build_board(store.board)
    first_run = db_rows(store.board, task_runs)[0]["id"]
    ledger.report(store.ops, run_id=first_run, task_id=ids["a"], host="h",
                  reported=Reported(prompt_tokens=1200, generation_tokens=300, cost=0.5))
    result = export.export(ctx, now=NOW + 1000, phase_of={ids["a"]: "P1"})
    out = tmp_path / "exports"
    db_tasks = db_rows(store.board, tasks)
    assert [(t["id"], t["status"], t["created_at"], t["completed_at"]) for t in read_csv_rows(out / "tasks.csv")] \
        == [(t["id"], t["status"], iso(t["created_at"]), iso(t["completed_at"])) for t in db_tasks]
    assert [(int(r["id"]), r["duration_seconds"]) for r in read_csv_rows(out / "runs.csv")] == [
        (r["id"], text(r["ended_at"] and r["ended_at"] - r["started_at"])) for r in db_rows(store.board, task_runs)]
    assert [int(e["id"]) for e in read_csv_rows(out / "events.csv")] == [
        e["id"] for e in db_rows(store.board, task_events)]
    runs = read_csv_rows(out / "runs.csv")
    assert [(r["prompt_tokens"], r["usage_reported"], r["paid"]) for r in runs] == [
        ("1200.0", "1", "0.5")] + [("", "", "")] * (len(runs) - 1)
    assert {t["id"]: t["tokens"] for t in read_csv_rows(out / "tasks.csv")}[ids["a"]] == "1500.0"
    doc = load_board(out)
    assert doc["board"] == mask_url(store.board.url)
    assert doc["usage"]["total"]["paid"] == 0.5 and doc["usage"]["total"]["metered"] == 1
    assert result.rows("tasks.csv") == 4 and verify_export(out) == []
