"""What the pages read, and nothing else: settings, one store per process, and
short-lived cached reads through :mod:`sparkops.queries` (no SQL here either).

The store is cached with ``st.cache_resource`` keyed by the two database URLs,
so every session of the app shares one pair of engines. Reads are cached with
``st.cache_data`` for :data:`READ_TTL_SECONDS`, so a page refreshing itself in
several browser tabs costs one query, not one per tab. The app never creates
databases: ``sparkops init`` / ``sparkops up`` / the runner do that.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import streamlit as st

from sparkops import queries
from sparkops.config import Secrets, Settings, load_secrets, load_settings
from sparkops.db import Database
from sparkops.jobs import JobContext
from sparkops.store import Store, open_store

#: How long a cached read is reused (seconds).
READ_TTL_SECONDS = 2


@dataclass(frozen=True)
class AppContext:
    settings: Settings
    secrets: Secrets
    store: Store


def load_context() -> AppContext:
    """Settings, secrets and the shared store. Raises ``ConfigError`` /
    ``StorageError`` with a message meant for the operator."""
    settings = load_settings()
    secrets = load_secrets()
    store = _shared_store(settings["storage.board_url"], settings["storage.ops_url"], settings)
    return AppContext(settings=settings, secrets=secrets, store=store)


@st.cache_resource(show_spinner=False)
def _shared_store(board_url: str, ops_url: str, _settings: Settings) -> Store:
    # Keyed by the URLs only; a failure is not cached, so the next rerun retries.
    return open_store(_settings)


def job_context(ctx: AppContext) -> JobContext:
    """The job context buttons run with: one per app process, like the store."""
    return _job_context(ctx.settings["storage.board_url"], ctx.settings["storage.ops_url"], ctx)


@st.cache_resource(show_spinner=False)
def _job_context(board_url: str, ops_url: str, _ctx: AppContext) -> JobContext:
    return JobContext.create(_ctx.settings, _ctx.store, secrets=_ctx.secrets)


def board_stats(db: Database) -> dict[str, Any]:
    """Counts per status and assignee, oldest ready age, active runs, ``now``."""
    return _board_stats(db, db.url)


def tasks(db: Database, *, include_archived: bool = False) -> list[dict[str, Any]]:
    return _tasks(db, db.url, include_archived)


def active_runs(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    return _runs(db, db.url, True, limit)


def recent_events(db: Database, limit: int = 30) -> list[dict[str, Any]]:
    return _events(db, db.url, limit)


# Leading underscores: Streamlit does not hash those arguments; the URL is the key.

@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _board_stats(_db: Database, url: str) -> dict[str, Any]:
    return queries.board_stats(_db)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _tasks(_db: Database, url: str, include_archived: bool) -> list[dict[str, Any]]:
    return queries.list_tasks(_db, include_archived=include_archived)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _runs(_db: Database, url: str, active_only: bool, limit: int) -> list[dict[str, Any]]:
    return queries.list_runs(_db, active_only=active_only, limit=limit)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _events(_db: Database, url: str, limit: int) -> list[dict[str, Any]]:
    return queries.list_events(_db, limit=limit)
