"""What Home shows: health at a glance (services, the runner, the GPU, disks, the sprint),
what is red, what waits on a person, and what was not checked yet.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from sparkops.board import runs
from sparkops.core import formatting
from sparkops.core.clock import epoch
from sparkops.meters import gpu
from sparkops.sprint import export
from sparkops.storage.db import Database
from sparkops.ui import data, jobs_view
from sparkops.ui.views import duration
from sparkops.watch import disk, services, zombie_rule

TTL = data.READ_TTL_SECONDS


#: Service states that make Home red, and those shown in amber.
RED_SERVICE_STATES = frozenset({"down", "gave_up"})


SERVICE_ICON = {"up": "🟢", "down": "🔴", "gave_up": "🔴", "restarting": "🟠", "unknown": "⏳",
                services.NOT_CONFIGURED: "➖"}


@data.cached(TTL)
def open_runs_on(board_db: Database, host: str) -> int:
    return runs.count_open_runs(board_db, host)


@data.cached(TTL)
def review_metrics(ops: Database) -> dict[str, Any] | None:
    """The newest review's metrics (with its stuck signals), if any."""
    return export.latest_review_metrics(ops)


def disk_usage(paths: Iterable[Any]) -> list[disk.DiskUsage]:
    return _disk_usage(tuple(str(p) for p in paths))


@st.cache_data(ttl=TTL, show_spinner=False)
def _disk_usage(paths: tuple[str, ...]) -> list[disk.DiskUsage]:
    return disk.usage(paths)


@dataclass(frozen=True)
class ServiceLine:
    name: str
    check: str
    status: str
    since: int | None
    detail: str
    hint: str = ""  # the line of sparkops.toml that turns it on or off

    @property
    def icon(self) -> str:
        return SERVICE_ICON.get(self.status, "⚪")

    @property
    def words(self) -> str:
        return services.status_words(self.status)


