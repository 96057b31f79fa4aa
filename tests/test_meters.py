"""Each run metered by its own shim, end to end: a real ``jobs_runner.py``, its shims
and agents, a real HTTP server on loopback counting vLLM's tokens and requests as the
agents use it, and the demo GB10 (NVML's fake, at its one edge) whose energy counter
grows at a known rate.

With one slot each run's tokens are exactly what its agent asked the model for (a
counter reset between runs included); with two the shares add up to what the server
counted and the runs that overlapped say they are estimates; a worker killed -9 keeps
what it used up to its last heartbeat, and the run after it is exact again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import pytest
from conftest import ROOT, make_settings, wait_for
from sqlalchemy import select

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.meters import ledger
from sparkops.meters.nvml_fake import DEMO_ENERGY_WATTS, DEMO_GPU_ENV, DEMO_MEMINFO
from sparkops.meters.reported import Reported
from sparkops.meters.sample import Sample
from sparkops.meters.usage import Usage
from sparkops.storage.schema import ops_meter_samples, ops_run_usage
from sparkops.storage.store import open_store

#: The agent: for each request of its plan (``PLAN[title]``, pairs of prompt and
#: generation tokens) asks the model, 0.25 s apart, then reports done. A title with
#: "hang" makes its first run hang after its requests (the workspace remembers).
AGENT = textwrap.dedent("""
    import json, os, pathlib, subprocess, sys, time, urllib.request
    plan_file, url = sys.argv[1], sys.argv[2]
    title = open("TASK.md").readline().lstrip("# ").strip()
    for prompt, generated in json.load(open(plan_file))[title]:
        body = json.dumps({"prompt_tokens": prompt, "generation_tokens": generated}).encode()
        urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body), timeout=5).read()
        time.sleep(0.25)
    if "hang" in title and not pathlib.Path("hung-once").exists():
        pathlib.Path("hung-once").touch()
        print("requests made; hanging", flush=True)
        time.sleep(600)
    said = []
    if "reports" in title:  # as Claude Code's result message says it
        pathlib.Path("result.json").write_text(json.dumps(
            {"type": "result", "total_cost_usd": 0.25, "usage": {"input_tokens": 1200, "output_tokens": 80}}))
        said = ["--usage-json", "result.json"]
    sys.exit(subprocess.run([sys.executable, "-m", "sparkops", "task", "complete", os.environ["SPARKOPS_TASK_ID"],
                             "--result", "done", *said]).returncode)
""")


class CountingVllm:
    """vLLM's counters on loopback, moved only by the agents' requests."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.prompt = self.generated = self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def reply(self, body: bytes) -> None:
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/metrics":
                    with outer.lock:
                        text = (f'vllm:prompt_tokens_total{{model_name="m"}} {outer.prompt}\n'
                                f'vllm:generation_tokens_total{{model_name="m"}} {outer.generated}\n'
                                f'vllm:request_success_total{{finished_reason="stop",model_name="m"}} '
                                f'{outer.requests}\n'
                                'vllm:num_requests_running{model_name="m"} 0\n')
                    self.reply(text.encode())
                elif self.path == "/v1/models":
                    self.reply(b'{"data": [{"id": "m"}]}')
                else:
                    self.reply(b"")

            def do_POST(self) -> None:  # noqa: N802
                asked = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.prompt += asked["prompt_tokens"]
                    outer.generated += asked["generation_tokens"]
                    outer.requests += 1
                self.reply(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self) -> None:
        """As a vLLM restart: every counter from 0."""
        with self.lock:
            self.prompt = self.generated = self.requests = 0


