"""What the Fleet page shows: every host's runner, its state by the one rule of
:mod:`sparkops.jobs.hosts`, runs against capacity, GPUs and labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd

from sparkops.jobs import hosts as fleet
from sparkops.ui import data
from sparkops.ui.views import duration, when

TTL = data.READ_TTL_SECONDS


def hosts_frame(rows: Iterable[Mapping[str, Any]], now: int) -> pd.DataFrame:
    """Every runner of the fleet (one per host) with its state."""
    out = []
    for row in rows:
        status = data.runner_status([row], row["host"], now)
        out.append({"host": row["host"], "state": status.state, "pid": row.get("pid"),
                    "started": when(row.get("started_at")),
                    "last heartbeat": f"{duration(status.heartbeat_age)} ago",
                    "capacity": row.get("capacity"), "version": row.get("version") or ""})
    return pd.DataFrame(out, columns=["host", "state", "pid", "started", "last heartbeat", "capacity",
                                      "version"])


@data.cached()
def fleet_hosts(ctx: data.AppContext) -> list[fleet.Host]:
    """The fleet's hosts with their state and open runs (:func:`sparkops.jobs.hosts.hosts`)."""
    return fleet.hosts(ctx.store.ops, ctx.store.board)


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
