"""The demo sprint: its shape on an empty board, and no change to a board in use."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
from collections import Counter

from conftest import NOW, make_settings, run_cli, wait_for

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.config import load_settings
from sparkops.demo import vllm as demo_vllm
from sparkops.demo.sprint import DEMO_TASKS, PLANNER, QUESTIONS, Planner, is_demo_board, seed_demo
from sparkops.demo.vllm import Engine
from sparkops.meters import gpu, nvml_fake
from sparkops.storage.store import open_store
from sparkops.watch import services


def test_seeds_a_three_phase_sprint_on_an_empty_board(store):
    ids = seed_demo(store.board, now=NOW)

    assert len(ids) == len(DEMO_TASKS) == 10
    rows = {t["id"]: t for t in queries.list_tasks(store.board)}
    assert set(rows) == set(ids)
    by_key = {spec.key: rows[task_id] for spec, task_id in zip(DEMO_TASKS, ids)}

    assert Counter(t["status"] for t in rows.values()) == {"todo": 6, "done": 2, "ready": 1, "blocked": 1}
    assert by_key["repo"]["status"] == by_key["schema"]["status"] == "done"
    assert by_key["api"]["status"] == "ready"
    assert by_key["feed"]["status"] == "blocked"
    phases = Counter(re.match(r"\[(P\d)\] ", t["title"]).group(1) for t in rows.values())
    assert phases == {"P1": 3, "P2": 4, "P3": 3}
    assert all(t["assignee"] for t in rows.values())
    assert len({t["priority"] for t in rows.values()}) > 1
    assert all(NOW - 5 * 3600 <= t["created_at"] <= NOW for t in rows.values())

    for spec, task_id in zip(DEMO_TASKS, ids):
        detail = queries.task_detail(store.board, task_id)
        assert detail["parents"] == sorted(by_key[p]["id"] for p in spec.parents)
        parents_done = all(by_key[p]["status"] == "done" for p in spec.parents)
        if rows[task_id]["status"] == "todo":
            assert not parents_done  # todo only while it waits for a parent
        else:
            assert parents_done

    done_runs = queries.list_runs(store.board, task_id=by_key["repo"]["id"])
    assert [(r["outcome"], bool(r["summary"])) for r in done_runs] == [("completed", True)]
    blocked = queries.list_events(store.board, task_id=by_key["feed"]["id"], kinds=["blocked"])
    assert "API key" in blocked[0]["payload"]["reason"]
    assert queries.board_stats(store.board, now=NOW)["active_runs"] == 0
    assert max(e["created_at"] for e in queries.list_events(store.board, limit=1000)) <= NOW


def test_does_nothing_on_a_board_with_tasks(sqlite_store):
    only = board.create_task(sqlite_store.board, "real work", now=NOW)
    assert seed_demo(sqlite_store.board, now=NOW) == []
    assert [t["id"] for t in queries.list_tasks(sqlite_store.board)] == [only]


def test_an_archived_task_also_counts_as_in_use(sqlite_store):
    old = board.create_task(sqlite_store.board, "finished long ago", now=NOW)
    board.archive(sqlite_store.board, old, now=NOW)
    assert seed_demo(sqlite_store.board, now=NOW) == []


def test_seeding_twice_adds_nothing_the_second_time(sqlite_store):
    assert len(seed_demo(sqlite_store.board, now=NOW)) == 10
    assert seed_demo(sqlite_store.board, now=NOW) == []
    assert len(queries.list_tasks(sqlite_store.board)) == 10


def test_demo_command(tmp_path):
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/kanban.db",
           "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/sparkops.db"}
    assert run_cli("init", cwd=tmp_path, env=env).returncode == 0
    first = run_cli("demo", cwd=tmp_path, env=env)
    assert (first.returncode, first.stdout.strip()) == (0, "Created 10 demo tasks")
    again = run_cli("demo", cwd=tmp_path, env=env)
    assert (again.returncode, again.stdout.strip()) == (0, "The board is not empty; no demo tasks added")


# -- the living demo -------------------------------------------------------------------------


def test_the_planner_keeps_work_coming_and_asks_a_person_now_and_then(sqlite_store):
    """One step at a time, the clock given: it tops the open work up, blocks every
    fourth new task on a question, answers its own questions after the delay (as the
    demo's operator) and leaves the sprint's own blocked task for the real one."""
    db = sqlite_store.board
    ids = dict(zip([t.key for t in DEMO_TASKS], seed_demo(db, now=NOW)))
    planner = Planner(target_open=10, question_every=4, answer_after=240)

    said = planner.step(db, now=NOW)
    assert queries.board_stats(db, now=NOW)["open"] == 10  # 8 open in the demo, 2 added
    assert said == [f"added {t}" for t in new_ids(db, NOW)] and planner.added == 2

    board.archive(db, ids["api"], now=NOW + 10)  # work leaves the board: the planner tops it up
    board.archive(db, ids["loadtest"], now=NOW + 10)
    said = planner.step(db, now=NOW + 20)
    asked = [line.split()[1].rstrip(",") for line in said if line.endswith("blocked on a question")]
    assert len(said) == 2 and len(asked) == 1  # the 4th task it added
    task = queries.task_detail(db, asked[0])["task"]
    assert (task["status"], task["block_kind"]) == ("blocked", "needs_input")
    assert task["block_reason"] in QUESTIONS

    assert not [line for line in planner.step(db, now=NOW + 200) if line.startswith("answered")]
    said = planner.step(db, now=NOW + 20 + 240)
    assert f"answered {asked[0]}" in said
    assert queries.get_task(db, asked[0])["status"] == "ready"
    comments = queries.task_detail(db, asked[0])["comments"]
    assert [c["author"] for c in comments] == ["operator (demo)"]
    assert queries.get_task(db, ids["feed"])["status"] == "blocked"  # the sprint's own: the operator's


def test_only_the_demos_own_board_is_a_demo_board(tmp_path):
    demo_store = open_store(make_settings(tmp_path / "demo"), create=True)
    real_store = open_store(make_settings(tmp_path / "real"), create=True)
    try:
        seed_demo(demo_store.board, now=NOW)
        assert is_demo_board(demo_store.board)
        board.create_task(real_store.board, "real work")
        assert not is_demo_board(real_store.board)  # `up --demo` never adds work to a real board
    finally:
        demo_store.dispose()
        real_store.dispose()


def new_ids(db, at: int) -> list[str]:
    return [t["id"] for t in queries.list_tasks(db) if t["created_by"] == PLANNER and t["created_at"] == at]


def test_the_demo_model_server_answers_like_vllm_and_hangs_on_schedule(tmp_path):
    """A real server on loopback, read by the real vLLM check; its hang (requests
    running, tokens frozen) is seen as one, and it ends on schedule."""
    clock = [0.0]
    agents = [2]
    engine = Engine(hang_every=100, hang_for=30, clock=lambda: clock[0], agents=lambda: agents[0])
    server = demo_vllm.serve(free_port(), engine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        spec = spec_for(tmp_path, f"http://127.0.0.1:{server.server_address[1]}")
        memory: dict = {}
        clock[0] = 10
        first = services.check(spec, memory=memory)
        assert first.ok, first.detail
        assert first.data["models"] == ["Qwen3-Coder-30B-A3B (demo)"]
        memory.update(first.data)
        clock[0] = 40
        moving = services.check(spec, memory=memory)
        assert moving.ok, moving.detail
        memory.update(moving.data)
        clock[0] = 75  # hung from 70 to 100
        stuck = services.check(spec, memory=memory)
        memory.update(stuck.data)
        clock[0] = 90
        stuck = services.check(spec, memory=memory)
        assert not stuck.ok and "hung" in stuck.detail, stuck.detail
        memory.update(stuck.data)
        clock[0] = 105
        back = services.check(spec, memory=memory)
        assert back.ok, back.detail
    finally:
        server.shutdown()
        server.server_close()


def spec_for(tmp_path, url: str):
    settings = load_settings(env={"SPARKOPS_SERVICES": json.dumps({"vllm": {"url": url}})}, cwd=tmp_path)
    return next(s for s in settings.services if s.name == "vllm")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_the_demo_gpu_is_a_gb10_with_unified_memory_holding_the_demo_processes(tmp_path, monkeypatch):
    """Only under `up --demo` (its environment variable), and named as a demo."""
    server = subprocess.Popen([sys.executable, "-m", "sparkops", "demo-vllm", "--port", str(free_port())])
    try:
        meminfo = tmp_path / "meminfo"
        meminfo.write_text(nvml_fake.DEMO_MEMINFO)
        monkeypatch.setenv(nvml_fake.DEMO_GPU_ENV, str(meminfo))
        snap = wait_for(lambda: (s := gpu.snapshot()).processes and s, "the demo vLLM on the demo GPU")
        [device] = snap.devices
        assert device.name == "NVIDIA GB10 (demo)" and device.unified
        assert device.memory_total_mb == 120 * 1024
        [held] = [p for p in snap.processes if p.pid == server.pid]
        assert held.used_memory_mb == 71 * 1024 and "demo-vllm" in held.command_line
        monkeypatch.delenv(nvml_fake.DEMO_GPU_ENV)
        assert not gpu.snapshot().devices or gpu.snapshot().devices[0].name != "NVIDIA GB10 (demo)"
    finally:
        server.terminate()
        server.wait()
