"""``python -m sparkops up``: start the jobs runner and the web app, stop them together.

:func:`run_up` checks before it starts anything: the UI binding must be safe
(loopback, or a UI password, or ``ui.allow_unauthenticated_remote``), and the
databases must open (they are created when missing). Then it starts two child
processes from argv lists (never a shell string):

* ``python -m sparkops.runner``
* ``python -m streamlit run sparkops/app/Home.py --server.address A --server.port P ...``

Both inherit the environment and the current directory, so they read the same
settings and ``.streamlit/secrets.toml``; ``SPARKOPS_CONFIG`` carries an explicit
``--config``. Each child gets its own process group, so a Ctrl-C in the terminal
reaches only the launcher, which then stops the children in order: SIGTERM,
a grace period, SIGKILL. Ctrl-C, SIGTERM or SIGHUP end ``up`` with 0; a child
that dies on its own stops the other and ends ``up`` with 1.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sparkops.config import CONFIG_ENV, DEMO_ENV, Secrets, Settings, is_loopback, load_secrets, state_dir
from sparkops.core.errors import ConfigError
from sparkops.demo.sprint import is_demo_board, seed_demo
from sparkops.engine import workers
from sparkops.meters.nvml_fake import DEMO_GPU_ENV, DEMO_MEMINFO
from sparkops.runner.loop import RunnerLock, lock_path
from sparkops.storage.store import open_store

log = logging.getLogger(__name__)

#: The app's main script, inside the package (an install serves it too); Streamlit
#: finds the other pages in ``pages/`` beside it.
APP_SCRIPT = Path(__file__).resolve().parents[1] / "app" / "Home.py"

#: How long a child may take to stop after SIGTERM before it gets SIGKILL.
STOP_GRACE_SECONDS = 10.0
#: How often the launcher looks at its children.
POLL_SECONDS = 0.2
#: How long the app may take to answer its health URL before ``up`` gives up waiting.
APP_START_SECONDS = 60.0

EXIT_CHILD_DIED = 1

#: The agent ``up --demo`` runs when no agent is configured: real little work,
#: 5 to 20 seconds a task, one crash in ten (so reclaim and retries show too).
DEMO_AGENT_ARGV = ["{python}", "-m", "sparkops", "demo-agent", "--min-seconds", "5",
                   "--max-seconds", "20", "--fail-rate", "0.1"]


@dataclass
class Child:
    """One process the launcher owns."""

    name: str
    argv: list[str]
    proc: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None


# -- checks ---------------------------------------------------------------------------


def check_ui_binding(settings: Settings, secrets: Secrets) -> None:
    """Refuse an app reachable from other machines that nobody has to log in to."""
    address = settings["ui.address"]
    if is_loopback(address) or secrets.ui_password or settings["ui.allow_unauthenticated_remote"]:
        return
    raise ConfigError(
        f"ui.address is {address!r}, reachable from other machines, but no UI password is set; "
        "set SPARKOPS_UI_PASSWORD (or ui_password in .streamlit/secrets.toml), bind ui.address "
        "to 127.0.0.1, or set ui.allow_unauthenticated_remote = true to accept an open app"
    )


def check_port_free(address: str, port: int) -> None:
    """Refuse a UI port something already listens on (another app, an older ``up``)."""
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "::1" if address == "::" else address.strip("[]")
    try:
        with socket.create_connection((host, port), timeout=1):
            pass
    except OSError:
        return  # nothing answers: free
    raise ConfigError(f"ui.port {port} on {address} is in use by another program; stop it, or start "
                      f"SparkOps on another port with `sparkops up --port {port + 1}` (or ui.port in sparkops.toml)")


def check_runner_free(settings: Settings) -> None:
    """Refuse to start while another jobs runner holds this board's lock."""

    with RunnerLock(lock_path(settings)):  # raises AlreadyRunning, naming the holder's pid
        pass