class Sprint:
    def __init__(self, tmp_path: Path, vllm: CountingVllm, plan: dict[str, list[list[int]]], slots: int):
        self.tmp, self.plan = tmp_path, plan
        (tmp_path / "plan.json").write_text(json.dumps(plan))
        (tmp_path / "agent.py").write_text(AGENT)
        (tmp_path / "meminfo").write_text(DEMO_MEMINFO)
        self.env = {
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db",
            "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", str(tmp_path / "agent.py"),
                                                         str(tmp_path / "plan.json"), vllm.url]),
            "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": str(slots),
            "SPARKOPS_DISPATCH_HEARTBEAT_SECONDS": "0.5",
            "SPARKOPS_RECLAIM_TERM_GRACE_SECONDS": "2",
            "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(tmp_path / "workspaces"),
            "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(tmp_path / "logs" / "runs"),
            "SPARKOPS_RUNNER_LOG_FILE": str(tmp_path / "logs" / "runner.log"),
            "SPARKOPS_SERVICES": json.dumps({"vllm": {"check": "vllm", "url": vllm.url, "restart_argv": []},
                                             **{n: {"enabled": False} for n in ("gateway", "redis", "tunnel")}}),
            DEMO_GPU_ENV: str(tmp_path / "meminfo"),
        }
        self.settings = make_settings(tmp_path, **{k: v for k, v in self.env.items()
                                                   if k.startswith("SPARKOPS_") and "STORAGE" not in k})
        self.store = open_store(self.settings, create=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
        env.update(self.env, PYTHONPATH=str(ROOT))
        self.out = open(tmp_path / "runner.out", "ab")  # noqa: SIM115 - closed in stop()
        self.runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=tmp_path, env=env,
                                       stdout=self.out, stderr=subprocess.STDOUT)

    def create(self, *titles: str) -> list[str]:
        return [board.create_task(self.store.board, title) for title in titles]

    def wait_done(self, ids: list[str], timeout: float = 60) -> None:
        def done() -> bool:
            return all(queries.get_task(self.store.board, i)["status"] == "done" for i in ids)
        wait_for(done, f"{ids} done", timeout=timeout, proc=self.runner)

    def completed_run(self, task_id: str) -> int:
        return next(r["id"] for r in queries.list_runs(self.store.board, task_id=task_id)
                    if r["outcome"] == "completed")

    def usage(self, run_ids: list[int]) -> dict[int, Usage]:
        return ledger.of_runs(self.store.ops, run_ids)

    def samples_of(self, run_id: int) -> list[Sample]:
        with self.store.ops.read() as conn:
            first, last = conn.execute(select(ops_run_usage.c.first_at, ops_run_usage.c.last_at)
                                       .where(ops_run_usage.c.run_id == run_id)).one()
            rows = conn.execute(select(ops_meter_samples.c.data).where(
                ops_meter_samples.c.at >= first, ops_meter_samples.c.at <= last)
                .order_by(ops_meter_samples.c.at)).scalars().all()
        return [Sample.from_dict(json.loads(r)) for r in rows]

    def stop(self) -> None:
        if self.runner.poll() is None:
            self.runner.send_signal(signal.SIGTERM)
            self.runner.wait(timeout=30)
        self.out.close()
        self.store.dispose()


@pytest.fixture
def vllm() -> Iterator[CountingVllm]:
    server = CountingVllm()
    yield server
    server.server.shutdown()


@pytest.fixture
def sprint(tmp_path: Path, vllm: CountingVllm) -> Iterator:
    made: list[Sprint] = []

    def start(plan: dict[str, list[list[int]]], slots: int) -> Sprint:
        made.append(Sprint(tmp_path, vllm, plan, slots))
        return made[-1]
    yield start
    for s in made:
        s.stop()


def asked(plan: dict[str, list[list[int]]], title: str) -> tuple[int, int, int]:
    return (sum(p for p, _ in plan[title]), sum(g for _, g in plan[title]), len(plan[title]))


