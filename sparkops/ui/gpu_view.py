"""What the GPU page shows: this host's devices and processes (NVML, or the demo's
simulated GB10), their history, vLLM's state and metrics, and other hosts' GPUs.

It reads this host's GPUs through :func:`sparkops.ui.data.gpu_snapshot` (where tests
put a fake NVML), like Home.
"""

from __future__ import annotations

import math
import time
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from sparkops.config import ServiceSpec, Settings
from sparkops.meters import gpu
from sparkops.net import ssh as remote
from sparkops.remote import gpu as remote_gpu
from sparkops.storage.db import Database
from sparkops.ui import data, views
from sparkops.watch import services

TTL = data.READ_TTL_SECONDS
#: The GPU history is reused this long (seconds): it costs more than a count.
HISTORY_TTL_SECONDS = 10
#: How often the history refreshes.
SLOW_REFRESH_SECONDS = 30
#: Choices of the history range, in hours, and the default.
HISTORY_HOURS = (1, 6, 24, 72, 168)
DEFAULT_HISTORY_HOURS = 6
#: At most this many points per device in a history chart (samples are averaged).
MAX_CHART_POINTS = 400
GIB_PER_MIB = 1 / 1024
HOUR = 3600
STATUS_ICON = {"up": "🟢", "down": "🔴", "restarting": "🟠", "gave_up": "⛔", "unknown": "❔"}


def forget() -> None:
    """Drop this page's cached reads (after a button changed the data)."""
    for cached in (_gpu_history, remote_gpus):
        cached.clear()
    data.forget_gpu_and_services()


@data.cached()
def remote_gpus(ctx: data.AppContext) -> dict[str, tuple[remote.RemoteState, gpu.GpuSnapshot | None]]:
    """The remote GPU hosts' last snapshots (the remote-gpu job's), by host."""
    return remote_gpu.snapshots(ctx.store.ops, data.this_host(ctx.settings))


def device_tiles(device: gpu.GpuDevice) -> list[tuple[str, str, str | None]]:
    """``(label, value, help)`` for one device: utilization, memory, temperature, power."""
    used, total = device.memory_used_mb, device.memory_total_mb
    if total:
        memory = f"{_gib(used)} of {_gib(total)} GiB" if used is not None else f"? of {_gib(total)} GiB"
    else:
        memory = f"{_gib(used)} GiB used" if used is not None else "-"
    return [
        ("Utilization", _number(device.utilization_pct, "%"), None),
        ("Unified memory" if device.unified else "Memory", memory,
         gpu.UNIFIED_NOTE if device.unified else "NVML's used and total memory of this GPU"),
        ("Temperature", _number(device.temperature_c, " °C"), None),
        ("Power", _number(device.power_w, " W"), None),
    ]


def device_title(device: gpu.GpuDevice) -> str:
    return f"GPU {device.index} · {device.name or 'unknown device'}" + (
        " · unified memory" if device.unified else "")


def processes_frame(snapshot: gpu.GpuSnapshot) -> pd.DataFrame:
    """The GPU processes, most memory first."""
    rows = sorted(snapshot.processes, key=lambda p: (-(p.used_memory_mb or 0), p.device_index, p.pid))
    return pd.DataFrame({
        "pid": pd.Series([p.pid for p in rows], dtype="int64"),
        "device": pd.Series([p.device_index for p in rows], dtype="int64"),
        "memory (GiB)": pd.Series([None if p.used_memory_mb is None else round(p.used_memory_mb / 1024, 2)
                                   for p in rows], dtype="Float64"),
        "name": pd.Series([p.name or "" for p in rows], dtype=object),
        "command line": pd.Series([p.command_line or "(gone, or not readable)" for p in rows], dtype=object),
    })


def _gib(mib: float | None) -> str:
    return "?" if mib is None else f"{mib * GIB_PER_MIB:.1f}"


def _number(value: float | None, unit: str) -> str:
    return "-" if value is None else f"{value:.0f}{unit}"


def gpu_history(ops: Database, host: str, hours: float) -> pd.DataFrame:
    """This host's GPU samples of the last ``hours``, averaged into at most
    :data:`MAX_CHART_POINTS` points per device: time, device, utilization (%),
    memory used and total (GiB)."""
    return _gpu_history(ops, ops.url, host, float(hours))


