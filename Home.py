"""SparkOps home: the board at a glance, active runs and recent events.

Start it with ``python -m sparkops up`` (or ``streamlit run Home.py``). Reads go
through :mod:`sparkops.ui.data`; this page only lays them out.
"""

import streamlit as st

from sparkops.board import Status
from sparkops.ui import data, page, views

ctx = page.start("Home")
st.title("⚡ SparkOps")
st.caption(f"Board {ctx.store.board.display_url} · settings from {ctx.settings.describe_source()}")
page.security_banner(ctx)


@st.fragment(run_every=page.REFRESH_SECONDS)
def overview() -> None:
    with page.guard():
        stats = data.board_stats(ctx.store.board)
        runs = data.active_runs(ctx.store.board)
        events = data.recent_events(ctx.store.board)

    st.subheader("Board")
    statuses = [s for s in Status if s != Status.ARCHIVED]
    for column, status in zip(st.columns(len(statuses)), statuses):
        column.metric(views.status_label(status), stats["by_status"].get(status, 0))

    left, middle, right = st.columns(3)
    left.metric("Open tasks", stats["open"], help="Tasks not done or archived")
    middle.metric("Active runs", stats["active_runs"])
    right.metric("Oldest ready task", views.duration(stats["oldest_ready_age_seconds"]),
                 help="How long the oldest ready task has waited for a worker")

    st.subheader("Active runs")
    if runs:
        st.dataframe(views.runs_frame(runs, stats["now"]), hide_index=True)
    else:
        st.caption("No run in progress.")

    st.subheader("Recent events")
    if events:
        st.dataframe(views.events_frame(events), hide_index=True)
    else:
        st.caption("No events yet. Create a task with `python -m sparkops task create`, "
                   "or add the demo sprint with `python -m sparkops demo`.")
    st.caption(f"Updated {views.when(stats['now'])}; refreshes every {page.REFRESH_SECONDS}s.")


overview()
