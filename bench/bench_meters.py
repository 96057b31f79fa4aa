"""What metering each run costs (issue 17).

    .venv/bin/python bench/bench_meters.py [read] [record] [sprint] [--pg URL] [--tasks 60]

* read:   one sample as a shim takes it (``Meter.read``): vLLM's ``/metrics`` from a
          loopback server serving a real-sized exposition (about 40 kB: counters,
          gauges and histograms of two models), and the demo GB10 through the NVML
          fake (there is no NVIDIA driver here); median and p90 of 200.
* record: ``ledger.record`` (the ops write of a sample and the run's usage brought
          up to it) with 1, 4 and 8 runs open on the host and 2,000 samples of
          history, on SQLite and, with ``--pg``, PostgreSQL; median and p90 of 200.
* sprint: a real ``jobs_runner.py`` finishing ``--tasks`` quick tasks (agents that
          ask the model once and report through the shim) on 4 slots, with
          ``usage.meter`` on and off, three interleaved rounds; tasks per second.

Prints markdown for docs/benchmarks.md. Everything runs on loopback in a temporary
directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparkops.board import queries  # noqa: E402
from sparkops.board import transitions as board  # noqa: E402
from sparkops.config import load_settings  # noqa: E402
from sparkops.meters import ledger, nvml_fake  # noqa: E402
from sparkops.meters.sample import Meter, Sample  # noqa: E402
from sparkops.storage.store import open_store  # noqa: E402


def exposition(tokens: float) -> bytes:
    """A /metrics body of about the size vLLM serves: two models, histograms."""
    lines = []
    for model in ("qwen3-coder-30b", "qwen3-8b"):
        labels = f'engine="0",model_name="{model}"'
        lines += [f"vllm:num_requests_running{{{labels}}} 2", f"vllm:num_requests_waiting{{{labels}}} 0",
                  f"vllm:prompt_tokens_total{{{labels}}} {tokens * 9}",
                  f"vllm:generation_tokens_total{{{labels}}} {tokens}",
                  f'vllm:request_success_total{{finished_reason="stop",{labels}}} {tokens / 300}']
        for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "time_per_output_token_seconds",
                     "request_prompt_tokens", "request_generation_tokens", "request_queue_time_seconds"):
            lines.append(f"# HELP vllm:{name} Histogram of {name}.\n# TYPE vllm:{name} histogram")
            for bucket in (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                           7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0, "+Inf"):
                lines.append(f'vllm:{name}_bucket{{{labels},le="{bucket}"}} {int(tokens) % 997}')
            lines += [f"vllm:{name}_sum{{{labels}}} {tokens / 7}", f"vllm:{name}_count{{{labels}}} {tokens / 300}"]
    return ("\n".join(lines) + "\n").encode()


class Vllm:
    def __init__(self) -> None:
        self.tokens = 1_000_000.0

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_args) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                body = exposition(outer.tokens) if self.path == "/metrics" else b'{"data": []}'
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.tokens += 120
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


def timed(fn, n: int) -> tuple[float, float]:
    took = []
    for _ in range(n):
        started = time.perf_counter()
        fn()
        took.append((time.perf_counter() - started) * 1000)
    took.sort()
    return statistics.median(took), took[int(len(took) * 0.9)]


def bench_read(vllm: Vllm) -> str:
    meter = Meter(metrics_url=f"{vllm.url}/metrics", nvml=nvml_fake.demo_gb10())
    size = len(exposition(vllm.tokens))
    taken = meter.read()
    assert taken.sources == {"vllm": "ok", "gpu": "ok"}, taken.sources
    both = timed(meter.read, 200)
    vllm_only = timed(Meter(metrics_url=f"{vllm.url}/metrics", nvml=nvml_fake.FakeNvml(init_error=12)).read, 200)
    return (f"| one sample (vLLM /metrics of {size / 1000:.0f} kB + NVML fake) | {both[0]:.2f} | {both[1]:.2f} |\n"
            f"| vLLM /metrics only | {vllm_only[0]:.2f} | {vllm_only[1]:.2f} |\n")


def bench_record(url: str, label: str, tmp: Path) -> str:
    env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp}/board-{label}.db", "SPARKOPS_STORAGE_OPS_URL": url}
    store = open_store(load_settings(env=env, cwd=tmp), create=True)
    rows = ""
    try:
        at = 1_000_000.0
        for run in range(2000):  # history: finished runs' samples
            ledger.record(store.ops, run_id=run // 2 + 1, task_id=f"t_{run}", host="h", ended=run % 2 == 1,
                          sample=Sample(at=at, prompt_tokens=at, energy_j=at, sources={"vllm": "ok"}))
            at += 1
        next_run = 10_000
        for open_runs in (1, 4, 8):
            ids = list(range(next_run, next_run + open_runs))
            next_run += open_runs
            for run_id in ids:
                ledger.record(store.ops, run_id=run_id, task_id="t", host="h",
                              sample=Sample(at=at, prompt_tokens=at, energy_j=at, sources={"vllm": "ok"}))
                at += 1
            clock = iter(range(10**6))

            def one() -> None:
                t = at + next(clock)
                ledger.record(store.ops, run_id=ids[int(t) % len(ids)], task_id="t", host="h",
                              sample=Sample(at=t, prompt_tokens=t, energy_j=t, sources={"vllm": "ok"}),
                              stale_after=1e9)
            median, p90 = timed(one, 200)
            at += 10**6
            for run_id in ids:
                ledger.close(store.ops, run_id)
            rows += f"| ledger.record, {label}, {open_runs} run(s) open | {median:.2f} | {p90:.2f} |\n"
        # a long run: 2,000 samples (8 hours of 15 s heartbeats), then its next ones
        long_run = next_run + 1
        for _ in range(2000):
            ledger.record(store.ops, run_id=long_run, task_id="t", host="h", stale_after=1e9,
                          sample=Sample(at=at, prompt_tokens=at, energy_j=at, sources={"vllm": "ok"}))
            at += 15

        def later() -> None:
            nonlocal at
            at += 15
            ledger.record(store.ops, run_id=long_run, task_id="t", host="h", stale_after=1e9,
                          sample=Sample(at=at, prompt_tokens=at, energy_j=at, sources={"vllm": "ok"}))
        median, p90 = timed(later, 50)
        rows += f"| ledger.record, {label}, a run 2,000 samples long (8 h of heartbeats) | {median:.2f} | {p90:.2f} |\n"
    finally:
        store.dispose()
    return rows


def bench_record_postgres(server: str, tmp: Path) -> str:
    from sqlalchemy import create_engine, text

    admin = create_engine(server.replace("postgresql://", "postgresql+psycopg://"), isolation_level="AUTOCOMMIT")
    name = f"sparkops_bench_meters_{os.getpid()}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        return bench_record(server.rsplit("/", 1)[0] + "/" + name, "PostgreSQL", tmp)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


AGENT = textwrap.dedent("""
    import os, subprocess, sys, urllib.request
    urllib.request.urlopen(urllib.request.Request(sys.argv[1] + "/v1/completions", data=b"{}"), timeout=5).read()
    sys.exit(subprocess.run([sys.executable, "-m", "sparkops", "task", "complete", os.environ["SPARKOPS_TASK_ID"],
                             "--result", "ok"]).returncode)
