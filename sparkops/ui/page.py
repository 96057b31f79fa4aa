"""The frame every page shares: page config, the login gate, the security
banner, and turning library errors into an error box instead of a traceback.

A page starts with ``ctx = page.start("Title")`` and reads inside
``with page.guard():``.
"""

from __future__ import annotations

import hmac
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import streamlit as st
from sqlalchemy.exc import DBAPIError

from sparkops.config import DEMO_ENV, is_loopback, load_secrets
from sparkops.core.errors import SparkOpsError
from sparkops.storage.db import error_line
from sparkops.ui.data import AppContext, load_context

#: On a phone, a row of metrics wraps two to a line (Streamlit stacks every column
#: full width, one metric per screen line); other columns (the board's) still stack.
PHONE_CSS = """<style>
@media (max-width: 640px) {
  [data-testid="stHorizontalBlock"]:has(> [data-testid="stColumn"] [data-testid="stMetric"]) {
    flex-wrap: wrap; gap: 0.5rem 1rem; }
  [data-testid="stHorizontalBlock"]:has(> [data-testid="stColumn"] [data-testid="stMetric"])
    > [data-testid="stColumn"] { flex: 1 1 calc(50% - 1rem) !important; min-width: calc(50% - 1rem) !important; }
  [data-testid="stMetricValue"] { font-size: 1.6rem; }
}
</style>"""
#: Pages refresh their live parts this often (seconds).
REFRESH_SECONDS = 5

_AUTH_KEY = "sparkops_authenticated"


def start(title: str) -> AppContext:
    """Configure the page, require a login when a password is set (before anything
    else is read or shown: no path, setting or error reaches a visitor who has not
    logged in), refuse an open app on a public address, and open the store (or show
    why not and stop)."""
    st.set_page_config(page_title=f"{title} · SparkOps", page_icon="⚡", layout="wide")
    st.html(PHONE_CSS)
    try:
        password = load_secrets().ui_password
    except SparkOpsError:
        st.error("**SparkOps cannot read its secrets.** See the log of the app's process.", icon="🛑")
        st.stop()
    _require_login(password)
    with guard():
        ctx = load_context()
    _refuse_open_remote(ctx)
    if os.environ.get(DEMO_ENV):
        st.caption("🎭 **Demo**: the GPU (a GB10), the model server, the agents and the planner adding "
                   "work are simulated by `sparkops up --demo`; the board, the jobs and every button are real.")
    return ctx


@contextmanager
def guard() -> Iterator[None]:
    """Show a SparkOps or database error as one error box and stop the page."""
    try:
        yield
    except SparkOpsError as err:
        st.error(f"**SparkOps cannot read its data.** {err}", icon="🛑")
        st.stop()
    except DBAPIError as exc:
        reason = error_line(exc)
        st.error(f"**Database error.** {reason}", icon="🛑")
        st.stop()


def bound_address() -> str:
    """The address the Streamlit server listens on ("" means all interfaces)."""
    return st.get_option("server.address") or ""


def security_banner(ctx: AppContext) -> None:
    """Say plainly who can reach this app."""
    if ctx.secrets.ui_password:
        return
    address = bound_address()
    if is_loopback(address):
        st.info(f"Unauthenticated, bound to localhost ({address}). Set SPARKOPS_UI_PASSWORD "
                "before making the app reachable from other machines.", icon="🔓")
    else:
        st.warning(f"Unauthenticated and reachable from other machines "
                   f"({address or 'all interfaces'}), because ui.allow_unauthenticated_remote "
                   "is set. Anyone who can reach this port can use the app.", icon="⚠️")


#: Login throttling, for the whole app process (every session): after this many
#: wrong passwords within LOGIN_WINDOW_SECONDS, no password is even compared until
#: LOGIN_PAUSE_SECONDS after the last wrong one.
LOGIN_FREE_TRIES = 5
LOGIN_WINDOW_SECONDS = 60.0
LOGIN_PAUSE_SECONDS = 30.0
_login_failures: list[float] = []
_login_lock = threading.Lock()


def login_wait(now: float) -> float:
    """Seconds until a password may be tried again (0: now)."""
    with _login_lock:
        _login_failures[:] = [t for t in _login_failures if now - t < LOGIN_WINDOW_SECONDS]
        if len(_login_failures) < LOGIN_FREE_TRIES:
            return 0.0
        return max(0.0, _login_failures[-1] + LOGIN_PAUSE_SECONDS - now)


def _note_login_failure(now: float) -> None:
    with _login_lock:
        _login_failures.append(now)


def _require_login(password: str | None) -> None:
    if not password or st.session_state.get(_AUTH_KEY):
        return
    st.title("SparkOps")
    with st.form("sparkops_login"):
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        now = time.monotonic()
        wait = login_wait(now)
        if wait > 0:
            st.error(f"Too many wrong passwords: try again in {math.ceil(wait)} s.")
            st.stop()
        if hmac.compare_digest(given.encode("utf-8"), password.encode("utf-8")):
            st.session_state[_AUTH_KEY] = True
            st.rerun()
        _note_login_failure(now)
        st.error("Wrong password.")
    st.stop()


def _refuse_open_remote(ctx: AppContext) -> None:
    """The app's own check, for ``streamlit run sparkops/app/Home.py`` started by hand
    (``sparkops up`` already refuses this before starting anything)."""
    address = bound_address()
    if (ctx.secrets.ui_password or is_loopback(address)
            or ctx.settings["ui.allow_unauthenticated_remote"]):
        return
    st.error(
        f"This app listens on {address or 'all interfaces'} without a password. Set "
        "SPARKOPS_UI_PASSWORD, start it with `python -m sparkops up` (which binds "
        "127.0.0.1), or set ui.allow_unauthenticated_remote = true.", icon="🛑")
    st.stop()


def actor() -> str:
    """Who is pressing buttons, for the audit: ``ui@<client address>``."""
    try:
        address = st.context.ip_address
    except Exception:  # noqa: BLE001 - older Streamlit, or no request
        address = None
    return f"ui@{address if isinstance(address, str) and address else 'local'}"


def show_result(result) -> None:
    """An action's outcome as a success or error box (never a traceback)."""
    if result.ok:
        st.success(result.message, icon="✅")
    else:
        st.error(result.message, icon="🛑")
