"""What the pages share: settings, one store per process, short-lived cached reads
through the library (no SQL here), the runner's status and the page clock. Each
page's own reads and tables are in its view module (``home_view``, ``jobs_view``, ...).

The store is cached with ``st.cache_resource`` keyed by the two database URLs,
so every session of the app shares one pair of engines. Reads are cached with
``st.cache_data`` for :data:`READ_TTL_SECONDS`, so a page refreshing itself in
several browser tabs costs one query, not one per tab; :func:`cached` keys a
``Database`` by its URL. The app never creates
databases: ``sparkops init`` / ``sparkops up`` / the runner do that.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from sparkops.board import phases, queries
from sparkops.config import Secrets, Settings, load_secrets, load_settings
from sparkops.core import json_text
from sparkops.core.clock import epoch
from sparkops.core.procs import host_name
from sparkops.jobs import hosts as hosts_lib
from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu
from sparkops.storage.db import Database
from sparkops.storage.store import Store, open_store
from sparkops.ui.views import duration, when
from sparkops.watch import alerts, services

#: How long a cached read is reused (seconds).
READ_TTL_SECONDS = 2


def cached(ttl: float = READ_TTL_SECONDS):
    """``st.cache_data`` for a read through the library: keyed by the arguments, a
    ``Database`` by its URL and an ``AppContext`` by its two URLs (they are not
    hashable by value), reused for ``ttl`` seconds."""
    return st.cache_data(ttl=ttl, show_spinner=False, hash_funcs={
        Database: lambda db: db.url,
        AppContext: lambda ctx: (ctx.store.board.url, ctx.store.ops.url),
    })


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


@cached(READ_TTL_SECONDS)
def board_stats(db: Database) -> dict[str, Any]:
    """Counts per status and assignee, oldest ready age, active runs, ``now``."""
    return queries.board_stats(db)


@cached(READ_TTL_SECONDS)
def tasks(db: Database, *, include_archived: bool = False) -> list[dict[str, Any]]:
    return queries.list_tasks(db, include_archived=include_archived)


@cached()
def active_runs(db: Database, limit: int = 50) -> list[dict[str, Any]]:
    return queries.list_runs(db, active_only=True, limit=limit)


@cached(READ_TTL_SECONDS)
def recent_events(db: Database, limit: int = 30) -> list[dict[str, Any]]:
    return queries.list_events(db, limit=limit)


# Leading underscores: Streamlit does not hash those arguments; the URL passed with them is the key.


# -- shared by several pages ------------------------------------------------------------

#: The runner's heartbeat and the one rule that says it is down (:mod:`sparkops.jobs.hosts`).
HOST_HEARTBEAT_SECONDS = hosts_lib.HEARTBEAT_SECONDS
RUNNER_STALE_SECONDS = hosts_lib.STALE_SECONDS


def now() -> int:
    """The current time for pages, which do not read the clock themselves."""
    return epoch()


def this_host(settings: Any) -> str:
    """This host's name, as the runner and the jobs record it."""
    return host_name(settings["host.name"])


def clear_after_action() -> None:
    """An action changed something: drop every cached read so the next look is fresh."""
    st.cache_data.clear()


@cached(READ_TTL_SECONDS)
def hosts(ops: Database) -> list[dict[str, Any]]:
    """Every runner's row of ``ops_hosts`` (``info`` decoded), by host."""
    return hosts_lib.rows(ops)


@cached(READ_TTL_SECONDS)
def service_states(ops: Database, host: str) -> dict[str, services.ServiceState]:
    return services.load_states(ops, host)


@cached(READ_TTL_SECONDS)
def recent_alerts(ops: Database, *, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    return alerts.recent(ops, since=since, limit=limit)


@dataclass(frozen=True)
class RunnerStatus:
    """The jobs runner of one host, from its ``ops_hosts`` heartbeat."""

    host: str
    state: str  # alive | down | stopped | never started
    pid: int | None = None
    started_at: int | None = None
    heartbeat_at: int | None = None
    stopped_at: int | None = None
    heartbeat_age: int | None = None
    version: str | None = None
    capacity: int | None = None
    mode: str | None = None
    intervals: dict[str, float] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return self.state == "alive"

    @property
    def problem(self) -> str | None:
        """Why the runner is not alive, in words; None when it is."""
        if self.state == "alive":
            return None
        if self.state == "never started":
            return (f"the jobs runner has never run on {self.host}: nothing dispatches, reclaims or "
                    "watches (start it with `python -m sparkops up`)")
        if self.state == "stopped":
            return f"the jobs runner on {self.host} stopped at {when(self.stopped_at)} (pid {self.pid})"
        return (f"the jobs runner on {self.host} is down: last heartbeat {duration(self.heartbeat_age)} ago "
                f"(pid {self.pid}; it beats every {HOST_HEARTBEAT_SECONDS:g}s)")


def runner_status(rows: Iterable[Mapping[str, Any]], host: str, now: int, *,
                  stale_after: float = RUNNER_STALE_SECONDS) -> RunnerStatus:
    """This host's runner: alive while it heartbeats and has not recorded a stop
    (:func:`sparkops.jobs.hosts.state_of`)."""
    row = next((r for r in rows if r["host"] == host), None)
    if row is None:
        return RunnerStatus(host, "never started")
    info = json_text.object_of(row.get("info"))
    age = max(0, now - int(row["heartbeat_at"]))
    state = hosts_lib.state_of(row["heartbeat_at"], row.get("stopped_at"), now, stale_after=stale_after)
    if state == "up":
        state = "alive"
    return RunnerStatus(
        host=host, state=state, pid=row.get("pid"), started_at=row.get("started_at"),
        heartbeat_at=row.get("heartbeat_at"), stopped_at=row.get("stopped_at"), heartbeat_age=age,
        version=row.get("version"), capacity=row.get("capacity"), mode=info.get("mode"),
        intervals={k: float(v) for k, v in (info.get("jobs") or {}).items()})


#: The NVML module Home and the GPU page read; None is the real one (pynvml). A test
#: sets a fake here (``monkeypatch.setattr(data, "NVML", FakeNvml(...))``, see
#: ``sparkops/meters/nvml_fake.py``); "Sample now" samples the same source.
NVML: Any = None


def gpu_snapshot() -> gpu.GpuSnapshot:
    """The GPUs and their processes now (never raises; ``available`` says whether
    there is GPU data, ``reason`` why not)."""
    source = "pynvml" if NVML is None else f"injected:{id(NVML)}"
    return _gpu_snapshot(NVML, source)


def sample_options() -> dict[str, Any]:
    """Options for the ``gpu-sample`` job, so "Sample now" reads what the page shows."""
    return {} if NVML is None else {"nvml": NVML}


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _gpu_snapshot(_nvml: Any, source: str) -> gpu.GpuSnapshot:
    return gpu.snapshot(_nvml)


def forget_gpu_and_services() -> None:
    """Drop the cached GPU snapshot and service states (a button sampled or restarted)."""
    for cached in (_gpu_snapshot, service_states):
        cached.clear()


@cached()
def boundaries(ops: Database) -> list[phases.Boundary]:
    """Every recorded phase boundary, by when it was reached (Home shows the newest)."""
    return phases.recorded(ops)
