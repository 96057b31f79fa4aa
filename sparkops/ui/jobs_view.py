"""What the Jobs page shows: every job's schedule, last and next run, and the remote hosts'
state (push, tunnel, remote GPUs).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pandas as pd

from sparkops.jobs import framework as jobs
from sparkops.jobs import history
from sparkops.net import ssh as remote
from sparkops.storage.db import Database
from sparkops.ui import data
from sparkops.ui.views import duration, when

TTL = data.READ_TTL_SECONDS


OUTCOME_ICON = {"ok": "✅", "error": "🛑", "skipped": "⏭️"}


@data.cached(TTL)
def last_job_runs(ops: Database, host: str) -> dict[str, dict[str, Any]]:
    """The latest recorded run of each job on ``host``: job -> row."""
    return history.latest_per_job(ops, host)


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
        found = run.get("problems") or 0
        outcome = (f"⚠️ ran, found {found} problem{'' if found == 1 else 's'}"
                   if run["outcome"] == "ok" and found else f"{OUTCOME_ICON.get(run['outcome'], '')} {run['outcome']}")
        return f"{outcome} at {when(run['started_at'])} ({took:.2f}s, {run['trigger']})".strip()


def next_run(last_start: int | None, interval: float, runner: data.RunnerStatus, now: int) -> int | None:
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
              runner: data.RunnerStatus, now: int) -> list[JobLine]:
    """Every job with its interval (from the settings), its last recorded run and
    an estimate of its next run."""
    lines = []
    for name, spec in specs.items():
        interval = spec.interval(settings)
        scheduled = runner.intervals.get(name, interval)
        run = last.get(name)
        at = next_run(run["started_at"] if run else None, scheduled, runner, now)
        if not spec.configured(settings):
            at, text = None, f"not configured: nothing to do until {spec.needs} is set"
        elif at is None:
            text = f"not scheduled: the runner is {runner.state}"
        else:
            text = f"~{when(at)} (in {duration(at - now)})"
        if runner.alive and name in runner.intervals and scheduled != interval:
            text += f"; the runner uses every {scheduled:g}s (restart it to apply {interval:g}s)"
        lines.append(JobLine(name, spec.help, interval, run, at, text))
    return lines


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


@data.cached(TTL)
def remote_states(ops: Database, host: str) -> list[remote.RemoteState]:
    return remote.states(ops, host)


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
