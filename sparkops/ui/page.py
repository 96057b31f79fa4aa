"""The frame every page shares: page config, the login gate, the security
banner, and turning library errors into an error box instead of a traceback.

A page starts with ``ctx = page.start("Title")`` and reads inside
``with page.guard():``.
"""

from __future__ import annotations

import hmac
from contextlib import contextmanager
from typing import Iterator

import streamlit as st
from sqlalchemy.exc import DBAPIError

from sparkops.errors import SparkOpsError
from sparkops.launcher import is_loopback
from sparkops.ui.data import AppContext, load_context

#: Pages refresh their live parts this often (seconds).
REFRESH_SECONDS = 5

_AUTH_KEY = "sparkops_authenticated"


def start(title: str) -> AppContext:
    """Configure the page, require a login when a password is set, refuse an
    open app on a public address, and open the store (or show why not and stop)."""
    st.set_page_config(page_title=f"{title} · SparkOps", page_icon="⚡", layout="wide")
    with guard():
        ctx = load_context()
    _require_login(ctx)
    _refuse_open_remote(ctx)
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
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
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


def _require_login(ctx: AppContext) -> None:
    password = ctx.secrets.ui_password
    if not password or st.session_state.get(_AUTH_KEY):
        return
    st.title("SparkOps")
    with st.form("sparkops_login"):
        given = st.text_input("Password", type="password")
        submitted = st.form_submit_button("Log in")
    if submitted:
        if hmac.compare_digest(given.encode("utf-8"), password.encode("utf-8")):
            st.session_state[_AUTH_KEY] = True
            st.rerun()
        st.error("Wrong password.")
    st.stop()


def _refuse_open_remote(ctx: AppContext) -> None:
    """The app's own check, for ``streamlit run Home.py`` started by hand
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
