"""Runs and logs: the runs in progress and the past ones, and a chosen run's log,
tailed while the run goes on.

Filters and the choice of run stay outside the self-refreshing parts, so a
refresh keeps them.
"""

import streamlit as st

from sparkops.core.clock import epoch
from sparkops.core.errors import NotFound
from sparkops.engine import runlog
from sparkops.ui import board_view as bv
from sparkops.ui import page, views

ctx = page.start("Runs")
st.title("Runs and logs")
page.security_banner(ctx)
db = ctx.store.board

LIVE_LIMIT = 500

outcome_col, task_col, limit_col = st.columns([2, 3, 1], vertical_alignment="bottom")
limit = limit_col.selectbox("Past runs", [50, 200, 1000], key="runs_limit")
task_text = task_col.text_input("Task", key="runs_task", placeholder="a task id or words in its title")

with page.guard():
    recent = bv.runs(db, limit=limit)
    live = bv.runs(db, active_only=True, limit=LIVE_LIMIT)

outcome = outcome_col.selectbox("Outcome", [bv.ANY, bv.OPEN, *bv.outcomes(recent)], key="runs_outcome")


def _titles(*runs: list[dict]) -> dict[str, str]:
    """The titles of these runs' tasks."""
    found = bv.titles(db, (r["task_id"] for some in runs for r in some))
    return {task_id: row["title"] for task_id, row in found.items()}


def _split(live_runs: list[dict], recent_runs: list[dict], filters: dict,
           titles: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """(open runs, ended runs), each filtered, newest first."""
    past = [r for r in recent_runs if r.get("ended_at") is not None]
    return (bv.filter_runs(live_runs, titles=titles, **filters),
            bv.filter_runs(past, titles=titles, **filters))


filters = {"outcome": None if outcome == bv.ANY else outcome, "task_text": task_text}


@st.fragment(run_every=page.REFRESH_SECONDS)
def tables(filters: dict, limit: int) -> None:
    with page.guard():
        live_now = bv.runs(db, active_only=True, limit=LIVE_LIMIT)
        recent_now = bv.runs(db, limit=limit)
    if not live_now and not recent_now:
        st.markdown("No run yet. Runs appear here once the dispatcher (or Hermes) claims a ready task.")
        return
    now = epoch()
    titles_now = _titles(live_now, recent_now)
    open_runs, past = _split(live_now, recent_now, filters, titles_now)
    st.subheader(f"Live runs · {len(open_runs)}")
    st.dataframe(bv.runs_frame(open_runs, now, titles_now), hide_index=True)
    st.subheader(f"Past runs · {len(past)}")
    st.dataframe(bv.runs_frame(past, now, titles_now), hide_index=True)
    st.caption(f"Past runs among the last {limit}; updated {views.when(now)}, "
               f"refreshes every {page.REFRESH_SECONDS}s.")


tables(filters, limit)
if not live and not recent:
    st.stop()

st.subheader("Log")
titles = _titles(live, recent)
open_runs, past = _split(live, recent, filters, titles)
choices = {r["id"]: r for r in [*open_runs, *past]}
pick_col, lines_col = st.columns([4, 1], vertical_alignment="bottom")
run_id = pick_col.selectbox(
    "Run", list(choices), key="runs_pick",
    format_func=lambda i: bv.run_label(choices[i], titles) if i in choices else str(i))
lines = lines_col.number_input("Lines", key="runs_lines", min_value=10, max_value=2000,
                               value=bv.LOG_TAIL_LINES, step=50)


@st.fragment(run_every=page.REFRESH_SECONDS)
def run_log(run_id: int, task_id: str, lines: int) -> None:
    """The run's facts and the last lines of its log, read again at every refresh."""
    try:
        run = next((r for r in bv.task_runs(db, task_id) if r["id"] == run_id), None)
    except NotFound:
        run = None
    if run is None:
        st.warning(f"Run {run_id} is no longer on the board.")
        return
    st.markdown(bv.run_facts(run, epoch()))
    if run.get("error"):
        st.markdown("**Error**")
        st.text(run["error"])
    elif run.get("summary"):
        st.markdown("**Summary**")
        st.text(run["summary"])
    path = runlog.run_log_path(ctx.settings, task_id, run_id)
    tail = bv.read_log_tail(path, lines=lines)
    if tail is None:
        st.info(bv.missing_log_note(path, run), icon="📄")
        return
    running = run.get("ended_at") is None
    st.markdown(f"{views.code(path)} · last {lines} lines" +
                (f" · tailing: read again every {page.REFRESH_SECONDS}s" if running else ""))
    st.code(tail or "(empty)", language=None, wrap_lines=True)


if run_id is None:
    st.markdown("No run matches the filters.")
else:
    run_log(run_id, choices[run_id]["task_id"], int(lines))