def wait_until_serving(children: list[Child], url: str, *, timeout: float = APP_START_SECONDS,
                       stop: threading.Event | None = None) -> bool:
    """Wait until the app answers its health URL (and no child died): True once it does."""
    import urllib.request

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not (stop and stop.is_set()):
        if any(c.proc is None or c.proc.poll() is not None for c in children):
            return False
        try:
            with opener.open(url, timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(POLL_SECONDS)
    return False


def live_agents(settings: Settings) -> list[str]:
    """The agents still working on this host (the registry's), in words."""

    return [f"{w.task_id} (run {w.run_id}, pid {w.identity.agent.pid})"
            for w in workers.live(workers.directory(settings)) if w.agent_alive]


def app_url(settings: Settings) -> str:
    """The address to open in a browser."""
    address, port = settings["ui.address"], settings["ui.port"]
    if address in ("0.0.0.0", "::", ""):
        return f"http://{socket.gethostname()}:{port} (listening on all interfaces)"
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{port}"


def health_url(settings: Settings) -> str:
    """The app's own health URL (Streamlit's), on loopback when it listens everywhere."""
    address = settings["ui.address"]
    host = "127.0.0.1" if address in ("0.0.0.0", "") else "[::1]" if address == "::" else address
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{settings['ui.port']}/_stcore/health"


def child_commands(settings: Settings, python: str = sys.executable) -> list[Child]:
    """The two children, as argv lists."""
    return [
        Child("jobs runner", [python, "-m", "sparkops.runner"]),
        Child("web app", [
            python, "-m", "streamlit", "run", str(APP_SCRIPT),
            "--server.address", str(settings["ui.address"]),
            "--server.port", str(settings["ui.port"]),
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "minimal",  # no "Deploy" button
            # the look of .streamlit/config.toml, which Streamlit reads only from the cwd
            "--theme.base", "dark",
            "--theme.primaryColor", "#76b900",
        ]),
    ]


def demo_children(python: str, vllm_port: int) -> list[Child]:
    """``up --demo``'s stand-ins: the model server (first, so the first watchdog pass
    finds it) and the planner (last)."""
    return [Child("demo vLLM", [python, "-m", "sparkops", "demo-vllm", "--port", str(vllm_port)]),
            Child("demo planner", [python, "-m", "sparkops", "demo-planner"])]


def demo_environment(env: dict[str, str], settings: Settings, vllm_port: int) -> dict[str, str]:
    """What the children of ``up --demo`` are told: demo mode (the pages say so), the
    simulated GB10 (its meminfo file), the vLLM service at the demo server, a
    watchdog every 30 s so a hang is seen within a minute, and two agents at a time
    (those two unless set)."""

    meminfo = state_dir(settings) / "demo" / "meminfo"
    meminfo.parent.mkdir(parents=True, exist_ok=True)
    meminfo.write_text(DEMO_MEMINFO)
    declared = json.loads(env.get("SPARKOPS_SERVICES") or "{}")
    declared["vllm"] = {**declared.get("vllm", {}), "check": "vllm", "url": f"http://127.0.0.1:{vllm_port}",
                        "enabled": True}
    return {**env, DEMO_ENV: "1", DEMO_GPU_ENV: str(meminfo), "SPARKOPS_SERVICES": json.dumps(declared),
            "SPARKOPS_WATCHDOG_INTERVAL_SECONDS": env.get("SPARKOPS_WATCHDOG_INTERVAL_SECONDS", "30"),
            "SPARKOPS_DISPATCH_MAX_IN_PROGRESS": env.get("SPARKOPS_DISPATCH_MAX_IN_PROGRESS", "2")}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_environment(config_path: str | os.PathLike | None,
                      base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    if config_path is not None:
        env[CONFIG_ENV] = str(Path(config_path).expanduser().resolve())
    return env


# -- starting and stopping ----------------------------------------------------------------


def start_children(children: list[Child], env: dict[str, str]) -> None:
    """Start each child in its own process group. On a failure, stop the ones started."""
    for child in children:
        try:
            child.proc = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL,
                                          process_group=0)
        except OSError as exc:
            stop_children(children)
            raise ConfigError(f"cannot start the {child.name} ({child.argv[0]}): {exc.strerror}") from exc
        log.info("started the %s (pid %d)", child.name, child.proc.pid)


def stop_children(children: list[Child], grace: float = STOP_GRACE_SECONDS) -> None:
    """SIGTERM every live child's process group, wait up to ``grace``, then SIGKILL."""
    live = [c for c in children if c.proc is not None and c.proc.poll() is None]
    for child in live:
        _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for child in live:
        try:
            child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("the %s (pid %d) did not stop within %.0fs; killing it",
                        child.name, child.pid, grace)
            _signal_group(child, signal.SIGKILL)
            child.proc.wait()


def _signal_group(child: Child, sig: signal.Signals) -> None:
    try:
        os.killpg(child.proc.pid, sig)  # process_group=0: the group id is the child's pid
    except ProcessLookupError:
        pass


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_up(settings: Settings, config_path: str | os.PathLike | None = None,
           demo: bool = False, *, out: TextIO | None = None, err: TextIO | None = None,
           grace: float = STOP_GRACE_SECONDS) -> int:
    """Start the runner and the app and wait. Returns 0 after Ctrl-C/SIGTERM,
    1 when a child died on its own. Raises :class:`ConfigError` or
    :class:`~sparkops.core.errors.StorageError` before starting anything."""
    out = out or sys.stdout
    err = err or sys.stderr
    check_ui_binding(settings, load_secrets())
    check_port_free(settings["ui.address"], settings["ui.port"])
    check_runner_free(settings)
    store = open_store(settings, create=True)
    living = False
    try:
        if demo:

            created = seed_demo(store.board)
            living = bool(created) or is_demo_board(store.board)
            print(f"Added {len(created)} demo tasks to the board." if created
                  else "The board already has tasks; no demo tasks added." + (
                      "" if living else " It is not the demo's board, so the living demo (planner, "
                      "simulated GPU and model server) does not start; only the demo agent works."), file=out)
        print(f"board: {store.board.display_url}\nops:   {store.ops.display_url}",
              file=out, flush=True)
    finally:
        store.dispose()

    env = child_environment(config_path)
    if demo and not settings["dispatch.agent_argv"]:
        env["SPARKOPS_DISPATCH_AGENT_ARGV"] = json.dumps(DEMO_AGENT_ARGV)
        print("Workers: the demo agent (no dispatch.agent_argv configured).", file=out, flush=True)
    elif not settings["dispatch.agent_argv"]:
        print("No agent configured (dispatch.agent_argv): ready tasks will wait. "
              "See docs/configuration.md, or try `up --demo`.", file=out, flush=True)

    children = child_commands(settings)
    if living:
        vllm_port = free_port()
        env = demo_environment(env, settings, vllm_port)
        server, planner = demo_children(sys.executable, vllm_port)
        children = [server, *children, planner]
        print(f"Demo: a simulated GB10 (NVML faked, 128 GB unified memory), a simulated vLLM on "
              f"127.0.0.1:{vllm_port} that hangs now and then, demo agents, and a planner that adds "
              "work and asks you questions; the pages say so.", file=out, flush=True)
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        start_children(children, env)
        runner = next(c for c in children if c.name == "jobs runner")
        print(f"Starting the jobs runner (pid {runner.pid}) and the web app...", file=out, flush=True)
        if wait_until_serving(children, health_url(settings), stop=stop):
            print(f"SparkOps is up: web app at {app_url(settings)}; "
                  f"jobs runner pid {runner.pid}. Press Ctrl-C to stop.", file=out, flush=True)
        exited = None
        while exited is None and not stop.wait(POLL_SECONDS):
            exited = next(((c, c.proc.poll()) for c in children if c.proc.poll() is not None), None)
        if exited is None:
            names = [f"the {c.name}" for c in reversed(children)]
            print(f"Stopping {', '.join(names[:-1])} and {names[-1]}...", file=out, flush=True)
            stop_children(children, grace)
            agents = live_agents(settings)
            print("Stopped." if not agents else
                  f"Stopped the web app and the jobs runner. {len(agents)} agent(s) still work and are left "
                  f"to finish: {', '.join(agents)}. Their runs are booked when they end; the next `up` "
                  "watches them again.", file=out, flush=True)
            return 0
        dead, code = exited
        others = " and ".join(c.name for c in children if c is not dead)
        print(f"sparkops: error: the {dead.name} {describe_exit(code)}; stopping the {others}. "
              "Its output, if any, is above.", file=err, flush=True)
        stop_children(children, grace)
        return EXIT_CHILD_DIED
    finally:
        stop_children(children, grace)  # a no-op unless we got here by an exception
        restore()


def _install_stop_handlers(stop: threading.Event):
    """SIGINT, SIGTERM and SIGHUP set ``stop``. Returns a function that restores
    the previous handlers. Does nothing outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(_signum: int, _frame: Any) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)

    return restore
