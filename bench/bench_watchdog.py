"""Benchmark: one full watchdog pass when nothing needs fixing.

10 services (a fake vLLM with /health, /metrics and /v1/models; 4 HTTP checks;
3 TCP checks; a real redis-server if installed, else a fourth TCP check; a process
check), 1 GPU (NVML faked at its edge: no GPU on the benchmark machine), 10,000
files under the cleanup roots. Times the watchdog job, the disk job, and the
cleanup planner's walk over the 10,000 files (what the disk job does when the disk
is above its threshold), each 20 times; reports median and max, and the peak
Python memory of a pass (tracemalloc).

    .venv/bin/python bench/bench_watchdog.py
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparkops.config import load_settings
from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu
from sparkops.meters.nvml_fake import GIB, FakeDevice, FakeNvml
from sparkops.runner.registry import run_job
from sparkops.storage.store import open_store
from sparkops.watch import cleanup_plan

RUNS = 20


class Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *_args) -> None:
        pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    tmp = Path(tempfile.mkdtemp(prefix="sparkops-bench-watchdog-"))
    procs: list[subprocess.Popen] = []
    try:
        http = ThreadingHTTPServer(("127.0.0.1", 0), Ok)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        http_port = http.server_address[1]
        listeners = []
        for _ in range(3):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(64)
            listeners.append(sock)
        vllm_port, mode = free_port(), tmp / "mode"
        mode.write_text("healthy")
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "fixtures" / "fake_vllm.py"),
                                       str(vllm_port), str(mode)]))
        services = {
            "vllm": {"check": "vllm", "url": f"http://127.0.0.1:{vllm_port}"},
            **{f"web{i}": {"check": "http", "url": f"http://127.0.0.1:{http_port}/"} for i in range(4)},
            **{f"port{i}": {"check": "tcp", "port": s.getsockname()[1]} for i, s in enumerate(listeners)},
            "tunnel": {"check": "process", "pattern": r"fake_vllm\.py"},
            "gateway": {"enabled": False}, "ui": {"enabled": False},
        }
        redis = shutil.which("redis-server")
        if redis:
            redis_port = free_port()
            procs.append(subprocess.Popen([redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                           "--appendonly", "no", "--dir", str(tmp)], stdout=subprocess.DEVNULL))
            services["redis"] = {"check": "redis", "port": redis_port}
        else:
            extra = socket.socket()
            extra.bind(("127.0.0.1", 0))
            extra.listen(8)
            listeners.append(extra)
            services["redis"] = {"check": "tcp", "port": extra.getsockname()[1]}
        env = {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp}/data/kanban.db",
               "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp}/data/sparkops.db",
               "SPARKOPS_SERVICES": json.dumps(services)}
        settings = load_settings(env=env, cwd=tmp)
        enabled = [s for s in settings.services if s.enabled]
        assert len(enabled) == 10, len(enabled)
        store = open_store(settings, create=True)
        ctx = JobContext.create(settings, store)

        logs = tmp / "data" / "logs" / "runs"
        for i in range(10_000):  # recent files: nothing to delete
            folder = logs / f"t_{i // 100:08x}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"run-{i}.log").write_text("x" * 200)

        nvml = FakeNvml(FakeDevice(name="NVIDIA GB10", compute=[(procs[0].pid, 60 * GIB)]))
        deadline = time.time() + 30
        while time.time() < deadline:
            if run_job(ctx, "watchdog", nvml=nvml).summary == "all well":
                break
            time.sleep(0.2)

        def timed(fn) -> tuple[list[float], object]:
            samples, last = [], None
            for _ in range(RUNS):
                start = time.perf_counter()
                last = fn()
                samples.append(time.perf_counter() - start)
            return samples, last

        watchdog_times, result = timed(lambda: run_job(ctx, "watchdog", nvml=nvml))
        assert result.summary == "all well", result.summary
        disk_times, disk_result = timed(lambda: run_job(ctx, "disk"))
        plan_times, plan = timed(lambda: cleanup_plan.plan_cleanup(ctx))
        tracemalloc.start()
        run_job(ctx, "watchdog", nvml=nvml)
        run_job(ctx, "disk")
        cleanup_plan.plan_cleanup(ctx)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        snap = gpu.snapshot(nvml=nvml)

        print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
              f"{len(enabled)} services ({'real redis' if redis else 'no redis: a tcp check'}), "
              f"{len(snap.devices)} GPU (fake NVML), 10,000 files; {RUNS} runs each\n")
        print("| step | median ms | max ms |\n|---|---|---|")
        for name, samples in (("watchdog job (services, vLLM, GPU, stale runs)", watchdog_times),
                              (f"disk job ({disk_result.summary.split(':')[0]})", disk_times),
                              (f"cleanup plan: walk the log roots ({sum(plan.kept.values())} files kept, "
                               f"{len(plan.candidates)} to delete), as when above the threshold", plan_times)):
            print(f"| {name} | {statistics.median(samples) * 1000:.1f} | {max(samples) * 1000:.1f} |")
        import psutil

        print(f"\nPeak Python memory allocated by one watchdog + disk pass + plan: {peak / 2**20:.1f} MiB; "
              f"the benchmark process's RSS: {psutil.Process().memory_info().rss / 2**20:.0f} MiB")
        store.dispose()
        return 0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