@st.cache_data(ttl=HISTORY_TTL_SECONDS, show_spinner=False)
def _gpu_history(_ops: Database, url: str, host: str, hours: float) -> pd.DataFrame:
    rows = gpu.history(_ops, since=time.time() - hours * HOUR, host=host)
    columns = ["time", "device", "utilization", "memory used", "memory total"]
    if not rows:
        return pd.DataFrame({c: pd.Series([], dtype="float64") for c in columns})
    def numbers(key: str) -> pd.Series:  # a value NVML did not give is None: NaN here
        return pd.to_numeric(pd.Series([r[key] for r in rows], dtype=object), errors="coerce")

    frame = pd.DataFrame({
        "at": [r["created_at"] for r in rows],
        "device": [f"GPU {r['device']}" + (f" {r['name']}" if r["name"] else "") for r in rows],
        "utilization": numbers("utilization_pct"),
        "memory used": numbers("memory_used_mb"),
        "memory total": numbers("memory_total_mb"),
    })
    step = max(1, math.ceil(hours * HOUR / MAX_CHART_POINTS))
    frame["at"] = frame["at"] // step * step
    frame = frame.groupby(["device", "at"], as_index=False).mean(numeric_only=True)
    for column in ("memory used", "memory total"):
        frame[column] = frame[column] * GIB_PER_MIB
    frame["time"] = pd.to_datetime(frame["at"], unit="s", utc=True)
    return frame[columns]


def utilization_chart(history: pd.DataFrame) -> alt.Chart:
    return _lines(history, "utilization", "Utilization (%)", color="device:N",
                  y_scale=alt.Scale(domain=[0, 100]))


def memory_chart(history: pd.DataFrame) -> alt.Chart:
    long = history.melt(id_vars=["time", "device"], value_vars=["memory used", "memory total"],
                        var_name="series", value_name="GiB")
    long["line"] = long["device"] + " " + long["series"].str.removeprefix("memory ")
    return _lines(long, "GiB", "Memory (GiB)", color="line:N")


def _lines(frame: pd.DataFrame, y: str, title: str, *, color: str,
           y_scale: alt.Scale | None = None) -> alt.Chart:
    y_encoding = alt.Y(f"{y}:Q", title=title, scale=y_scale if y_scale is not None else alt.Undefined)
    return (alt.Chart(frame).mark_line(point=len(frame) < 30)
            .encode(x=alt.X("time:T", title=None), y=y_encoding,
                    color=alt.Color(color, title=None), tooltip=list(frame.columns))
            .properties(title=title, height=220))


def vllm_services(settings: Settings) -> list[ServiceSpec]:
    """The enabled services the watchdog checks as vLLM servers."""
    return [s for s in settings.services if s.check == "vllm" and s.enabled]


def vllm_tiles(state: services.ServiceState) -> list[tuple[str, str]]:
    """``(label, value)``: requests running and waiting, generation tokens, health."""
    memory = state.memory
    return [
        ("Running requests", _count(memory.get("running"))),
        ("Waiting requests", _count(memory.get("waiting"))),
        ("Generation tokens", _count(memory.get("generation_tokens"))),
        ("Health", str(memory.get("health") or "-")),
    ]


def vllm_status_line(state: services.ServiceState, now: float) -> str:
    """``🟢 up since ... (2h05m); checked 12s ago``, as markdown."""
    parts = [f"{STATUS_ICON.get(state.status, '')} **{state.status.replace('_', ' ')}**"]
    if state.since:
        parts.append(f"since {views.when(state.since)} ({views.duration(now - state.since)})")
    if state.checked_at:
        parts.append(f"checked {views.duration(now - state.checked_at)} ago")
    if state.consecutive_failures:
        parts.append(f"{state.consecutive_failures} failed check(s) in a row")
    return " · ".join(parts)


def vllm_models(state: services.ServiceState) -> str:
    """The served models, or why they are not known."""
    models = state.memory.get("models")
    if models:
        return ", ".join(views.md_escape(str(m)) for m in models)
    return views.md_escape(state.memory.get("models_note") or "not known")


def _count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"
