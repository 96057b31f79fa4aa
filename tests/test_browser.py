"""The real app in a real browser: ``python -m sparkops up --demo`` with four demo
agents at work, driven by headless chromium (Playwright) on a desktop and a phone
viewport.

Every page loads without a Streamlit exception or an unexpected error box and
within a generous bound; a task's detail opens and closes on the board; "Run now"
on the Jobs page runs the reclaim job and leaves an audit row; ``/_stcore/health``
answers 200 the whole time, while exactly the configured four runs are open at
the busiest; and Ctrl-C stops ``up`` with 0. Screenshots go to a temporary
directory, never into the repository.

Needs Debian's chromium (/usr/bin/chromium) and the ``playwright`` package; no
browser download. Without them the module is skipped, except under CI.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import psutil
import pytest

from conftest import IN_CI, ROOT, make_settings, wait_for
from sparkops import actions, board, queries
from sparkops.store import Store, open_store
from test_launcher import free_port, http_status

try:
    from playwright.sync_api import Browser, Page, expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

MAX_IN_PROGRESS = 4
AGENT_ARGV = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "3", "--max-seconds", "6"]
NO_SERVICES = {name: {"enabled": False} for name in ("vllm", "gateway", "redis", "tunnel")}
#: Extra ready tasks, so the runner keeps all four agents busy for the whole module.
FILLER_TASKS = 48
#: A page must have finished running within this (a bound, not a benchmark).
PAGE_LOAD_SECONDS = 30.0  # two cores run the app, the runner, 4 agents and chromium

#: (url path, its title) for every page of the app.
PAGES = [
    ("", "SparkOps"), ("Board", "Board"), ("Runs", "Runs and logs"), ("GPU", "GPU"),
    ("Sprint_review", "Sprint review"), ("Jobs", "Jobs"), ("Playbook", "Playbook"),
    ("Events", "Events and alerts"), ("Fleet", "Fleet"),
]
VIEWPORTS = {
    "desktop": {"viewport": {"width": 1400, "height": 900}},
    "phone": {"viewport": {"width": 390, "height": 844}, "is_mobile": True, "has_touch": True},
}

SETTLED = '[data-testid="stApp"][data-test-connection-state="CONNECTED"][data-test-script-state="notRunning"]'
EXCEPTION = '[data-testid="stException"]'
ERROR_BOX = '[data-testid="stAlertContentError"]'
STATUS_LINE = "Happening now:"  # the Playbook's summary of the seed's failures
HAPPENING = "text=Happening now: yes"
SUCCESS_BOX = '[data-testid="stAlertContentSuccess"]'


def _missing() -> str | None:
    if sync_playwright is None:
        return "the playwright package is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} (Debian's chromium) is not installed"
    return None


# -- the app under test ----------------------------------------------------------------------


@dataclass
class Watch:
    """Polls the health endpoint and the open runs in the background."""

    health_url: str
    store: Store
    polls: int = 0
    failures: list[str] = field(default_factory=list)
    open_runs: list[int] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def loop(self) -> None:
        while not self.stop.wait(0.25):
            status = http_status(self.health_url)
            self.polls += 1
            if status != 200:
                self.failures.append(f"{time.strftime('%H:%M:%S')}: /_stcore/health -> {status}")
            self.open_runs.append(len(queries.list_runs(self.store.board, active_only=True,
                                                        limit=100)))


@dataclass
class App:
    url: str
    proc: subprocess.Popen
    store: Store
    watch: Watch
    home: Path
    shots: Path

    def output(self) -> str:
        return (self.home / "up.out").read_text(errors="replace")


def stop_up(proc: subprocess.Popen) -> int:
    """Ctrl-C, as in a terminal; kill what is left if that does not work."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.wait()
        return proc.returncode


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    missing = _missing()
    if missing:
        if IN_CI:
            pytest.fail(f"the browser tests are required in CI: {missing}")
        pytest.skip(f"no browser: {missing}")
    home = tmp_path_factory.mktemp("up")
    shots = tmp_path_factory.mktemp("screenshots")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env.update({
        "PYTHONPATH": str(ROOT),
        "SPARKOPS_UI_PORT": str(port),
        "SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{home}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{home}/data/sparkops.db",
        "SPARKOPS_RUNNER_LOG_FILE": str(home / "logs" / "runner.log"),
        "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": str(MAX_IN_PROGRESS),
        "SPARKOPS_DISPATCH_AGENT_ARGV": json.dumps(AGENT_ARGV),
        "SPARKOPS_SERVICES": json.dumps(NO_SERVICES),
    })
    with open(home / "up.out", "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sparkops", "up", "--demo"], cwd=home, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    store = None
    watch = None
    try:
        wait_for(lambda: http_status(f"{url}/_stcore/health") == 200, "the app's health endpoint",
                 timeout=60, proc=proc)
        # `up` seeded the demo sprint before starting its children; more ready work keeps
        # all four agents busy while the browser works.
        store = open_store(make_settings(home))
        for n in range(FILLER_TASKS):
            board.create_task(store.board, f"Filler task {n + 1} (keeps the agents busy)",
                              assignee="loader", priority=-1, created_by="test_browser")
        watch = Watch(f"{url}/_stcore/health", store)
        threading.Thread(target=watch.loop, name="health-watch", daemon=True).start()
        yield App(url, proc, store, watch, home, shots)
    finally:
        if watch is not None:
            watch.stop.set()
        stop_up(proc)
        if store is not None:
            store.dispose()