def test_one_slot_meters_each_run_exactly_through_a_counter_reset(sprint, vllm):
    plan = {f"task {k}": [[100 * k + 7, 10 * k + 1]] * k for k in (1, 2, 3)}
    plan["task 4 reports"] = [[407, 41]] * 4
    s = sprint(plan, slots=1)
    first = s.create("task 1", "task 2")
    s.wait_done(first)
    vllm.reset()  # vLLM restarts between two runs
    second = s.create("task 3", "task 4 reports")
    s.wait_done(second)

    runs = {title: s.completed_run(task_id) for title, task_id in zip(plan, first + second)}
    usage = s.usage(list(runs.values()))
    for title, run_id in runs.items():
        used = usage[run_id]
        assert (used.prompt_tokens, used.generation_tokens, used.requests) == asked(plan, title), title
        assert not used.estimated and used.resets == 0 and not used.unmeasured, used
        samples = s.samples_of(run_id)
        assert len(samples) >= 2 and all(x.sources == {"vllm": "ok", "gpu": "ok"} for x in samples)
        assert used.energy_j == pytest.approx(samples[-1].energy_j - samples[0].energy_j)  # the counter's delta
        # at its known rate; the counter and the sample's time are read a few milliseconds apart
        assert used.energy_j == pytest.approx(DEMO_ENERGY_WATTS * used.seconds, rel=0.02, abs=DEMO_ENERGY_WATTS * 0.02)
        assert used.gpu_seconds == 0.0  # measured: the demo GB10 is idle without demo agents
        assert used.seconds == pytest.approx(samples[-1].at - samples[0].at)
    with s.store.ops.read() as conn:
        assert set(conn.execute(select(ops_run_usage.c.ended)).scalars()) == {1}
    # what the agent said it used is kept beside what was measured, and preferred
    said = usage[runs["task 4 reports"]]
    assert said.reported == Reported(prompt_tokens=1200, generation_tokens=80, cost=0.25, currency="USD")
    assert (said.prompt, said.generated, said.prompt_tokens) == (1200, 80, 4 * 407)
    assert usage[runs["task 1"]].reported is None and usage[runs["task 1"]].prompt == 107


def test_two_slots_share_what_the_server_counted_and_say_they_estimate(sprint, vllm):
    plan = {f"task {k}": [[50 + k, 5 + k]] * 6 for k in (1, 2, 3, 4)}
    s = sprint(plan, slots=2)
    ids = s.create(*plan)
    s.wait_done(ids)

    usage = s.usage([s.completed_run(i) for i in ids])
    assert sum(u.prompt_tokens for u in usage.values()) == pytest.approx(vllm.prompt)
    assert sum(u.generation_tokens for u in usage.values()) == pytest.approx(vllm.generated)
    assert sum(u.requests for u in usage.values()) == pytest.approx(vllm.requests) == 24
    assert any(u.estimated for u in usage.values()), usage  # 1.5 s runs two at a time overlap
    for used in usage.values():
        assert used.prompt_tokens > 0 and used.energy_j > 0 and used.seconds > 0


def test_a_killed_worker_keeps_its_usage_to_its_last_heartbeat(sprint, vllm):
    plan = {"hang then finish": [[1000, 100], [2000, 200]]}
    s = sprint(plan, slots=1)
    (task_id,) = s.create("hang then finish")
    first_run = wait_for(lambda: next(iter(queries.list_runs(s.store.board, task_id=task_id)), None),
                         "the first run", proc=s.runner)["id"]
    # its requests made, then a heartbeat's sample after them
    wait_for(lambda: vllm.requests == 2 and s.samples_of(first_run)[-1].prompt_tokens == 3000,
             "a heartbeat after the requests", proc=s.runner)
    kept = s.usage([first_run])[first_run]
    agent = next(p for p in psutil.process_iter(["cmdline"])
                 if str(s.tmp / "agent.py") in (p.info["cmdline"] or []))
    shim = agent.parent()
    os.killpg(agent.pid, signal.SIGKILL)
    shim.kill()  # the whole worker dies, as with the host's power

    s.wait_done([task_id])
    second_run = s.completed_run(task_id)
    assert second_run != first_run
    usage = s.usage([first_run, second_run])
    assert (usage[first_run].prompt_tokens, usage[first_run].generation_tokens) == (3000, 300)
    assert usage[first_run].prompt_tokens == kept.prompt_tokens
    assert (usage[second_run].prompt_tokens, usage[second_run].requests) == (3000, 2)
    assert not usage[second_run].estimated, "the dead run's row no longer shares the host's samples"
    with s.store.ops.read() as conn:
        ended = dict(conn.execute(select(ops_run_usage.c.run_id, ops_run_usage.c.ended)).all())
    assert ended == {first_run: 1, second_run: 1}