@dataclass(frozen=True)
class Health:
    """Everything Home's "health at a glance" shows; :meth:`red` lists what is wrong."""

    now: int
    host: str
    services: list[ServiceLine]
    runner: data.RunnerStatus
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
    remotes: list[jobs_view.RemoteLine] = field(default_factory=list)
    #: tasks waiting on a person (amber: nothing is broken, someone has to answer)
    waiting: list[str] = field(default_factory=list)

    def red(self) -> list[str]:
        """One line per red item: a service down, the runner down, GPU zombies, a
        disk above the threshold, a stuck signal from a recent review."""
        lines = [f"service {s.name} is {services.status_words(s.status)}: {s.detail}".rstrip(": ")
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

    def unchecked(self) -> list[str]:
        """What has not been checked yet, so that nothing may be called green: a
        service the watchdog has not looked at, a remote role not run yet, a sprint
        without a review (or whose review is too old to judge)."""
        lines = [f"service {s.name}: not checked yet (the watchdog checks it when the jobs runner "
                 "starts, then every watchdog.interval_seconds)" for s in self.services if s.status == "unknown"]
        lines += [f"{r.what}: not checked yet ({r.detail})" for r in self.remotes if r.status == "not run yet"]
        if self.review_at is None:
            lines.append("the sprint: not reviewed yet (the review job runs when the jobs runner starts)")
        elif not self.review_fresh:
            lines.append(f"the sprint: the last review is {duration(self.now - self.review_at)} old, too old "
                         "to judge stuck work (is the jobs runner up?)")
        return lines

    def not_configured(self) -> list[str]:
        """What this host does not have, each with the line that turns it on or off."""
        lines = [f"{s.name}: {s.detail}; {s.hint}" for s in self.services if s.status == services.NOT_CONFIGURED]
        if not self.gpu_available:
            lines.append(f"GPU: {self.gpu_summary}")
        return lines

    def looked_at(self) -> list[str]:
        """What a green summary covers, in words."""
        up = [s.name for s in self.services if s.status == "up"]
        seen = [f"services ({', '.join(up)})" if up else "no service to watch", "the jobs runner"]
        if self.gpu_available:
            seen.append("the GPU")
        seen += ["the disks", "the sprint"]
        seen += [r.what for r in self.remotes if not r.red and r.status != "not run yet"]
        return seen


def health(ctx: data.AppContext, *, at: int | None = None) -> Health:
    """Read everything Home shows about this host (cached reads) and put it together."""
    settings, store = ctx.settings, ctx.store
    ts = epoch(at)
    host = data.this_host(settings)
    states = data.service_states(store.ops, host)
    snapshot = data.gpu_snapshot()
    stats = data.board_stats(store.board)
    return assemble_health(
        now=ts, host=host, specs=settings.services, states=states,
        runner=data.runner_status(data.hosts(store.ops), host, ts),
        capacity_used=open_runs_on(store.board, host), capacity_total=settings["dispatch.max_in_progress"],
        snapshot=snapshot, zombies=_zombies(snapshot, settings, states),
        disks=disk_usage(settings["disk.paths"]), disk_threshold=settings["disk.threshold_percent"],
        review=review_metrics(store.ops), review_interval=settings["review.interval_seconds"],
        remotes=jobs_view.remote_lines(settings, jobs_view.remote_states(store.ops, host)),
        moved=(stats.get("latest_run_started_at"), stats.get("latest_completed_at")))


def _zombies(snapshot: gpu.GpuSnapshot, settings: Any,
             states: Mapping[str, services.ServiceState]) -> list[zombie_rule.Zombie]:
    """The zombie rule as the watchdog applies it (the vLLM service's health)."""
    if not snapshot.available or not snapshot.processes:
        return []
    spec = next((s for s in settings.services if s.check == "vllm" and s.enabled), None)
    state = states.get(spec.name) if spec else None
    return zombie_rule.find_zombies(snapshot, settings, serving_healthy=services.serving_healthy(state),
                                    health_failures=int(state.memory.get("health_failures", 0)) if state else 0)


def assemble_health(*, now: int, host: str, specs: Iterable[Any], states: Mapping[str, services.ServiceState],
                    runner: data.RunnerStatus, capacity_used: int, capacity_total: int,
                    snapshot: gpu.GpuSnapshot, zombies: Iterable[zombie_rule.Zombie], disks: list[disk.DiskUsage],
                    disk_threshold: float, review: Mapping[str, Any] | None,
                    review_interval: float, remotes: Sequence[jobs_view.RemoteLine] = (),
                    moved: tuple[int | None, int | None] = (None, None)) -> Health:
    """The pure half of :func:`health`. ``moved``: the board's latest run start and
    latest completion; a stuck signal of the review that the board has moved past
    since (a run started, a task completed) is no longer shown."""
    lines = []
    for spec in specs:
        if not spec.enabled:
            continue
        state = states.get(spec.name)
        lines.append(ServiceLine(spec.name, spec.check, state.status if state else "unknown",
                                 state.since if state else None,
                                 state.detail if state else "not checked yet (the watchdog checks it)",
                                 spec.toggle_hint()))
    review_at = int(review["now"]) if review and review.get("now") is not None else None
    fresh = review_at is not None and now - review_at <= 3 * review_interval + 60
    return Health(
        now=now, host=host, services=lines, runner=runner, capacity_used=capacity_used,
        capacity_total=capacity_total, gpu_available=snapshot.available, gpu_summary=gpu_summary(snapshot),
        zombies=zombie_rule.explain(zombies), disks=list(disks), disk_threshold=disk_threshold,
        stuck=stuck_lines(_still_stuck((review or {}).get("stuck"), review_at, moved)),
        review_at=review_at, review_fresh=fresh, remotes=list(remotes),
        waiting=waiting_lines((review or {}).get("stuck")))


def _still_stuck(stuck: Mapping[str, Any] | None, review_at: int | None,
                 moved: tuple[int | None, int | None]) -> dict[str, Any] | None:
    """The review's stuck signals less those the board has moved past since."""
    if not stuck or review_at is None:
        return stuck
    started, completed = moved
    kept = dict(stuck)
    if started is not None and started > review_at:
        kept["ready_idle"] = {**(kept.get("ready_idle") or {}), "active": False}
    if completed is not None and completed > review_at:
        kept["no_completion"] = {**(kept.get("no_completion") or {}), "active": False}
    return kept


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
        lines.append(f"stuck: {formatting.plural(ready.get('ready_tasks') or 0, 'ready task')} but "
                     + ("no run ever started" if idle is None else f"no run started for {duration(idle)}"))
    over = stuck.get("over_max_runs") or {}
    if over.get("active"):
        tasks = ", ".join(f"{t.get('id')} ({t.get('runs')})" for t in (over.get("tasks") or [])[:5])
        lines.append(f"stuck: {formatting.plural(over.get('count') or 0, 'open task')} ran more than "
                     f"{over.get('max_reruns')} "
                     f"times" + (f": {tasks}" if tasks else ""))
    none_done = stuck.get("no_completion") or {}
    if none_done.get("active"):
        lines.append(f"stuck: open work but no task completed for {duration(none_done.get('idle_seconds'))}")
    return lines


def waiting_lines(stuck: Mapping[str, Any] | None) -> list[str]:
    """The review's "waiting on a person" signal in words (amber on Home)."""
    waiting = (stuck or {}).get("waiting_on_person") or {}
    if not waiting.get("active"):
        return []
    oldest = waiting.get("oldest") or {}
    return [f"{formatting.plural(waiting.get('count') or 0, 'blocked task')} waiting on you; the oldest, "
            f"{oldest.get('id')} ({oldest.get('title')}), for {duration(oldest.get('age_seconds'))}: "
            f"{oldest.get('reason') or 'no reason given'}"]