@pytest.fixture(scope="module")
def browser(app) -> Iterator[Browser]:
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(params=list(VIEWPORTS))
def page(request, browser) -> Iterator[Page]:
    context = browser.new_context(**VIEWPORTS[request.param])
    context.set_default_timeout(PAGE_LOAD_SECONDS * 1000)
    expect.set_options(timeout=PAGE_LOAD_SECONDS * 1000)  # expect() has its own default of 5 s
    tab = context.new_page()
    tab.viewport_name = request.param
    yield tab
    context.close()


# -- helpers -------------------------------------------------------------------------------------


def settle(tab: Page, title: str) -> None:
    """Wait until the page shows its title and Streamlit has finished running it."""
    expect(tab.locator("h1").filter(has_text=title)).to_be_visible()
    tab.wait_for_selector(SETTLED)


def load(app: App, tab: Page, path: str, title: str) -> float:
    started = time.monotonic()
    tab.goto(f"{app.url}/{path}")
    settle(tab, title)
    return time.monotonic() - started


def assert_no_errors(tab: Page, where: str) -> None:
    exceptions = tab.locator(EXCEPTION)
    assert exceptions.count() == 0, f"{where}: Streamlit exception: {exceptions.all_inner_texts()}"
    texts = tab.locator(ERROR_BOX).all_inner_texts()
    # The Playbook's "Happening now" line is the board's state, not the app's failure: with
    # four agents racing on two cores a diagnosis can be true for a moment. Say which.
    status = [t for t in texts if STATUS_LINE in t]
    if status:
        print(f"{where}: {status[0].strip()} ({tab.locator(HAPPENING).count()} cards say yes)")
    errors = [t for t in texts if STATUS_LINE not in t]
    assert not errors, f"{where}: error box: {errors}"


# -- the tests -----------------------------------------------------------------------------------


def test_every_page_loads_without_errors_while_agents_work(app, page):
    wait_for(lambda: max(app.watch.open_runs, default=0) >= 1, "a run to start", timeout=30,
             proc=app.proc)
    times = {}
    for path, title in PAGES:
        where = f"/{path} ({page.viewport_name})"
        times[where] = load(app, page, path, title)
        assert_no_errors(page, where)
        page.screenshot(path=str(app.shots / f"{page.viewport_name}-{path or 'Home'}.png"))
    slow = {where: round(t, 1) for where, t in times.items() if t > PAGE_LOAD_SECONDS}
    assert not slow, f"pages slower than {PAGE_LOAD_SECONDS}s: {slow}"
    print(f"page loads ({page.viewport_name}): " + ", ".join(f"{w} {t:.1f}s" for w, t in times.items()))
    print(f"screenshots in {app.shots}")


def test_a_task_detail_opens_and_closes(app, page):
    load(app, page, "Board", "Board")
    blocked = "[P2] Market data feed integration"  # the demo's blocked task: it stays put
    task_id = next(t["id"] for t in queries.list_tasks(app.store.board) if t["title"] == blocked)
    page.locator(f".st-key-open_{task_id}").get_by_role("button", name="Open").click()
    close = page.locator(".st-key-board_close").get_by_role("button", name="Close")
    expect(close).to_be_visible()
    expect(page.locator("h3").filter(has_text=blocked)).to_be_visible()
    expect(page.get_by_role("tab", name="Actions")).to_be_visible()
    page.wait_for_selector(SETTLED)
    assert_no_errors(page, f"the board's detail view ({page.viewport_name})")
    page.locator("h3").filter(has_text=blocked).scroll_into_view_if_needed()
    page.screenshot(path=str(app.shots / f"{page.viewport_name}-Board-detail.png"))

    close.click()
    expect(close).to_have_count(0)
    expect(page.locator("h3").filter(has_text=blocked)).to_have_count(0)
    page.wait_for_selector(SETTLED)
    assert_no_errors(page, f"the board after closing the detail ({page.viewport_name})")


@pytest.mark.parametrize("page", ["desktop"], indirect=True)
def test_run_now_on_the_jobs_page_runs_the_job_and_audits_it(app, page):
    since = int(time.time()) - 1
    load(app, page, "Jobs", "Jobs")
    page.locator(".st-key-jobs-run-reclaim").get_by_role("button", name="Run now").click()
    success = page.locator(SUCCESS_BOX).filter(has_text="reclaim:")
    expect(success).to_be_visible()
    page.wait_for_selector(SETTLED)
    assert_no_errors(page, "/Jobs after Run now")
    rows = [r for r in actions.audit_log(app.store.ops, since=since) if r["action"] == "job.reclaim"]
    assert len(rows) == 1, rows
    assert rows[0]["result"] == "ok" and rows[0]["target"] == "reclaim"
    assert rows[0]["actor"].startswith("ui@")
    assert rows[0]["message"] in success.inner_text()


def test_the_app_stays_healthy_while_four_agents_work_and_ctrl_c_stops_it(app):
    """Runs last: it stops ``up``."""
    watch = app.watch
    assert watch.polls > 20, "the health watch barely ran"
    assert watch.failures == [], watch.failures
    assert max(watch.open_runs) == MAX_IN_PROGRESS, (
        f"never {MAX_IN_PROGRESS} runs open at once (at most {max(watch.open_runs)})")
    watch.stop.set()
    assert stop_up(app.proc) == 0, app.output()
    assert "Stopped." in app.output()
    assert http_status(f"{app.url}/_stcore/health") is None
