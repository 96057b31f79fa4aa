"""Shared fixtures: real SQLite files in tmp_path and a real PostgreSQL.

PostgreSQL tests use the server on 127.0.0.1:5432 (override with
``SPARKOPS_TEST_PG``, a URL to a maintenance database). Each test gets a fresh
database that is dropped afterwards. Where no server answers, PostgreSQL tests
are skipped, except under CI (``CI=true``), where that is a failure.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from sqlalchemy import create_engine, text

from sparkops.config import Settings, load_settings
from sparkops.storage.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN_URL = os.environ.get("SPARKOPS_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
NOW = 1_790_000_000  # a fixed "now" for tests that pass the clock


def _pg_available() -> str | None:
    try:
        engine = create_engine(PG_ADMIN_URL, connect_args={"connect_timeout": 3})
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "no server"
        return str(exc).splitlines()[0]


_PG_PROBLEM = _pg_available()


@pytest.fixture(autouse=True)
def keep_main_module() -> Iterator[None]:
    """AppTest runs a page as ``__main__`` and leaves it there; a later test's
    ``multiprocessing`` "spawn" child re-imports ``__main__`` and would run that page.
    Every test ends with the ``__main__`` it began with."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database; dropped after the test."""
    if _PG_PROBLEM is not None:
        if IN_CI:
            pytest.fail(f"PostgreSQL is required in CI but not reachable: {_PG_PROBLEM}")
        pytest.skip(f"PostgreSQL not reachable: {_PG_PROBLEM}")
    name = f"sparkops_test_{uuid.uuid4().hex[:12]}"
    # pre-ping: a test may restart the server
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}".replace("postgresql+psycopg://", "postgresql://")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[..., Path]:
    """Write ``sparkops.toml`` in tmp_path from a dict of sections."""

    def write(sections: dict[str, dict] | None = None, text_: str | None = None) -> Path:
        path = tmp_path / "sparkops.toml"
        if text_ is not None:
            path.write_text(text_)
            return path
        lines = []
        for section, values in (sections or {}).items():
            lines.append(f"[{section}]")
            for key, value in values.items():
                if isinstance(value, bool):
                    lines.append(f"{key} = {'true' if value else 'false'}")
                elif isinstance(value, (int, float)):
                    lines.append(f"{key} = {value}")
                else:
                    lines.append(f'{key} = "{value}"')
        path.write_text("\n".join(lines) + "\n")
        return path

    return write


def make_settings(tmp_path: Path, board_url: str | None = None, ops_url: str | None = None,
                  **env: str) -> Settings:
    environ = {
        "SPARKOPS_STORAGE_BOARD_URL": board_url or f"sqlite:///{tmp_path}/data/kanban.db",
        "SPARKOPS_STORAGE_OPS_URL": ops_url or f"sqlite:///{tmp_path}/data/sparkops.db",
        **env,
    }
    return load_settings(env=environ, cwd=tmp_path)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request) -> str:
    return request.param


@pytest.fixture
def settings(backend: str, tmp_path: Path, request) -> Settings:
    """Settings for a fresh board on the backend of this test's parameter."""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        return make_settings(tmp_path, board_url=url, ops_url=url)
    return make_settings(tmp_path)


@pytest.fixture
def storage_env(backend: str, tmp_path: Path, request) -> dict[str, str]:
    """``SPARKOPS_STORAGE_*`` for a fresh board and ops store on this test's backend
    (PostgreSQL: one database for both, as a fleet runs it)."""
    if backend == "postgresql":
        url = request.getfixturevalue("pg_url")
        return {"SPARKOPS_STORAGE_BOARD_URL": url, "SPARKOPS_STORAGE_OPS_URL": url}
    return {"SPARKOPS_STORAGE_BOARD_URL": f"sqlite:///{tmp_path}/data/kanban.db",
            "SPARKOPS_STORAGE_OPS_URL": f"sqlite:///{tmp_path}/data/sparkops.db"}


@pytest.fixture
def store(settings: Settings) -> Iterator[Store]:
    st = open_store(settings, create=True, now=NOW)
    try:
        yield st
    finally:
        st.dispose()


