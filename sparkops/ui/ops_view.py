"""What the operations pages read and how they lay it out: Home's health at a
glance, Jobs, Playbook, Events and alerts.

Two kinds of functions, so the pages stay thin and hold no SQL and no clock:

* **cached reads** (``st.cache_data`` for :data:`~sparkops.ui.data.READ_TTL_SECONDS`,
  keyed by the database URLs, like :mod:`sparkops.ui.data`): the job runs and
  the runners' heartbeats (``ops_job_runs``, ``ops_hosts``, read here through
  SQLAlchemy Core because the library has no reader for them), and thin wrappers
  over the library's own readers (services, alerts, audit, events, phases, the
  latest review, the playbook's diagnoses, the GPU and the disks);
* **pure helpers** that take ``now`` and turn those rows into what a page shows:
  the runner's state, the next run of a job, the list of red items, tables,
  filters and CSV downloads (cells escaped as :mod:`sparkops.export` does).
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import streamlit as st
from sqlalchemy import desc, func, select

from sparkops import (actions, alerts, board, disk, export, fleet, gpu, jobs, phases, playbook, queries, remote,
                      remote_gpu, services)
from sparkops.clock import epoch
from sparkops.db import Database
from sparkops.procs import host_name
from sparkops.runner import HOST_HEARTBEAT_SECONDS
from sparkops.schema import ops_hosts, ops_job_runs
from sparkops.ui import data
from sparkops.ui.views import duration, when

TTL = data.READ_TTL_SECONDS

#: A runner whose heartbeat is older than this is down (three missed beats).
RUNNER_STALE_SECONDS = 3 * HOST_HEARTBEAT_SECONDS
#: Service states that make Home red, and those shown in amber.
RED_SERVICE_STATES = frozenset({"down", "gave_up"})
AMBER_SERVICE_STATES = frozenset({"restarting", "unknown"})
SERVICE_ICON = {"up": "🟢", "down": "🔴", "gave_up": "🔴", "restarting": "🟠", "unknown": "⚪"}

#: The "since" filter of the Events page: label -> seconds back (None: everything).
SINCE_CHOICES: dict[str, int | None] = {
    "last hour": 3600, "last 6 hours": 6 * 3600, "last 24 hours": 86400,
    "last 7 days": 7 * 86400, "last 30 days": 30 * 86400, "all time": None,
}
JOB_OUTCOMES = ("ok", "error", "skipped")
ALERT_OUTCOMES = tuple(o.value for o in alerts.Outcome)
ALERT_LEVELS = tuple(lv.value for lv in alerts.Level)
AUDIT_RESULTS = ("ok", "refused", "error")
#: Event kinds the board writes (Hermes writes the same ones); more are added
#: from the data as they appear.
EVENT_KINDS = ("created", "linked", "claimed", "commented", "completed", "blocked", "unblocked",
               "promoted", "promoted_manual", "reprioritized", "archived", "reclaimed", "crashed",
               "timed_out", "spawn_failed", "protocol_violation", "rate_limited", "gave_up")
OUTCOME_ICON = {"ok": "✅", "error": "🛑", "skipped": "⏭️"}


def now() -> int:
    """The current time for pages, which do not read the clock themselves."""
    return epoch()


def this_host(settings: Any) -> str:
    """This host's name, as the runner and the jobs record it."""
    return host_name(settings["host.name"])


def clear_after_action() -> None:
    """An action changed something: drop every cached read so the next look is fresh."""
    st.cache_data.clear()


# -- cached reads ----------------------------------------------------------------------------
# Leading underscores: Streamlit does not hash those arguments; the URLs are the key.


def hosts(ops: Database) -> list[dict[str, Any]]:
    """Every runner's row of ``ops_hosts`` (``info`` decoded), by host."""
    return _hosts(ops, ops.url)


@st.cache_data(ttl=TTL, show_spinner=False)
def _hosts(_ops: Database, url: str) -> list[dict[str, Any]]:
    with _ops.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(select(ops_hosts).order_by(ops_hosts.c.host))]
    for row in rows:
        row["info"] = _json(row.get("info"))
    return rows


