"""What the GPU and Sprint review pages read and draw: cached reads through the
library, tables and altair charts built from the DataFrames it returns, and the
export files offered as downloads. No SQL here, and no decisions the library makes.

Reads are cached with ``st.cache_data`` keyed by the database URLs (the
``Database`` arguments are not hashed: their names start with ``_``), like
:mod:`sparkops.ui.data`; :func:`forget` drops them after a button changed the data.

**NVML in tests.** The GPU page reads NVML through :func:`gpu_snapshot`, which passes
:data:`NVML` to :func:`sparkops.gpu.snapshot`: ``None`` (always, in the app) means the
real pynvml. A test sets a fake there (``tests/fake_nvml.py``)::

    monkeypatch.setattr(review_view, "NVML", FakeNvml(FakeDevice(...)))

and "Sample now" samples the same source (:func:`sample_options`).

**Downloads.** The CSV downloads are the files of the latest export in ``export.dir``
(``tasks.csv``, ``runs.csv``, ``phases.csv``), byte for byte: the columns, the
formula escape and the atomic replacement of ``docs/export.md`` come with them, and
they are read only when a download is clicked ("Export now" makes them current).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd
import streamlit as st

from sparkops import gpu, metrics, phases, review, services
from sparkops.config import ServiceSpec, Settings
from sparkops.db import Database
from sparkops.ui import views
from sparkops.ui.data import READ_TTL_SECONDS

#: The NVML module the GPU page reads; None is the real one (pynvml). Tests only.
NVML: Any = None

#: The sprint metrics and the GPU history are reused this long (seconds): they
#: cost more than a count and change slowly.
METRICS_TTL_SECONDS = 10
#: How often the slower parts of the pages (history, metrics, reports) refresh.
SLOW_REFRESH_SECONDS = 30

#: Choices of the GPU history range and the review window, in hours.
HISTORY_HOURS = (1, 6, 24, 72, 168)
DEFAULT_HISTORY_HOURS = 6
WINDOW_HOURS = (6, 24, 72, 168)
#: At most this many points per device in a GPU history chart (samples are averaged).
MAX_CHART_POINTS = 400
#: How many review reports the page offers.
REPORT_LIMIT = 10
#: The export files offered as downloads (columns: docs/export.md).
DOWNLOADS = ("tasks.csv", "runs.csv", "phases.csv")

GIB_PER_MIB = 1 / 1024
HOUR = 3600


def hours_label(hours: float) -> str:
    """``1 hour``, ``6 hours``, ``3 days``."""
    hours = float(hours)
    if hours >= 48 and hours % 24 == 0:
        return f"{hours / 24:g} days"
    return f"{hours:g} hour" + ("" if hours == 1 else "s")


def window_choices(settings: Settings) -> tuple[list[float], int]:
    """The review windows offered, shortest first, and the index of the configured
    one (``review.window_hours``), the default."""
    configured = float(settings["review.window_hours"])
    choices = sorted({float(h) for h in WINDOW_HOURS} | {configured})
    return choices, choices.index(configured)


def forget() -> None:
    """Drop the cached reads of these pages (after a button changed the data)."""
    for cached in (_gpu_snapshot, _gpu_history, _service_states, _sprint, _reports, _boundaries):
        cached.clear()


# -- GPU now ------------------------------------------------------------------------------


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


# -- GPU history ----------------------------------------------------------------------------


def gpu_history(ops: Database, host: str, hours: float) -> pd.DataFrame:
    """This host's GPU samples of the last ``hours``, averaged into at most
    :data:`MAX_CHART_POINTS` points per device: time, device, utilization (%),
    memory used and total (GiB)."""
    return _gpu_history(ops, ops.url, host, float(hours))


@st.cache_data(ttl=METRICS_TTL_SECONDS, show_spinner=False)
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


# -- vLLM ------------------------------------------------------------------------------------


def vllm_services(settings: Settings) -> list[ServiceSpec]:
    """The enabled services the watchdog checks as vLLM servers."""
    return [s for s in settings.services if s.check == "vllm" and s.enabled]


def service_states(ops: Database, host: str) -> dict[str, services.ServiceState]:
    """What the watchdog remembers about each service of ``host``."""
    return _service_states(ops, ops.url, host)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _service_states(_ops: Database, url: str, host: str) -> dict[str, services.ServiceState]:
    return services.load_states(_ops, host)


STATUS_ICON = {"up": "🟢", "down": "🔴", "restarting": "🟠", "gave_up": "⛔", "unknown": "❔"}


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


# -- the sprint --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sprint:
    """The metrics of one window and the phase summary (:func:`sparkops.phases.summary`)."""

    metrics: metrics.Metrics
    phase_rows: list[dict[str, Any]]


def sprint(board_db: Database, ops: Database, settings: Settings, window_hours: float) -> Sprint:
    """The review's metrics over ``window_hours`` with each task's phase as the
    review resolves it (the other ``review.*`` options from settings)."""
    options = metrics.options_from(settings)
    options["window_hours"] = float(window_hours)
    return _sprint(board_db, ops, board_db.url, ops.url, tuple(settings["review.phase_patterns"]),
                   tuple(sorted(options.items())))


@st.cache_data(ttl=METRICS_TTL_SECONDS, show_spinner=False)
def _sprint(_board: Database, _ops: Database, board_url: str, ops_url: str, patterns: tuple[str, ...],
            options: tuple[tuple[str, Any], ...]) -> Sprint:
    mapping = phases.resolve(_board, _ops, patterns)
    # Two independent reads of the board: side by side, as SQLite and psycopg release
    # the GIL while they work (0.3 s less on a 100,000-task board).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="phase-summary") as pool:
        summary = pool.submit(phases.summary, _board, mapping)
        computed = metrics.compute(_board, now=time.time(), phase_of={t: p.phase for t, p in mapping.items()},
                                   **dict(options))
        return Sprint(computed, summary.result())


def tiles(m: metrics.Metrics) -> list[tuple[str, str, str]]:
    """``(label, value, help)`` for the headline numbers of the window."""
    w, tp, o = m.window, m.throughput, m.outcomes
    wip_now = int(m.wip["open_runs"].iloc[-1]) if len(m.wip) else 0
    return [
        ("Completed", f"{tp.completed}", f"Tasks completed in the last {hours_label(w.hours)}"),
        ("Throughput", f"{tp.per_hour:.2f}/h", "Completions per hour over the window"),
        ("Open", f"{m.counts['open']}", "Tasks on the board neither done nor archived"),
        ("Lead time (median)", metrics.human_seconds(m.lead_time.median),
         f"Created to completed; p90 {metrics.human_seconds(m.lead_time.p90)}"),
        ("Cycle time (median)", metrics.human_seconds(m.cycle_time.median),
         f"First claim to completed; p90 {metrics.human_seconds(m.cycle_time.p90)}"),
        ("Failure rate", "n/a" if o.failure_rate is None else f"{o.failure_rate:.0%}",
         f"Of the {o.ended} runs that ended in the window"),
        ("Blocked", f"{m.blocked_count}", "Tasks waiting for a person"),
        ("Runs open now", f"{wip_now}", "Work in progress: runs started and not ended"),
    ]


def summary_markdown(m: metrics.Metrics) -> str:
    """The review's summary lines (risks apart) as a markdown list; task text escaped."""
    return "\n".join(f"- {views.md_escape(line)}" for line in m.summary_lines(risks=False))


