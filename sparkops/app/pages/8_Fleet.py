"""The fleet: every host whose jobs runner uses this board (one on a single box,
several on a shared PostgreSQL), its state, runs against its capacity, GPUs and
labels, and the runs each host holds now."""

import streamlit as st

from sparkops.board import model
from sparkops.core import formatting
from sparkops.ui import board_view as bv
from sparkops.ui import data, fleet_view, page, views

ctx = page.start("Fleet")
st.title("Fleet")
st.caption(f"Each host's jobs runner heartbeats every {data.HOST_HEARTBEAT_SECONDS:g} s and is down after "
           f"{data.RUNNER_STALE_SECONDS:g} s without one (the same rule on every page and in `sparkops hosts`). "
           "A down host's open runs are closed by the other hosts' reclaimers once the runs' own heartbeats are "
           f"older than reclaim.heartbeat_timeout_seconds ({ctx.settings['reclaim.heartbeat_timeout_seconds']} s), "
           "and the tasks run again elsewhere. A task that requires labels (`sparkops task require`) runs only "
           "on a host that has them all.")
page.security_banner(ctx)


@st.fragment(run_every=page.REFRESH_SECONDS)
def show_fleet() -> None:
    with page.guard():
        found = fleet_view.fleet_hosts(ctx)
        live = bv.runs(ctx.store.board, active_only=True, limit=500)
        titles = {t: row["title"] for t, row in bv.titles(ctx.store.board, (r["task_id"] for r in live)).items()}
    if not found:
        st.info("No jobs runner has registered yet. Start one with `python jobs_runner.py` "
                "(or `python -m sparkops up`).", icon="🛰️")
        return
    up = [h for h in found if h.state == "up"]
    down = [h for h in found if h.state == "down"]
    hosts_col, capacity_col, runs_col, down_col = st.columns(4)
    hosts_col.metric("Hosts up", f"{len(up)}/{len(found)}")
    capacity_col.metric("Capacity", sum(h.capacity or 0 for h in up), help="Slots of the hosts that are up")
    runs_col.metric("Runs open", sum(h.open_runs for h in found))
    down_col.metric("Hosts down", len(down))
    for h in down:
        st.error(f"Host **{views.md_escape(h.host)}** has been silent for {views.duration(h.heartbeat_age)}"
                 f"; its {h.open_runs} open run(s) are reclaimed by the other hosts.", icon="🔴")
    st.dataframe(fleet_view.fleet_frame(found), hide_index=True)

    st.subheader("Runs by host")
    now = data.now()
    by_host: dict[str, list[dict]] = {}
    for run in live:
        by_host.setdefault(model.host_of_lock(run.get("claim_lock")) or "(no host)", []).append(run)
    if not by_host:
        st.markdown("No run is open.")
    for host, runs in sorted(by_host.items()):
        with st.expander(f"{host} · {formatting.plural(len(runs), 'run')}", expanded=len(by_host) <= 3):
            st.dataframe(bv.runs_frame(runs, now, titles), hide_index=True)


show_fleet()