def job_runs(ops: Database, *, jobs_: Sequence[str] = (), outcomes: Sequence[str] = (),
             host: str | None = None, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    """Recorded job runs (``ops_job_runs``), newest first."""
    return _job_runs(ops, ops.url, tuple(jobs_), tuple(outcomes), host, since, limit)


@st.cache_data(ttl=TTL, show_spinner=False)
def _job_runs(_ops: Database, url: str, jobs_: tuple[str, ...], outcomes: tuple[str, ...],
              host: str | None, since: int | None, limit: int) -> list[dict[str, Any]]:
    query = select(ops_job_runs)
    if jobs_:
        query = query.where(ops_job_runs.c.job.in_(jobs_))
    if outcomes:
        query = query.where(ops_job_runs.c.outcome.in_(outcomes))
    if host is not None:
        query = query.where(ops_job_runs.c.host == host)
    if since is not None:
        query = query.where(ops_job_runs.c.started_at >= since)
    query = query.order_by(desc(ops_job_runs.c.id)).limit(limit)
    with _ops.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


def last_job_runs(ops: Database, host: str) -> dict[str, dict[str, Any]]:
    """The latest recorded run of each job on ``host``: job -> row."""
    return _last_job_runs(ops, ops.url, host)


@st.cache_data(ttl=TTL, show_spinner=False)
def _last_job_runs(_ops: Database, url: str, host: str) -> dict[str, dict[str, Any]]:
    latest = (select(func.max(ops_job_runs.c.id).label("id"))
              .where(ops_job_runs.c.host == host).group_by(ops_job_runs.c.job).subquery())
    query = select(ops_job_runs).join(latest, ops_job_runs.c.id == latest.c.id)
    with _ops.read() as conn:
        return {r.job: dict(r._mapping) for r in conn.execute(query)}


def service_states(ops: Database, host: str) -> dict[str, services.ServiceState]:
    return _service_states(ops, ops.url, host)


@st.cache_data(ttl=TTL, show_spinner=False)
def _service_states(_ops: Database, url: str, host: str) -> dict[str, services.ServiceState]:
    return services.load_states(_ops, host)


def open_runs_on(board_db: Database, host: str) -> int:
    return _open_runs_on(board_db, board_db.url, host)


@st.cache_data(ttl=TTL, show_spinner=False)
def _open_runs_on(_board: Database, url: str, host: str) -> int:
    return board.count_open_runs(_board, host)


def recent_alerts(ops: Database, *, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    return _alerts(ops, ops.url, since, limit)


@st.cache_data(ttl=TTL, show_spinner=False)
def _alerts(_ops: Database, url: str, since: int | None, limit: int) -> list[dict[str, Any]]:
    return alerts.recent(_ops, since=since, limit=limit)


def audit(ops: Database, *, since: int | None = None, limit: int = 500) -> list[dict[str, Any]]:
    return _audit(ops, ops.url, since, limit)


@st.cache_data(ttl=TTL, show_spinner=False)
def _audit(_ops: Database, url: str, since: int | None, limit: int) -> list[dict[str, Any]]:
    return actions.audit_log(_ops, since=since, limit=limit)


def task_events(board_db: Database, *, kinds: Sequence[str] = (), since: int | None = None,
                limit: int = 500) -> list[dict[str, Any]]:
    return _task_events(board_db, board_db.url, tuple(kinds), since, limit)


@st.cache_data(ttl=TTL, show_spinner=False)
def _task_events(_board: Database, url: str, kinds: tuple[str, ...], since: int | None,
                 limit: int) -> list[dict[str, Any]]:
    return queries.list_events(_board, kinds=kinds or None, since=since, limit=limit)


def boundaries(ops: Database) -> list[phases.Boundary]:
    """Recorded phase boundaries, newest first."""
    return _boundaries(ops, ops.url)


@st.cache_data(ttl=TTL, show_spinner=False)
def _boundaries(_ops: Database, url: str) -> list[phases.Boundary]:
    return list(reversed(phases.recorded(_ops)))


def review_metrics(ops: Database) -> dict[str, Any] | None:
    """The newest review's metrics (with its stuck signals), if any."""
    return _review_metrics(ops, ops.url)


@st.cache_data(ttl=TTL, show_spinner=False)
def _review_metrics(_ops: Database, url: str) -> dict[str, Any] | None:
    return export.latest_review_metrics(_ops)


def gpu_snapshot() -> gpu.GpuSnapshot:
    """This machine's GPUs (never raises: no NVML gives ``available`` False)."""
    return _gpu_snapshot()


@st.cache_data(ttl=TTL, show_spinner=False)
def _gpu_snapshot() -> gpu.GpuSnapshot:
    return gpu.snapshot()


def disk_usage(paths: Iterable[Any]) -> list[disk.DiskUsage]:
    return _disk_usage(tuple(str(p) for p in paths))


@st.cache_data(ttl=TTL, show_spinner=False)
def _disk_usage(paths: tuple[str, ...]) -> list[disk.DiskUsage]:
    return disk.usage(paths)


def diagnoses(ctx: data.AppContext) -> list[playbook.Diagnosis]:
    """The playbook's live diagnoses (a dry run: nothing is changed)."""
    settings = ctx.settings
    return _diagnoses(ctx, settings["storage.board_url"], settings["storage.ops_url"])


@st.cache_data(ttl=TTL, show_spinner=False)
def _diagnoses(_ctx: data.AppContext, board_url: str, ops_url: str) -> list[playbook.Diagnosis]:
    return playbook.diagnose(data.job_context(_ctx))


# -- the runner --------------------------------------------------------------------------------


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
    """This host's runner: alive while it heartbeats (at most ``stale_after`` seconds
    old) and has not recorded a stop."""
    row = next((r for r in rows if r["host"] == host), None)
    if row is None:
        return RunnerStatus(host, "never started")
    info = row.get("info") if isinstance(row.get("info"), dict) else _json(row.get("info"))
    age = max(0, now - int(row["heartbeat_at"]))
    if row.get("stopped_at") is not None:
        state = "stopped"
    elif age > stale_after:
        state = "down"
    else:
        state = "alive"
    return RunnerStatus(
        host=host, state=state, pid=row.get("pid"), started_at=row.get("started_at"),
        heartbeat_at=row.get("heartbeat_at"), stopped_at=row.get("stopped_at"), heartbeat_age=age,
        version=row.get("version"), capacity=row.get("capacity"), mode=(info or {}).get("mode"),
        intervals={k: float(v) for k, v in ((info or {}).get("jobs") or {}).items()})


def hosts_frame(rows: Iterable[Mapping[str, Any]], now: int) -> pd.DataFrame:
    """Every runner of the fleet (one per host) with its state."""
    out = []
    for row in rows:
        status = runner_status([row], row["host"], now)
        out.append({"host": row["host"], "state": status.state, "pid": row.get("pid"),
                    "started": when(row.get("started_at")),
                    "last heartbeat": f"{duration(status.heartbeat_age)} ago",
                    "capacity": row.get("capacity"), "version": row.get("version") or ""})
    return pd.DataFrame(out, columns=["host", "state", "pid", "started", "last heartbeat", "capacity",
                                      "version"])


def fleet_hosts(ctx: data.AppContext) -> list[fleet.Host]:
    """The fleet's hosts with their state and open runs (:func:`sparkops.fleet.hosts`)."""
    return _fleet_hosts(ctx.store.ops, ctx.store.board, ctx.store.ops.url, ctx.store.board.url,
                        int(ctx.settings["reclaim.heartbeat_timeout_seconds"]))


@st.cache_data(ttl=TTL, show_spinner=False)
def _fleet_hosts(_ops: Database, _board: Database, ops_url: str, board_url: str,
                 timeout: int) -> list[fleet.Host]:
    return fleet.hosts(_ops, _board, timeout_seconds=timeout)


STATE_MARK = {"up": "🟢 up", "down": "🔴 down", "stopped": "⚪ stopped"}


def fleet_frame(found: Iterable[fleet.Host]) -> pd.DataFrame:
    """One row per host: state, runs against capacity, heartbeat, GPUs, labels."""
    out = []
    for h in found:
        devices = h.gpu.get("devices") or []
        gpus = ", ".join(f"{d.get('name') or '?'}" + (" (unified)" if d.get("unified") else "") for d in devices)
        out.append({"host": h.host, "state": STATE_MARK.get(h.state, h.state),
                    "runs": f"{h.open_runs}/{h.capacity if h.capacity is not None else '?'}",
                    "last heartbeat": f"{duration(h.heartbeat_age)} ago", "version": h.version or "",
                    "GPUs": gpus or (h.gpu.get("reason") or "none"), "labels": " ".join(h.labels)})
    return pd.DataFrame(out, columns=["host", "state", "runs", "last heartbeat", "version", "GPUs", "labels"])


# -- jobs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobLine:
    """One job on the Jobs page."""

    name: str
    help: str
    interval: float
    last: dict[str, Any] | None
    next_at: int | None
    next_text: str

    @property
    def last_text(self) -> str:
        if self.last is None:
            return "never recorded"
        run = self.last
        took = run["duration_ms"] / 1000
        return (f"{OUTCOME_ICON.get(run['outcome'], '')} {run['outcome']} at {when(run['started_at'])} "
                f"({took:.2f}s, {run['trigger']})").strip()


def next_run(last_start: int | None, interval: float, runner: RunnerStatus, now: int) -> int | None:
    """When the runner should next run a job: the first ``base + k * interval``
    after ``now``, ``base`` being the later of the job's last recorded start and the
    runner's start (idle ticks are not recorded). None when the runner is not alive."""
    if not runner.alive or interval <= 0:
        return None
    starts = [int(x) for x in (last_start, runner.started_at) if x is not None]
    base = max(starts) if starts else now
    steps = math.floor((now - base) / interval) + 1 if now >= base else 1
    return math.ceil(base + steps * interval)


def job_lines(specs: Mapping[str, jobs.JobSpec], settings: Any, last: Mapping[str, dict[str, Any]],
              runner: RunnerStatus, now: int) -> list[JobLine]:
    """Every job with its interval (from the settings), its last recorded run and
    an estimate of its next run."""
    lines = []
    for name, spec in specs.items():
        interval = spec.interval(settings)
        scheduled = runner.intervals.get(name, interval)
        run = last.get(name)
        at = next_run(run["started_at"] if run else None, scheduled, runner, now)
        if at is None:
            text = f"not scheduled: the runner is {runner.state}"
        else:
            text = f"~{when(at)} (in {duration(at - now)})"
        if runner.alive and name in runner.intervals and scheduled != interval:
            text += f"; the runner uses every {scheduled:g}s (restart it to apply {interval:g}s)"
        lines.append(JobLine(name, spec.help, interval, run, at, text))
    return lines


# -- health at a glance --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServiceLine:
    name: str
    check: str
    status: str
    since: int | None
    detail: str

    @property
    def icon(self) -> str:
        return SERVICE_ICON.get(self.status, "⚪")


@dataclass(frozen=True)
class Health:
    """Everything Home's "health at a glance" shows; :meth:`red` lists what is wrong."""

    now: int
    host: str
    services: list[ServiceLine]
    runner: RunnerStatus
    capacity_used: int
    capacity_total: int
    gpu_available: bool
    gpu_summary: str
    zombies: list[str]
    disks: list[disk.DiskUsage]
    disk_threshold: float
    stuck: list[str]
    review_at: int | None
    review_fresh: bool
    remotes: list["RemoteLine"] = field(default_factory=list)

    def red(self) -> list[str]:
        """One line per red item: a service down, the runner down, GPU zombies, a
        disk above the threshold, a stuck signal from a recent review."""
        lines = [f"service {s.name} is {s.status.replace('_', ' ')}: {s.detail}".rstrip(": ")
                 for s in self.services if s.status in RED_SERVICE_STATES]
        if self.runner.problem:
            lines.append(self.runner.problem)
        lines += [f"GPU zombie: {z}" for z in self.zombies]
        lines += [f"disk {u.path} is {u.percent:.0f}% full (disk.threshold_percent = {self.disk_threshold:g})"
                  for u in self.disks if u.error is None and u.percent > self.disk_threshold]
        if self.review_fresh:
            lines += self.stuck
        lines += [f"{r.what} is {r.status}: {r.detail}" for r in self.remotes if r.red]
        return lines


def health(ctx: data.AppContext, *, at: int | None = None) -> Health:
    """Read everything Home shows about this host (cached reads) and put it together."""
    settings, store = ctx.settings, ctx.store
    ts = epoch(at)
    host = this_host(settings)
    states = service_states(store.ops, host)
    snapshot = gpu_snapshot()
    return assemble_health(
        now=ts, host=host, specs=settings.services, states=states,
        runner=runner_status(hosts(store.ops), host, ts),
        capacity_used=open_runs_on(store.board, host), capacity_total=settings["dispatch.max_in_progress"],
        snapshot=snapshot, zombies=_zombies(snapshot, settings, states),
        disks=disk_usage(settings["disk.paths"]), disk_threshold=settings["disk.threshold_percent"],
        review=review_metrics(store.ops), review_interval=settings["review.interval_seconds"],
        remotes=remote_lines(settings, remote_states(store.ops, host)))


def _zombies(snapshot: gpu.GpuSnapshot, settings: Any,
             states: Mapping[str, services.ServiceState]) -> list[gpu.Zombie]:
    """The zombie rule as the watchdog applies it (the vLLM service's health)."""
    if not snapshot.available or not snapshot.processes:
        return []
    spec = next((s for s in settings.services if s.check == "vllm" and s.enabled), None)
    state = states.get(spec.name) if spec else None
    return gpu.find_zombies(snapshot, settings, serving_healthy=state is None or state.status == "up",
                            health_failures=int(state.memory.get("health_failures", 0)) if state else 0)


def assemble_health(*, now: int, host: str, specs: Iterable[Any], states: Mapping[str, services.ServiceState],
                    runner: RunnerStatus, capacity_used: int, capacity_total: int,
                    snapshot: gpu.GpuSnapshot, zombies: Iterable[gpu.Zombie], disks: list[disk.DiskUsage],
                    disk_threshold: float, review: Mapping[str, Any] | None,
                    review_interval: float, remotes: Sequence["RemoteLine"] = ()) -> Health:
    """The pure half of :func:`health`."""
    lines = []
    for spec in specs:
        if not spec.enabled:
            continue
        state = states.get(spec.name)
        lines.append(ServiceLine(spec.name, spec.check, state.status if state else "unknown",
                                 state.since if state else None,
                                 state.detail if state else "not checked yet (the watchdog checks it)"))
    review_at = int(review["now"]) if review and review.get("now") is not None else None
    fresh = review_at is not None and now - review_at <= 3 * review_interval + 60
    return Health(
        now=now, host=host, services=lines, runner=runner, capacity_used=capacity_used,
        capacity_total=capacity_total, gpu_available=snapshot.available, gpu_summary=gpu_summary(snapshot),
        zombies=gpu.explain(zombies), disks=list(disks), disk_threshold=disk_threshold,
        stuck=stuck_lines((review or {}).get("stuck")), review_at=review_at, review_fresh=fresh,
        remotes=list(remotes))


# -- remote hosts (issue 8) -------------------------------------------------------------

REMOTE_ICON = {"up": "🟢", "ok": "🟢", "down": "🔴", "error": "🔴"}


@dataclass(frozen=True)
class RemoteLine:
    """One remote role configured on this host (the tunnel, the push, a GPU host) and
    its last recorded state."""

    kind: str  # tunnel | push | gpu
    remote: str
    status: str  # up | down | ok | error | not run yet
    since: int | None
    checked_at: int | None
    detail: str

    @property
    def what(self) -> str:
        return {"tunnel": f"the tunnel to {self.remote}", "push": f"the push to {self.remote}",
                "gpu": f"the GPUs of {self.remote}"}.get(self.kind, f"{self.kind} {self.remote}")

    @property
    def icon(self) -> str:
        return REMOTE_ICON.get(self.status, "⚪")

    @property
    def red(self) -> bool:
        return self.status in ("down", "error") and self.kind in ("tunnel", "push")


def remote_states(ops: Database, host: str) -> list[remote.RemoteState]:
    return _remote_states(ops, ops.url, host)


@st.cache_data(ttl=TTL, show_spinner=False)
def _remote_states(_ops: Database, url: str, host: str) -> list[remote.RemoteState]:
    return remote.states(_ops, host)


def remote_lines(settings: Any, states: Iterable[remote.RemoteState]) -> list[RemoteLine]:
    """The remote roles the settings configure, each with its recorded state (or
    "not run yet"); roles no longer configured are left out."""
    by_key = {(s.kind, s.remote): s for s in states}
    wanted = ([("tunnel", settings["remote.tunnel_host"])] if settings["remote.tunnel_host"] else []) \
        + ([("push", settings["remote.push_host"])] if settings["remote.push_host"] else []) \
        + [("gpu", name) for name in settings["remote.gpu_hosts"]]
    lines = []
    for kind, name in wanted:
        state = by_key.get((kind, name))
        lines.append(RemoteLine(kind, name, state.status if state else "not run yet",
                                state.since if state else None, state.checked_at if state else None,
                                state.detail if state else "the runner has not run this job yet"))
    return lines


def remote_frame(lines: Iterable[RemoteLine], now: int) -> pd.DataFrame:
    return pd.DataFrame([{
        "": line.icon, "role": line.kind, "host": line.remote, "state": line.status,
        "since": duration(now - line.since) + " ago" if line.since else "-",
        "checked": duration(now - line.checked_at) + " ago" if line.checked_at else "-",
        "detail": line.detail} for line in lines],
        columns=["", "role", "host", "state", "since", "checked", "detail"])


def remote_gpus(ctx: data.AppContext) -> dict[str, tuple[remote.RemoteState, gpu.GpuSnapshot | None]]:
    """The remote GPU hosts' last snapshots (the remote-gpu job's), by host."""
    return _remote_gpus(ctx.store.ops, ctx.store.ops.url, this_host(ctx.settings))


@st.cache_data(ttl=TTL, show_spinner=False)
def _remote_gpus(_ops: Database, url: str, host: str) -> dict[str, tuple[remote.RemoteState, gpu.GpuSnapshot | None]]:
    return remote_gpu.snapshots(_ops, host)


def gpu_summary(snapshot: gpu.GpuSnapshot) -> str:
    """One line: devices, utilization, memory, processes; or why there is no GPU data."""
    if not snapshot.available:
        return f"no NVML: {snapshot.reason}"
    parts = []
    for device in snapshot.devices:
        text = f"GPU {device.index}"
        if device.utilization_pct is not None:
            text += f" {device.utilization_pct:.0f}% busy"
        if device.memory_used_mb is not None and device.memory_total_mb:
            text += f", {device.memory_used_mb / 1024:.0f}/{device.memory_total_mb / 1024:.0f} GiB"
            if device.unified:
                text += " (unified memory)"
        if device.temperature_c is not None:
            text += f", {device.temperature_c:.0f}°C"
        parts.append(text)
    parts.append(f"{len(snapshot.processes)} process(es)")
    return "; ".join(parts) if snapshot.devices else "no GPU device found"


def stuck_lines(stuck: Mapping[str, Any] | None) -> list[str]:
    """The review's stuck signals (``Metrics.as_dict()['stuck']``) in words."""
    if not stuck:
        return []
    lines = []
    ready = stuck.get("ready_idle") or {}
    if ready.get("active"):
        idle = ready.get("idle_seconds")
        lines.append(f"stuck: {ready.get('ready_tasks')} ready task(s) but "
                     + ("no run ever started" if idle is None else f"no run started for {duration(idle)}"))
    over = stuck.get("over_max_runs") or {}
    if over.get("active"):
        tasks = ", ".join(f"{t.get('id')} ({t.get('runs')})" for t in (over.get("tasks") or [])[:5])
        lines.append(f"stuck: {over.get('count')} open task(s) ran more than {over.get('max_reruns')} "
                     f"times" + (f": {tasks}" if tasks else ""))
    none_done = stuck.get("no_completion") or {}
    if none_done.get("active"):
        lines.append(f"stuck: open work but no task completed for {duration(none_done.get('idle_seconds'))}")
    return lines


# -- tables ---------------------------------------------------------------------------------------


def alerts_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["time", "level", "key", "title", "message", "outcome", "channels", "host"]
    out = [{"time": when(r["created_at"]), "level": r["level"], "key": r["key"], "title": r["title"],
            "message": r.get("message") or "", "outcome": r["outcome"],
            "channels": _channels(r.get("channels")), "host": r["host"]} for r in rows]
    return pd.DataFrame(out, columns=columns)


def job_runs_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["started", "job", "trigger", "outcome", "duration s", "summary", "error", "host", "pid"]
    out = [{"started": when(r["started_at"]), "job": r["job"], "trigger": r["trigger"],
            "outcome": r["outcome"], "duration s": round(r["duration_ms"] / 1000, 3),
            "summary": r.get("summary") or "", "error": r.get("error") or "", "host": r["host"],
            "pid": r["pid"]} for r in rows]
    return pd.DataFrame(out, columns=columns)


def audit_frame(rows: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    columns = ["time", "who", "action", "target", "result", "message", "params"]
    out = [{"time": when(r["created_at"]), "who": r["actor"], "action": r["action"],
            "target": r.get("target") or "", "result": r["result"], "message": r.get("message") or "",
            "params": r.get("params") or ""} for r in rows]
    return pd.DataFrame(out, columns=columns)


def boundaries_frame(items: Iterable[phases.Boundary]) -> pd.DataFrame:
    out = [{"phase": b.phase, "finished": when(b.reached_at), "tasks": b.tasks,
            "last task": b.last_task_id or "", "promoted": ", ".join(b.promoted)} for b in items]
    return pd.DataFrame(out, columns=["phase", "finished", "tasks", "last task", "promoted"])


def filter_text(frame: pd.DataFrame, text: str) -> pd.DataFrame:
    """Rows with ``text`` (any case) in any column."""
    needle = (text or "").strip().lower()
    if not needle or frame.empty:
        return frame
    hay = frame.astype(str).apply(lambda col: col.str.lower().str.contains(needle, regex=False))
    return frame[hay.any(axis=1)]


def filter_in(frame: pd.DataFrame, column: str, allowed: Sequence[str]) -> pd.DataFrame:
    """Rows whose ``column`` is one of ``allowed`` (all rows when nothing is chosen)."""
    if not allowed or frame.empty:
        return frame
    return frame[frame[column].isin(list(allowed))]


def since_epoch(label: str, *, at: int | None = None) -> int | None:
    """The start of a :data:`SINCE_CHOICES` period (to the minute, so that the cached
    reads keyed by it are shared for a minute), or None for all time."""
    seconds = SINCE_CHOICES.get(label)
    return None if seconds is None else (epoch(at) - seconds) // 60 * 60


def options(known: Iterable[str], present: Iterable[str], chosen: Iterable[str] = ()) -> list[str]:
    """Choices for a filter: the known values, those in the data, and those already
    chosen (so a choice never disappears from under the operator)."""
    return sorted(set(known) | {p for p in present if p} | set(chosen or ()))


def csv_bytes(frame: pd.DataFrame) -> bytes:
    """``frame`` as UTF-8 CSV for a download, every text cell that a spreadsheet would
    run as a formula prefixed with ``'`` (:func:`sparkops.export.escape_cell`)."""
    safe = frame.copy()
    for column in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[column]):
            safe[column] = safe[column].map(export.escape_cell)
    buffer = io.StringIO()
    safe.to_csv(buffer, index=False)
    return buffer.getvalue().encode("utf-8")


def happening_badge(happening: bool | None) -> str:
    """Markdown for a diagnosis' "happening now": yes in red, no in green, n.a. in grey."""
    if happening is None:
        return ":gray-badge[Happening now: n.a. on this host]"
    return ":red-badge[Happening now: yes]" if happening else ":green-badge[Happening now: no]"


# -- small helpers -----------------------------------------------------------------------------


def _json(value: Any) -> Any:
    if isinstance(value, str) and value:
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def _channels(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v}" for k, v in sorted(value.items()) if v != "off")
    return str(value or "")
