"""Take the README's screenshots of every page, on a desktop and a phone viewport.

Needs Playwright (pip install playwright) and Debian's chromium; no browser download.

    .venv/bin/python scripts/screenshots.py --start    # a fresh `up --demo` in a temp dir, the
                                                       # living demo at work for two minutes, then capture
    .venv/bin/python scripts/screenshots.py [URL]      # capture a running app (http://127.0.0.1:8501)

Writes docs/img/<page>.png (1400x900) and docs/img/phone-<page>.png (390x844, 2x).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, Page, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from sparkops.core import procs
from sparkops.engine import workers

OUT = ROOT / "docs" / "img"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

#: (url path, title on the page, file name)
PAGES = [
    ("", "SparkOps", "home"), ("Board", "Board", "board"), ("Runs", "Runs and logs", "runs"),
    ("GPU", "GPU", "gpu"), ("Sprint_review", "Sprint review", "review"), ("Jobs", "Jobs", "jobs"),
    ("Playbook", "Playbook", "playbook"), ("Events", "Events and alerts", "events"),
    ("Fleet", "Fleet", "fleet"),
]
#: (file name prefix, browser context options)
VIEWPORTS = [
    ("", {"viewport": {"width": 1400, "height": 900}}),
    ("phone-", {"viewport": {"width": 390, "height": 844}, "device_scale_factor": 2,
                "is_mobile": True, "has_touch": True}),
]
SETTLED = '[data-testid="stApp"][data-test-connection-state="CONNECTED"][data-test-script-state="notRunning"]'
DRAW_MS = 2_000  # after Streamlit is done: let the tables (canvas) draw


def settle(page: Page, title: str) -> None:
    expect(page.locator("h1").filter(has_text=title)).to_be_visible(timeout=30_000)
    page.wait_for_selector(SETTLED, timeout=30_000)
    page.wait_for_timeout(DRAW_MS)


def check(page: Page, name: str) -> None:
    """Refuse to save a picture of a broken page."""
    for testid in ("stException", "stAlertContentError"):
        boxes = page.locator(f'[data-testid="{testid}"]')
        if boxes.count():
            raise SystemExit(f"{name}: the page shows {testid}: {boxes.all_inner_texts()}")


def shoot(page: Page, out: Path, name: str) -> None:
    check(page, name)
    page.screenshot(path=str(out / f"{name}.png"))
    print(f"wrote {out / f'{name}.png'}")


def board_detail(page: Page, base: str) -> None:
    """Open a running task (else any task) and show its runs and log."""
    page.goto(f"{base}/Board")
    settle(page, "Board")
    cards = page.locator('[data-testid="stColumn"]').filter(has_text="Running ·")
    opens = cards.last.locator('[class*="st-key-open_"] button')
    if not opens.count():
        opens = page.locator('[class*="st-key-open_"] button')
    close = page.locator(".st-key-board_close button")
    for _attempt in range(3):  # a click during a fragment's refresh can be lost: try again
        opens.first.click()
        try:
            close.wait_for(timeout=10_000)
            break
        except Exception:  # noqa: BLE001 - Playwright's TimeoutError
            page.wait_for_selector(SETTLED, timeout=30_000)
    else:
        raise SystemExit("the board's detail view did not open")
    page.get_by_role("tab", name="Runs and log").click()
    page.wait_for_selector(SETTLED, timeout=30_000)
    page.wait_for_timeout(DRAW_MS)
    close.scroll_into_view_if_needed()


def capture(browser: Browser, base: str, out: Path) -> None:
    for prefix, options in VIEWPORTS:
        context = browser.new_context(**options)
        page = context.new_page()
        for path, title, name in PAGES:
            page.goto(f"{base}/{path}")
            settle(page, title)
            shoot(page, out, prefix + name)
        board_detail(page, base)
        shoot(page, out, prefix + "board-detail")
        context.close()


# -- a fresh `up --demo` -------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(base: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


@contextmanager
def demo_app(warmup: float) -> Iterator[str]:
    """``python -m sparkops up --demo`` in a temporary directory (default settings, as
    on a fresh box); yields its URL once the living demo has run ``warmup`` seconds."""
    with tempfile.TemporaryDirectory(prefix="sparkops-shots-") as home:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
        env.update({"PYTHONPATH": str(ROOT), "SPARKOPS_UI_PORT": str(port)})
        with open(Path(home) / "up.out", "wb") as log:
            proc = subprocess.Popen([sys.executable, "-m", "sparkops", "up", "--demo"], cwd=home,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while not healthy(base):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("`sparkops up --demo` did not come up:\n"
                                     + (Path(home) / "up.out").read_text(errors="replace"))
                time.sleep(0.2)
            print(f"up --demo at {base}; letting the agents work {warmup:.0f}s", flush=True)
            time.sleep(warmup)
            yield base
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for worker in workers.live(Path(home) / "data" / "workers"):  # left to finish by `up`
                procs.terminate_group(worker.identity.agent, grace=2)
                procs.terminate_group(worker.identity.shim, grace=2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", nargs="?", default="http://127.0.0.1:8501", help="a running app")
    parser.add_argument("--start", action="store_true", help="start a fresh `up --demo` instead")
    parser.add_argument("--warmup", type=float, default=120.0, metavar="S",
                        help="with --start: seconds the living demo runs first (default 120)")
    parser.add_argument("--out", type=Path, default=OUT, help=f"where the PNGs go (default {OUT})")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            if args.start:
                with demo_app(args.warmup) as base:
                    capture(browser, base, args.out)
            else:
                capture(browser, args.url.rstrip("/"), args.out)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