@pytest.fixture
def sqlite_settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def sqlite_store(sqlite_settings: Settings) -> Iterator[Store]:
    st = open_store(sqlite_settings, create=True, now=NOW)
    try:
        yield st
    finally:
        st.dispose()


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """For the app's AppTest tests: settings through the environment as `up` passes
    them (a fresh SQLite board and ops store in tmp_path, nothing else of this
    process's SPARKOPS_*), the app bound to 127.0.0.1, no password, no
    .streamlit/secrets.toml, Streamlit's caches fresh (they are per process).
    Test modules add what they need by overriding it with this one as argument."""
    import streamlit as st
    from streamlit import config

    for name in [n for n in os.environ if n.startswith("SPARKOPS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("SPARKOPS_STORAGE_BOARD_URL", f"sqlite:///{tmp_path}/data/kanban.db")
    monkeypatch.setenv("SPARKOPS_STORAGE_OPS_URL", f"sqlite:///{tmp_path}/data/sparkops.db")
    monkeypatch.chdir(tmp_path)
    previous = config.get_option("server.address")
    config.set_option("server.address", "127.0.0.1")
    st.cache_data.clear()
    yield tmp_path
    config.set_option("server.address", previous)


@pytest.fixture
def downloads(monkeypatch):
    """What the download buttons would send: file name -> the callable Streamlit
    runs when one is clicked (the app registers it as deferred data)."""
    from streamlit.runtime.media_file_manager import MediaFileManager

    seen: dict[str, object] = {}
    original = MediaFileManager.add_deferred

    def spy(self, data_callable, mimetype, coordinates, file_name=None, **kwargs):
        seen[file_name] = data_callable
        return original(self, data_callable, mimetype, coordinates, file_name=file_name, **kwargs)

    monkeypatch.setattr(MediaFileManager, "add_deferred", spy)
    return seen


def run_page(path: str, timeout: float = 60):
    """Render one page of the app (``Home.py`` or ``pages/NAME.py``, under
    ``sparkops/app/``) with AppTest."""
    from streamlit.testing.v1 import AppTest

    return AppTest.from_file(str(ROOT / "sparkops" / "app" / path), default_timeout=timeout).run()


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 30.0,
             proc: subprocess.Popen | None = None) -> Any:
    """Poll ``predicate`` until it returns something truthy (and return that), or
    fail after ``timeout`` seconds; fail at once if ``proc`` exits meanwhile.
    For waiting on other processes; the clock of the code under test is a parameter."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def gone(pid: int) -> bool:
    """The process no longer runs (it is gone, or a zombie nobody reaped yet). A
    killed process whose other threads are still ending shows as a zombie before
    its parent can reap it: it is gone once only its main thread is left."""
    try:
        return (psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                and len(os.listdir(f"/proc/{pid}/task")) <= 1)
    except (psutil.NoSuchProcess, FileNotFoundError):
        return True


def find_hermes() -> Path | None:
    """The real ``hermes`` CLI: ``$SPARKOPS_TEST_HERMES``, else ``.venv-hermes/bin/hermes``."""
    configured = os.environ.get("SPARKOPS_TEST_HERMES")
    candidate = Path(configured) if configured else ROOT / ".venv-hermes" / "bin" / "hermes"
    return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None


@pytest.fixture
def hermes_bin() -> Path:
    """The real ``hermes`` CLI; the test is skipped without it, except under CI."""
    found = find_hermes()
    if found is None:
        where = os.environ.get("SPARKOPS_TEST_HERMES") or ROOT / ".venv-hermes" / "bin" / "hermes"
        message = (f"hermes not found at {where}; make it with `python3 -m venv .venv-hermes && "
                   ".venv-hermes/bin/pip install hermes-agent==0.19.0` or set SPARKOPS_TEST_HERMES")
        if IN_CI:
            pytest.fail("Hermes is required in CI: " + message)
        pytest.skip(message)
    return found


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    """Run ``python -m sparkops`` as a real subprocess."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "sparkops", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# -- a real OpenSSH server (tests/sshd.py) ----------------------------------------------------


@pytest.fixture
def ssh_server(tmp_path: Path) -> Iterator[Any]:
    """A real sshd on a free loopback port, with its own host key and a client key."""
    import sshd

    if not sshd.available():
        if IN_CI:
            pytest.fail("OpenSSH's sshd is required in CI (scripts/test installs openssh-server)")
        pytest.skip("sshd is not installed (apt-get install openssh-server)")
    server = sshd.SshServer(tmp_path / "sshd").start()
    yield server
    server.stop()


def remote_env(server: Any, tmp_path: Path, *, name: str = "vps", trusted: bool = True,
               **fields: Any) -> dict[str, str]:
    """``SPARKOPS_REMOTES`` naming ``server`` as remote host ``name``; its key is in the
    test's known_hosts file when ``trusted``."""
    import json

    known = tmp_path / "known_hosts"
    if trusted and not known.exists():
        known.write_text(server.known_hosts_line())
    spec = {"address": "127.0.0.1", "port": server.port, "key_file": str(server.client_key),
            "known_hosts": str(known), **fields}
    return {"SPARKOPS_REMOTES": json.dumps({name: spec})}


# -- the browser tests' app, started early -------------------------------------------------------


def pytest_collection_finish(session: pytest.Session) -> None:
    """When the browser tests will run, start their `up --demo` now: its two minutes
    of living demo pass while the other test files run (test_browser.py)."""
    browser = sys.modules.get("test_browser")
    if browser is not None and any(getattr(item, "module", None) is browser for item in session.items):
        browser.start_early()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    browser = sys.modules.get("test_browser")
    if browser is not None:
        browser.stop_early()


def http_status(url: str) -> int | None:
    """The HTTP status of a GET of ``url`` (loopback only), or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