""")


def sprint_round(tmp: Path, vllm: Vllm, tasks: int, meter: bool) -> float:
    home = Path(tempfile.mkdtemp(dir=tmp))
    (home / "agent.py").write_text(AGENT)
    (home / "meminfo").write_text(nvml_fake.DEMO_MEMINFO)
    env_settings = {
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{home}/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{home}/sparkops.db",
        "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(["{python}", str(home / "agent.py"), vllm.url]),
        "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": "4", "SPARKOPS_USAGE_METER": "true" if meter else "false",
        "SPARKOPS_DISPATCH_WORKSPACE_ROOT": str(home / "ws"), "SPARKOPS_DISPATCH_RUN_LOG_ROOT": str(home / "logs"),
        "SPARKOPS_RUNNER_LOG_FILE": str(home / "runner.log"),
        "SPARKOPS_SERVICES": json.dumps({"vllm": {"check": "vllm", "url": vllm.url, "restart_argv": []},
                                         **{n: {"enabled": False} for n in ("gateway", "redis", "tunnel")}}),
        nvml_fake.DEMO_GPU_ENV: str(home / "meminfo"),
    }
    store = open_store(load_settings(env=env_settings, cwd=home), create=True)
    ids = [board.create_task(store.board, f"task {n}") for n in range(tasks)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPARKOPS_", "HERMES_"))}
    env.update(env_settings, PYTHONPATH=str(ROOT))
    started = time.monotonic()
    runner = subprocess.Popen([sys.executable, str(ROOT / "jobs_runner.py")], cwd=home, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while sum(queries.get_task(store.board, i)["status"] == "done" for i in ids) < tasks:
            if runner.poll() is not None or time.monotonic() - started > 600:
                raise RuntimeError("the sprint did not finish")
            time.sleep(0.1)
        took = time.monotonic() - started
        if meter:
            metered = ledger.of_runs(store.ops, range(1, tasks * 2))
            assert len(metered) >= tasks, f"{len(metered)} runs metered of {tasks}"
    finally:
        runner.terminate()
        runner.wait(timeout=60)
        store.dispose()
    return tasks / took


def bench_sprint(tmp: Path, vllm: Vllm, tasks: int) -> str:
    rates: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(3):
        for meter in (False, True):
            rates[meter].append(sprint_round(tmp, vllm, tasks, meter))
    off, on = statistics.median(rates[False]), statistics.median(rates[True])
    return (f"| {tasks} quick tasks on 4 slots, usage.meter off | {off:.2f} tasks/s "
            f"({', '.join(f'{r:.2f}' for r in rates[False])}) |\n"
            f"| the same, usage.meter on | {on:.2f} tasks/s ({', '.join(f'{r:.2f}' for r in rates[True])}) |\n"
            f"| on / off | {on / off:.2f} |\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("parts", nargs="*", default=["read", "record", "sprint"])
    parser.add_argument("--pg", help="a PostgreSQL server's URL for the record part (a scratch database is "
                                     "made there and dropped)")
    parser.add_argument("--tasks", type=int, default=60)
    args = parser.parse_args()
    vllm = Vllm()
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}\n")
    with tempfile.TemporaryDirectory() as tmp:
        if "read" in args.parts or "record" in args.parts:
            print("| what | median ms | p90 ms |\n|---|---|---|")
            if "read" in args.parts:
                print(bench_read(vllm), end="")
            if "record" in args.parts:
                print(bench_record(f"sqlite:///{tmp}/ops.db", "SQLite", Path(tmp)), end="")
                if args.pg:
                    print(bench_record_postgres(args.pg, Path(tmp)), end="")
            print()
        if "sprint" in args.parts:
            print("| sprint | result |\n|---|---|")
            print(bench_sprint(Path(tmp), vllm, args.tasks), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
