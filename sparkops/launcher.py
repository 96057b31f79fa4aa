"""``python -m sparkops up``: start the jobs runner and the web app, stop them together.

:func:`run_up` checks before it starts anything: the UI binding must be safe
(loopback, or a UI password, or ``ui.allow_unauthenticated_remote``), and the
databases must open (they are created when missing). Then it starts two child
processes from argv lists (never a shell string):

* ``python jobs_runner.py``
* ``python -m streamlit run Home.py --server.address A --server.port P ...``

Both inherit the environment and the current directory, so they read the same
settings and ``.streamlit/secrets.toml``; ``SPARKOPS_CONFIG`` carries an explicit
``--config``. Each child gets its own process group, so a Ctrl-C in the terminal
reaches only the launcher, which then stops the children in order: SIGTERM,
a grace period, SIGKILL. Ctrl-C, SIGTERM or SIGHUP end ``up`` with 0; a child
that dies on its own stops the other and ends ``up`` with 1.
"""

from __future__ import annotations

import ipaddress
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

from sparkops.config import CONFIG_ENV, Secrets, Settings, load_secrets
from sparkops.errors import ConfigError
from sparkops.store import open_store

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
RUNNER_SCRIPT = ROOT / "jobs_runner.py"
APP_SCRIPT = ROOT / "Home.py"

#: How long a child may take to stop after SIGTERM before it gets SIGKILL.
STOP_GRACE_SECONDS = 10.0
#: How often the launcher looks at its children.
POLL_SECONDS = 0.2

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


def is_loopback(address: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); hostnames
    other than localhost count as remote (they are not resolved)."""
    address = address.strip()
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


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


def app_url(settings: Settings) -> str:
    """The address to open in a browser."""
    address, port = settings["ui.address"], settings["ui.port"]
    if address in ("0.0.0.0", "::", ""):
        return f"http://{socket.gethostname()}:{port} (listening on all interfaces)"
    if ":" in address and not address.startswith("["):
        address = f"[{address}]"
    return f"http://{address}:{port}"


def child_commands(settings: Settings, python: str = sys.executable) -> list[Child]:
    """The two children, as argv lists."""
    return [
        Child("jobs runner", [python, str(RUNNER_SCRIPT)]),
        Child("web app", [
            python, "-m", "streamlit", "run", str(APP_SCRIPT),
            "--server.address", str(settings["ui.address"]),
            "--server.port", str(settings["ui.port"]),
            "--server.headless", "true",
            "--browser.gatherUsageStats", "false",
        ]),
    ]


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
    :class:`~sparkops.errors.StorageError` before starting anything."""
    out = out or sys.stdout
    err = err or sys.stderr
    check_ui_binding(settings, load_secrets())
    store = open_store(settings, create=True)
    try:
        if demo:
            from sparkops.demo import seed_demo

            created = seed_demo(store.board)
            print(f"Added {len(created)} demo tasks to the board." if created
                  else "The board already has tasks; no demo tasks added.", file=out)
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
    stop = threading.Event()
    restore = _install_stop_handlers(stop)
    try:
        start_children(children, env)
        print(f"SparkOps is up: web app at {app_url(settings)}; "
              f"jobs runner pid {children[0].pid}. Press Ctrl-C to stop.", file=out, flush=True)
        exited = None
        while exited is None and not stop.wait(POLL_SECONDS):
            exited = next(((c, c.proc.poll()) for c in children if c.proc.poll() is not None), None)
        if exited is None:
            print("Stopping the web app and the jobs runner...", file=out, flush=True)
            stop_children(children, grace)
            print("Stopped.", file=out, flush=True)
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
