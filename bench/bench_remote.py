"""Benchmark: the push of a large export over SFTP, and HTTP through the tunnel.

Generates a board with ``bench/gen_board.py`` (default 100,000 tasks, 300,000 runs,
1,000,000 events), exports it, starts a real OpenSSH server on a free loopback port
(``tests/sshd.py``; needs ``/usr/sbin/sshd``) and measures:

* **push**: the first push (every file), a push with nothing changed, and a push after
  one more task (the files that changed): seconds, bytes sent, MB/s;
* **tunnel**: ``--requests`` HTTP GETs to a local HTTP server straight and through the
  reverse tunnel (paramiko mode; the request enters at the remote end): p50 / p99
  latency and requests per second, one client at a time.

Everything stays on 127.0.0.1, so the figures are the cost of SSH, SFTP and the
pipe threads, not of a network. Prints a markdown table.

    .venv/bin/python bench/bench_remote.py [--tasks N] [--runs N] [--events N] [--requests 500]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:  # noqa: N802
        body = b"x" * 2048
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


def latencies(url: str, n: int) -> tuple[list[float], float]:
    times = []
    started = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
        times.append((time.perf_counter() - t0) * 1000)
    return times, n / (time.perf_counter() - started)


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=300_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=500)
    args = parser.parse_args()

    import sshd
    from gen_board import generate

    from sparkops.board import transitions as board
    from sparkops.config import load_settings
    from sparkops.jobs.framework import JobContext
    from sparkops.remote import push, tunnel
    from sparkops.runner.registry import run_job
    from sparkops.storage.store import open_store

    with tempfile.TemporaryDirectory(prefix="bench-remote-") as tmp_name:
        tmp = Path(tmp_name)
        made = generate(tmp, args.tasks, args.runs, args.events)
        print(f"generated {made['tasks']:,} tasks, {made['runs']:,} runs, {made['events']:,} events", file=sys.stderr)
        server = sshd.SshServer(tmp / "sshd").start()
        app = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=app.serve_forever, daemon=True).start()
        known = tmp / "known_hosts"
        known.write_text(server.known_hosts_line())
        env = {
            "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp}/data/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp}/data/sparkops.db",
            "SPARKOPS_EXPORT_DIR": str(tmp / "exports"),
            "SPARKOPS_REMOTES": json.dumps({"vps": {"address": "127.0.0.1", "port": server.port,
                                                    "key_file": str(server.client_key),
                                                    "known_hosts": str(known)}}),
            "SPARKOPS_REMOTE_PUSH_HOST": "vps", "SPARKOPS_REMOTE_PUSH_DIR": str(tmp / "vps" / "export"),
            "SPARKOPS_REMOTE_TUNNEL_HOST": "vps", "SPARKOPS_REMOTE_TUNNEL_REMOTE_PORT": str(sshd.free_port()),
            "SPARKOPS_REMOTE_TUNNEL_LOCAL_PORT": str(app.server_address[1]),
        }
        settings = load_settings(env=env, cwd=tmp)
        store = open_store(settings, create=True)
        ctx = JobContext.create(settings, store)
        try:
            assert run_job(ctx, "export").ok
            rows = []
            for label in ("first push (every file)", "nothing changed", "after one new task"):
                if label.startswith("after"):
                    board.create_task(store.board, "one more task")
                    assert run_job(ctx, "export").ok
                started = time.perf_counter()
                result = push.push(ctx)
                took = time.perf_counter() - started
                rows.append((label, took, result))

            direct, direct_rps = latencies(f"http://127.0.0.1:{app.server_address[1]}/", args.requests)
            through = {}
            for mode in ("paramiko", "openssh"):
                mode_settings = load_settings(env={**env, "SPARKOPS_REMOTE_TUNNEL_MODE": mode}, cwd=tmp)
                keeper = tunnel.Tunnel(mode_settings)
                status = keeper.step()
                assert status.status == "up", status
                through[mode] = latencies(f"http://127.0.0.1:{settings['remote.tunnel_remote_port']}/",
                                          args.requests)
                keeper.close()
        finally:
            store.dispose()
            server.stop()
            app.shutdown()

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    print(f"\nMachine: {os.cpu_count()} CPUs ({cpu}), Python {platform.python_version()}, "
          f"OpenSSH server on 127.0.0.1. Board: {args.tasks:,} tasks, {args.runs:,} runs, "
          f"{args.events:,} events.\n")
    print("| Push | Seconds | Files sent | Bytes sent | MB/s |")
    print("|---|---:|---:|---:|---:|")
    for label, took, result in rows:
        rate = result.bytes_sent / 1e6 / took if result.bytes_sent else 0
        print(f"| {label} | {took:.2f} | {len(result.sent)} of {len(result.sent) + len(result.unchanged)} "
              f"| {result.bytes_sent:,} | {rate:.1f} |")
    print(f"\n| HTTP GET, 2 KB answer, {args.requests} in a row | p50 ms | p99 ms | requests/s |")
    print("|---|---:|---:|---:|")
    print(f"| straight to the app | {p(direct, 50):.2f} | {p(direct, 99):.2f} | {direct_rps:.0f} |")
    for mode, (times, rps) in through.items():
        print(f"| through the tunnel ({mode}) | {p(times, 50):.2f} | {p(times, 99):.2f} | {rps:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
