"""The Sprint review's "Where the GPU went": what the window's runs spent, by
phase, assignee and outcome, tokens per completed task over time, and the ten most
expensive tasks. A cached read through :mod:`sparkops.sprint.costs`; tables and an
altair chart from its frames; no SQL and no decisions here.

Unknown figures stay unknown: a table cell is empty ("not measured"), a tile says
so, and the tiles say how many of the window's runs were metered at all.
"""

from __future__ import annotations

import time

import altair as alt
import pandas as pd
import streamlit as st

from sparkops.config import Settings
from sparkops.meters.spend import Prices, energy_text, money_text, tokens_text
from sparkops.sprint import costs
from sparkops.sprint.costs import Costs
from sparkops.storage.db import Database
from sparkops.ui import views

#: The costs are reused this long (seconds), as the review's metrics are.
COSTS_TTL_SECONDS = 10
HOUR = 3600
#: "By" choices of the table, in words.
KEY_WORDS = {"phase": "phase", "assignee": "assignee", "outcome": "outcome (what failed runs wasted)",
             "host": "host (each host's own shims measure its runs)"}


def costs_of(board_db: Database, ops: Database, settings: Settings, phase_of: dict[str, str],
             window_hours: float) -> Costs:
    since = int(time.time() - float(window_hours) * HOUR)
    return _costs(board_db, ops, phase_of, board_db.url, ops.url, Prices.of(settings), since // 60 * 60)


@st.cache_data(ttl=COSTS_TTL_SECONDS, show_spinner=False)
def _costs(_board: Database, _ops: Database, _phase_of: dict[str, str], board_url: str, ops_url: str,
           prices: Prices, since: int) -> Costs:
    # the phases are not part of the key: they come from the review's own cached read
    return costs.compute(_board, _ops, prices, phase_of=_phase_of, since=since)


def tiles(c: Costs) -> list[tuple[str, str, str]]:
    """``(label, value, help)`` for the window's spend."""
    t, p = c.total, c.prices
    runs = f"{t.metered} of {t.runs} runs metered" + (f", {t.estimated} estimated" if t.estimated else "")
    hours = None if t.gpu_seconds is None else t.gpu_seconds / HOUR
    return [
        ("Tokens", tokens_text(t.tokens).removesuffix(" tokens"),
         f"Prompt {_num(t.prompt_tokens)}, generated {_num(t.generation_tokens)}; {runs}"),
        ("GPU energy", energy_text(t.energy_wh), f"The GPUs' energy counter over the runs; {runs}"),
        ("GPU busy", "not measured" if hours is None else f"{hours:.2f} h",
         "Utilization x time, summed over the runs"),
        ("Cost", money_text(t.cost, p.currency) if t.cost is not None else _no_price(p, "energy"),
         "Energy at usage.energy_price_per_kwh, plus what agents reported paying a hosted API"),
        ("On a hosted API", money_text(t.api_cost, p.currency) if t.api_cost is not None else _no_price(p, "api"),
         "The same tokens at usage.api_price_per_million_prompt_tokens / _generation_tokens"),
    ]


def _no_price(prices: Prices, which: str) -> str:
    if which == "energy":
        return "no price set" if not prices.per_kwh else "not measured"
    return "no price set" if not prices.has_api_price else "not measured"


def _num(value: float | None) -> str:
    return "not measured" if value is None else f"{value:,.0f}"


def spend_table(frame: pd.DataFrame, key: str, prices: Prices) -> pd.DataFrame:
    """A summed frame (:func:`sparkops.sprint.costs.by` or ``most_expensive``) for
    people: its key, the runs, then the figures with their units; empty = not measured."""
    out = pd.DataFrame({key: frame[key]} if key in frame else {})
    if "title" in frame:
        out["title"] = frame["title"]
    out["runs"] = frame["runs"].astype("int64")
    out["metered"] = frame["metered"].astype("int64")
    out["estimated"] = frame["estimated"].astype("int64")
    out["tokens"] = frame["tokens"].astype("Float64").round(0)
    out["prompt tokens"] = frame["prompt_tokens"].astype("Float64").round(0)
    out["generated tokens"] = frame["generation_tokens"].astype("Float64").round(0)
    out["energy (Wh)"] = frame["energy_wh"].astype("Float64").round(2)
    out["GPU busy (h)"] = (frame["gpu_seconds"].astype("Float64") / HOUR).round(3)
    if prices.per_kwh or frame["paid"].notna().any():
        out[f"cost ({prices.currency})"] = frame["cost"].astype("Float64").round(4)
    if prices.has_api_price:
        out[f"on a hosted API ({prices.currency})"] = frame["api_cost"].astype("Float64").round(4)
    return out


def tokens_per_task_chart(c: Costs) -> alt.Chart | None:
    """Tokens per completed task, by the day the tasks were completed; None with no figure."""
    per_day = costs.tokens_per_completed_task(c)
    if per_day.empty:
        return None
    per_day = per_day.assign(day=pd.to_datetime(per_day["bucket"], unit="s", utc=True))
    return (alt.Chart(per_day).mark_bar()
            .encode(x=alt.X("yearmonthdate(day):T", title="day completed (UTC)"),
                    y=alt.Y("tokens_per_task:Q", title="tokens per completed task"),
                    tooltip=[alt.Tooltip("yearmonthdate(day):T", title="day"), "tasks",
                             alt.Tooltip("tokens_per_task:Q", format=",.0f")])
            .properties(title="Tokens per completed task (retries included)", height=220))


def render(c: Costs) -> None:
    """The section, under the Sprint review's other numbers."""
    st.subheader("Where the GPU went")
    if not c.measured_any:
        st.info("Not measured: no run in the window was metered. Each run's shim meters it when "
                "`usage.meter` is on and the configured vLLM's /metrics or the GPUs (NVML) can be read, "
                "or when its agent reports usage (`sparkops task complete --usage-json FILE`).", icon="ℹ️")
        return
    for column, (label, value, help_) in zip(st.columns(5), tiles(c)):
        column.metric(label, value, help=help_)
    key = st.radio("Sum by", list(KEY_WORDS), format_func=KEY_WORDS.get, horizontal=True, key="review_costs_by")
    st.dataframe(spend_table(costs.by(c, key), key, c.prices), hide_index=True)
    chart = tokens_per_task_chart(c)
    if chart is not None:
        st.altair_chart(chart, width="stretch")
    else:
        st.caption("Tokens per completed task: no task completed in the window has measured tokens.")
    st.markdown("**The ten most expensive tasks** (all their runs in the window, retries included)")
    top = costs.most_expensive(c, 10)
    if top.empty:
        st.caption("No task with a measured figure in the window.")
    else:
        table = spend_table(top, "task_id", c.prices)
        table["title"] = table["title"].map(lambda t: views.md_escape(str(t))[:80])
        st.dataframe(table, hide_index=True)
    if c.total.estimated:
        st.caption(f"{c.total.estimated} run(s) ran beside others: their figures are the counters' increase "
                   "shared out by overlap, an estimate.")
