"""The fleet: every host whose jobs runner uses this board (one on a single box,
several on a shared PostgreSQL), its state, runs against its capacity, GPUs and
labels, and the runs each host holds now."""

import streamlit as st

from sparkops import board
from sparkops.ui import board_view as bv
from sparkops.ui import ops_view, page, views

ctx = page.start("Fleet")
st.title("Fleet")
st.caption("Each host's jobs runner heartbeats every 30 s. A host silent for longer than "
           f"reclaim.heartbeat_timeout_seconds ({ctx.settings['reclaim.heartbeat_timeout_seconds']} s) "
           "is down: the other hosts' reclaimers close its runs by their heartbeats and the tasks run "
           "again elsewhere. A task that requires labels (`sparkops task require`) runs only on a "
           "host that has them all.")
page.security_banner(ctx)


@st.fragment(run_every=page.REFRESH_SECONDS)
def fleet_view() -> None:
    with page.guard():
        found = ops_view.fleet_hosts(ctx)
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
    st.dataframe(ops_view.fleet_frame(found), hide_index=True)

    st.subheader("Runs by host")
    now = ops_view.now()
    by_host: dict[str, list[dict]] = {}
    for run in live:
        by_host.setdefault(board.host_of_lock(run.get("claim_lock")) or "(no host)", []).append(run)
    if not by_host:
        st.markdown("No run is open.")
    for host, runs in sorted(by_host.items()):
        with st.expander(f"{host} · {len(runs)} run(s)", expanded=len(by_host) <= 3):
            st.dataframe(bv.runs_frame(runs, now, titles), hide_index=True)


fleet_view()