def phase_frame(sprint_: Sprint) -> pd.DataFrame:
    """Per phase: the summary's counts, the last completion and the ETA."""
    eta = {}
    if sprint_.metrics.phases is not None:
        eta = {row["phase"]: row for row in metrics.records(sprint_.metrics.phases)}
    rows = []
    for row in sprint_.phase_rows:
        estimate = eta.get(row["phase"], {})
        rows.append({
            "phase": row["phase"], "total": row["total"], "done": row["done"], "archived": row["archived"],
            "open": row["open"], "blocked": row["blocked"], "running": row["running"],
            "last completed": views.when(row["last_completed_at"]),
            "ETA": _eta_text(row["open"], estimate.get("eta_hours"), estimate.get("eta")),
        })
    columns = ["phase", "total", "done", "archived", "open", "blocked", "running", "last completed", "ETA"]
    return pd.DataFrame(rows, columns=columns)


def _eta_text(open_: int, eta_hours: float | None, eta: str | None) -> str:
    if not open_:
        return "done"
    if eta_hours is None:
        return "no ETA (nothing completed in the window)"
    return f"in {metrics.human_seconds(eta_hours * HOUR)} ({eta})"


def blocked_frame(m: metrics.Metrics) -> pd.DataFrame:
    b = m.blocked
    return pd.DataFrame({
        "task": b["id"].astype(object), "title": b["title"].astype(object),
        "blocked for": [views.duration(s) for s in b["age_seconds"]],
        "since": b["since"].astype(object), "reason": b["reason"].fillna("").astype(object),
    })


def over_max_runs_frame(m: metrics.Metrics) -> pd.DataFrame:
    return m.stuck.over_max_runs["tasks"].rename(columns={"id": "task"})


def boundaries_frame(boundaries: Iterable[phases.Boundary]) -> pd.DataFrame:
    rows = [{"phase": b.phase, "finished": views.when(b.reached_at), "tasks": b.tasks,
             "last task": b.last_task_id or "", "promoted": ", ".join(b.promoted),
             "recorded": views.when(b.recorded_at)} for b in boundaries]
    return pd.DataFrame(rows, columns=["phase", "finished", "tasks", "last task", "promoted", "recorded"])


