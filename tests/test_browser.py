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
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from conftest import IN_CI, ROOT, make_settings, wait_for
from test_launcher import free_port, http_status

from sparkops.board import queries
from sparkops.board import transitions as board
from sparkops.control import actions
from sparkops.core import procs
from sparkops.engine import workers
from sparkops.storage.store import Store, open_store

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
#: The pages are checked once the living demo has run this long (the issue's "after 2 minutes").
LIVING_SECONDS = 120.0
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
    started: float = field(default_factory=time.monotonic)

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


@dataclass
class Started:
    """A `sparkops up --demo` started for these tests."""

    home: Path
    port: int
    proc: subprocess.Popen
    began: float


#: The app started when the test session's collection finished (conftest calls
#: :func:`start_early`): the living demo's two minutes then pass while the other
#: test files run, instead of in a wait here.
EARLY: list[Started] = []


def start_up_demo(home: Path) -> Started:
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
    return Started(home, port, proc, time.monotonic())


def start_early() -> None:
    if _missing() is None and not EARLY:
        EARLY.append(start_up_demo(Path(tempfile.mkdtemp(prefix="sparkops-browser-"))))


def stop_early() -> None:
    """At the end of the session: what the module's own teardown did not stop."""
    for started in EARLY:
        stop_up(started.proc)
        stop_agents_left(started.home)
        shutil.rmtree(started.home, ignore_errors=True)


def stop_agents_left(home: Path) -> None:
    for worker in workers.live(home / "data" / "workers"):  # left to finish by `up`: ours to end
        procs.terminate_group(worker.identity.agent, grace=2)
        procs.terminate_group(worker.identity.shim, grace=2)


@pytest.fixture(scope="module")
def app(tmp_path_factory) -> Iterator[App]:
    missing = _missing()
    if missing:
        if IN_CI:
            pytest.fail(f"the browser tests are required in CI: {missing}")
        pytest.skip(f"no browser: {missing}")
    started = EARLY[0] if EARLY else start_up_demo(tmp_path_factory.mktemp("up"))
    home, port, proc = started.home, started.port, started.proc
    shots = tmp_path_factory.mktemp("screenshots")
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
        yield App(url, proc, store, watch, home, shots, started=started.began)
    finally:
        if watch is not None:
            watch.stop.set()
        stop_up(proc)
        stop_agents_left(home)
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


def test_a_task_detail_opens_in_view_from_the_bottom_of_a_column_and_closes(app, page):
    load(app, page, "Board", "Board")
    # the last card of the longest column, scrolled to as a person would
    # (read in one go: the living board may re-render between two reads of a card)
    cards = page.locator('[class*="st-key-open_t_"]').evaluate_all(
        "els => els.map(e => [e.className, e.getBoundingClientRect().top, e.getBoundingClientRect().height])")
    shown = {next(c.removeprefix("st-key-open_") for c in classes.split() if c.startswith("st-key-open_")): top
             for classes, top, height in cards if height > 0}
    # a finished task's card stays where it is while the demo moves the others on
    done = {t: top for t, top in shown.items() if queries.get_task(app.store.board, t)["status"] == "done"}
    task_id = max(done or shown, key=(done or shown).get)
    card = page.locator(f".st-key-open_{task_id}")
    title = queries.get_task(app.store.board, task_id)["title"]
    card.get_by_role("button", name="Open").click()  # scrolled to first, as a person would; a re-render is retried
    close = page.locator(".st-key-board_close").get_by_role("button", name="Close")
    expect(close).to_be_in_viewport()
    expect(page.get_by_role("dialog").locator("h3").filter(has_text=title[:30])).to_be_in_viewport()
    expect(page.get_by_role("tab", name="Actions")).to_be_visible()
    page.wait_for_selector(SETTLED)
    assert_no_errors(page, f"the board's detail view ({page.viewport_name})")
    page.screenshot(path=str(app.shots / f"{page.viewport_name}-Board-detail.png"))

    close.click()
    expect(close).to_have_count(0)
    expect(page.get_by_role("dialog")).to_have_count(0)
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


def test_every_page_of_the_living_demo_shows_something_moving_and_no_error(app, page):
    """After two minutes of `up --demo`: every page, on a desktop and a phone, shows
    no error box, says it is a demo, and shows the demo alive: a run in progress on
    Home, the simulated GB10 with its processes and samples and the simulated vLLM's
    metrics on the GPU page."""
    wait_for(lambda: max(app.watch.open_runs, default=0) >= 1, "a run to start", timeout=30,
             proc=app.proc)
    time.sleep(max(0.0, LIVING_SECONDS - (time.monotonic() - app.started)))
    times = {}
    for path, title in PAGES:
        where = f"/{path} ({page.viewport_name})"
        times[where] = load(app, page, path, title)
        assert_no_errors(page, where)
        expect(page.get_by_text("Demo", exact=False).first).to_be_visible()
        page.screenshot(path=str(app.shots / f"{page.viewport_name}-{path or 'Home'}.png"), full_page=True)
        if path == "":
            expect(page.get_by_text("No run in progress.")).to_have_count(0)
        elif path == "GPU":
            expect(page.get_by_text("NVIDIA GB10 (demo)").first).to_be_visible()
            expect(page.get_by_text("demo-vllm").first).to_be_attached()  # its process, in the table
            expect(page.get_by_text("No GPU sample of")).to_have_count(0)
            expect(page.get_by_text("vLLM healthy", exact=False).or_(
                page.get_by_text("hung", exact=False)).first).to_be_visible()
    slow = {where: round(t, 1) for where, t in times.items() if t > PAGE_LOAD_SECONDS}
    assert not slow, f"pages slower than {PAGE_LOAD_SECONDS}s: {slow}"
    print(f"page loads ({page.viewport_name}): " + ", ".join(f"{w} {t:.1f}s" for w, t in times.items()))
    print(f"screenshots in {app.shots}")


def test_the_app_stays_healthy_while_four_agents_work_and_ctrl_c_stops_it(app):
    """Runs last: it stops ``up``."""
    watch = app.watch
    assert watch.polls > 20, "the health watch barely ran"
    assert watch.failures == [], watch.failures
    assert max(watch.open_runs) == MAX_IN_PROGRESS, (
        f"never {MAX_IN_PROGRESS} runs open at once (at most {max(watch.open_runs)})")
    watch.stop.set()
    assert stop_up(app.proc) == 0, app.output()
    assert "Stopped" in app.output()
    # agents at work are left to finish, and `up` names them (the fixture ends them)
    left = [w for w in workers.live(app.home / "data" / "workers") if w.agent_alive]
    assert not left or "agent(s) still work and are left to finish" in app.output()
    assert http_status(f"{app.url}/_stcore/health") is None
