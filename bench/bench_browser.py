"""Benchmark: the app as a browser sees it, page by page.

    .venv/bin/python bench/bench_browser.py [--board DIR] [--rounds 3] [--warmup 30]

Starts ``python -m sparkops up`` in a temporary directory and opens every page in
Debian's chromium (Playwright, 1400x900), ``--rounds`` times each, after one
navigation to each page to warm the server (its imports and first caches). For
each navigation it measures, from ``page.goto``:

* **first heading**: the page's title (its ``h1``) is visible: the user sees the page;
* **settled**: Streamlit reports the script run finished and the connection idle
  (every table and chart sent), plus nothing else.

Without ``--board``, on the living demo (``up --demo``, its agents at work for
``--warmup`` seconds first). With ``--board DIR``, on a copy of the board made by
``bench/gen_board.py DIR`` (100,000 tasks: ``DIR/data/kanban.db``), timestamps
shifted so its newest activity is now, with no agent configured. Prints a markdown
table (min-max over the rounds) and the machine; nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from playwright.sync_api import expect, sync_playwright

from sparkops.core import procs
from sparkops.engine import workers

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PAGES = [("", "SparkOps"), ("Board", "Board"), ("Runs", "Runs and logs"), ("GPU", "GPU"),
         ("Sprint_review", "Sprint review"), ("Jobs", "Jobs"), ("Playbook", "Playbook"),
         ("Events", "Events and alerts"), ("Fleet", "Fleet")]
SETTLED = '[data-testid="stApp"][data-test-connection-state="CONNECTED"][data-test-script-state="notRunning"]'
#: The issue's goals on the demo board: Home within 1 s, every page within 1.5 s, to the first heading.
GOALS = {"": 1.0}
GOAL = 1.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def shift_to_now(db: Path) -> float:
    """Move every time column of a copied board so its newest activity is now."""
    conn = sqlite3.connect(db)
    try:
        newest = conn.execute("SELECT MAX(created_at) FROM task_events").fetchone()[0] or time.time()
        delta = int(time.time() - newest)
        for table, columns in {"tasks": ("created_at", "started_at", "completed_at"),
                               "task_runs": ("started_at", "ended_at", "last_heartbeat_at"),
                               "task_events": ("created_at",)}.items():
            sets = ", ".join(f"{c} = {c} + {delta}" for c in columns)
            conn.execute(f"UPDATE {table} SET {sets}")
        conn.commit()
    finally:
        conn.close()
    return delta / 86400


def start_up(home: Path, port: int, demo: bool) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env.update({"PYTHONPATH": str(ROOT), "SPARKOPS_UI_PORT": str(port)})
    argv = [sys.executable, "-m", "sparkops", "up"] + (["--demo"] if demo else [])
    with open(home / "up.out", "wb") as out:
        return subprocess.Popen(argv, cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_up(proc: subprocess.Popen, home: Path) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for worker in workers.live(home / "data" / "workers"):  # left to finish by `up`
        procs.terminate_group(worker.identity.agent, grace=2)
        procs.terminate_group(worker.identity.shim, grace=2)


def measure(url: str, rounds: int) -> dict[str, list[tuple[float, float]]]:
    """Per page: (seconds to the first heading, seconds to settled), one per round."""
    times: dict[str, list[tuple[float, float]]] = {path: [] for path, _ in PAGES}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 900})
        page = context.new_page()
        for round_ in range(rounds + 1):  # round 0 warms the server up, and is not counted
            for path, title in PAGES:
                started = time.monotonic()
                page.goto(f"{url}/{path}")
                expect(page.locator("h1").filter(has_text=title)).to_be_visible(timeout=60_000)
                heading = time.monotonic() - started
                page.wait_for_selector(SETTLED, timeout=60_000)
                settled = time.monotonic() - started
                if round_:
                    times[path].append((heading, settled))
        browser.close()
    return times


def span(values: list[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.2f}" if f"{low:.2f}" == f"{high:.2f}" else f"{low:.2f}-{high:.2f}"


def table(times: dict[str, list[tuple[float, float]]], goals: bool) -> str:
    lines = ["| page | first heading s | settled s |" + (" goal (first heading) | met |" if goals else ""),
             "|---|---|---|" + ("---|---|" if goals else "")]
    for path, title in PAGES:
        headings = [h for h, _ in times[path]]
        row = f"| {title if path else 'Home'} | {span(headings)} | {span([s for _, s in times[path]])} |"
        if goals:
            goal = GOALS.get(path, GOAL)
            row += f" ≤ {goal:g} s | {'yes' if max(headings) <= goal else 'no'} |"
        lines.append(row)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--board", type=Path, help="a directory made by bench/gen_board.py (else: the demo)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds the demo runs before measuring")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sparkops-bench-browser-") as tmp:
        home = Path(tmp)
        what = "the living demo (`up --demo`)"
        if args.board:
            (home / "data").mkdir()
            shutil.copyfile(args.board / "data" / "kanban.db", home / "data" / "kanban.db")
            days = shift_to_now(home / "data" / "kanban.db")
            what = f"a copy of {args.board}/data/kanban.db (timestamps shifted by {days:.1f} days), no agent"
        port = free_port()
        proc = start_up(home, port, demo=args.board is None)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 300
            while not healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("`sparkops up` did not come up:\n" + (home / "up.out").read_text())
                time.sleep(0.2)
            if args.board is None:
                time.sleep(args.warmup)
            times = measure(url, args.rounds)
        finally:
            stop_up(proc, home)
    print(f"On {what}; {args.rounds} rounds after a warm-up round; chromium at 1400x900.")
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.platform()}\n")
    print(table(times, goals=args.board is None))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