# -- sprint charts --------------------------------------------------------------------------------


def _with_time(frame: pd.DataFrame) -> pd.DataFrame:
    out = frame.copy()
    out["time"] = pd.to_datetime(out["start"], unit="s", utc=True)
    return out


def burnup_chart(burnup: pd.DataFrame) -> alt.Chart:
    """Done against scope at the end of each UTC day of the window."""
    long = _with_time(burnup).melt(id_vars=["time", "bucket"], value_vars=["scope", "done"],
                                   var_name="series", value_name="tasks")
    return (alt.Chart(long).mark_line(point=True)
            .encode(x=alt.X("time:T", title="day (UTC)"), y=alt.Y("tasks:Q", title="tasks"),
                    color=alt.Color("series:N", title=None, sort=["scope", "done"]),
                    tooltip=["bucket", "series", "tasks"])
            .properties(title="Burn-up: done vs scope", height=240))


def throughput_chart(frame: pd.DataFrame, per: str) -> alt.Chart:
    """Completions per hour or per day (``per``: ``hour`` | ``day``)."""
    data = _with_time(frame)
    unit = "yearmonthdatehours" if per == "hour" else "yearmonthdate"
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X(f"{unit}(time):T", title=f"{per} (UTC)"), y=alt.Y("count:Q", title="completed"),
                    tooltip=["bucket", "count"])
            .properties(title=f"Throughput per {per}", height=220))


def duration_histogram(durations: metrics.Durations, title: str) -> alt.Chart:
    """A histogram of lead or cycle times, in hours."""
    data = pd.DataFrame({"hours": durations.seconds["seconds"].astype("float64") / HOUR})
    return (alt.Chart(data).mark_bar()
            .encode(x=alt.X("hours:Q", bin=alt.Bin(maxbins=20), title="hours"),
                    y=alt.Y("count():Q", title="tasks"))
            .properties(title=title, height=200))


def wip_chart(wip: pd.DataFrame) -> alt.Chart:
    """Runs open at each hour's end, and runs active during it."""
    long = _with_time(wip).melt(id_vars=["time", "bucket"], value_vars=["open_runs", "active_runs"],
                                var_name="series", value_name="runs")
    long["series"] = long["series"].map({"open_runs": "open at the hour's end",
                                         "active_runs": "active during the hour"})
    return (alt.Chart(long).mark_line(interpolate="step-after")
            .encode(x=alt.X("time:T", title="hour (UTC)"), y=alt.Y("runs:Q", title="runs"),
                    color=alt.Color("series:N", title=None), tooltip=["bucket", "series", "runs"])
            .properties(title="Work in progress", height=220))


# -- reports and boundaries ----------------------------------------------------------------------


def reports(ops: Database) -> list[dict[str, Any]]:
    """The latest review reports, newest first: id, created_at, host, path,
    narrative (its status) and markdown."""
    return _reports(ops, ops.url, REPORT_LIMIT)


@st.cache_data(ttl=READ_TTL_SECONDS, show_spinner=False)
def _reports(_ops: Database, url: str, limit: int) -> list[dict[str, Any]]:
    keep = ("id", "created_at", "host", "path", "narrative", "markdown")
    return [{k: r.get(k) for k in keep} for r in review.latest(_ops, limit=limit)]


def report_label(report: dict[str, Any]) -> str:
    return f"#{report['id']} · {views.when(report['created_at'])} · narrative: {report['narrative']}"


def boundaries(ops: Database) -> list[phases.Boundary]:
    """Every recorded phase boundary, by when it was reached."""
    return _boundaries(ops, ops.url)


@st.cache_data(ttl=METRICS_TTL_SECONDS, show_spinner=False)
def _boundaries(_ops: Database, url: str) -> list[phases.Boundary]:
    return phases.recorded(_ops)


# -- downloads ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportFile:
    name: str
    path: Path
    size: int
    modified: float


def export_files(settings: Settings) -> list[ExportFile]:
    """The export's CSV files that exist now in ``export.dir`` (of :data:`DOWNLOADS`)."""
    directory = Path(settings["export.dir"])
    found = []
    for name in DOWNLOADS:
        path = directory / name
        try:
            stat = path.stat()
        except OSError:
            continue
        found.append(ExportFile(name, path, stat.st_size, stat.st_mtime))
    return found


def file_bytes(path: Path) -> Callable[[], bytes]:
    """What a download button calls when it is clicked: the file's bytes then."""
    return functools.partial(Path.read_bytes, Path(path))


def size_text(size: int) -> str:
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
