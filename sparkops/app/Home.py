"""SparkOps home: health at a glance (anything red on top), the board, active runs,
recent alerts, phase boundaries and events.

Start it with ``python -m sparkops up`` (or ``streamlit run sparkops/app/Home.py``). Reads go
through :mod:`sparkops.ui.data` and :mod:`sparkops.ui.home_view`; this page only
lays them out.
"""

import streamlit as st

from sparkops.board.model import Status
from sparkops.ui import data, events_view, home_view, page, views

ctx = page.start("Home")
st.title("⚡ SparkOps")
st.caption(f"Board {ctx.store.board.display_url} · settings from {ctx.settings.describe_source()}")
page.security_banner(ctx)


def show_health(health: home_view.Health) -> None:
    red, unchecked = health.red(), health.unchecked()
    if red:
        st.error("**Needs attention now**\n\n" + "\n".join(f"- {views.md_escape(line)}" for line in red),
                 icon="🚨")
    if health.waiting and health.review_fresh:
        st.warning("**Waiting on you**\n\n" + "\n".join(f"- {views.md_escape(line)}" for line in health.waiting)
                   + "\n\nAnswer on the Board (the task's detail), then unblock it.", icon="🙋")
    if unchecked:
        st.info("**Not checked yet**, so not green\n\n"
                + "\n".join(f"- {views.md_escape(line)}" for line in unchecked), icon="⏳")
    elif not red and not (health.waiting and health.review_fresh):
        st.success(f"All green on {health.host}: " + ", ".join(health.looked_at()) + ".", icon="✅")
    absent = health.not_configured()
    if absent:
        st.caption("**Not configured on this host** (neither green nor red)  \n"
                   + "  \n".join(views.md_escape(line, code_spans=True) for line in absent))

    runner = health.runner
    runner_col, tick_col, capacity_col, gpu_col = st.columns(4)
    runner_col.metric("Jobs runner", runner.state, help=runner.problem or f"pid {runner.pid} on {runner.host}")
    tick_col.metric("Runner's last tick",
                    f"{views.duration(runner.heartbeat_age)} ago" if runner.heartbeat_at else "-",
                    help=f"The runner heartbeats every {data.HOST_HEARTBEAT_SECONDS:g}s; "
                         f"down after {data.RUNNER_STALE_SECONDS:g}s without one")
    capacity_col.metric("Capacity used", f"{health.capacity_used}/{health.capacity_total}",
                        help="Open runs claimed by this host / dispatch.max_in_progress")
    gpu_col.metric("GPU", "zombies!" if health.zombies else ("ok" if health.gpu_available else "no NVML"),
                   help=health.gpu_summary)
    st.caption(f"GPU: {views.md_escape(health.gpu_summary)}")

    if health.services:
        st.markdown("**Services** · " + " · ".join(
            f"{s.icon} {views.md_escape(s.name)} {s.words}" for s in health.services),
            help="\n\n".join(views.md_escape(f"{s.name} ({s.check}): {s.detail}") for s in health.services))
    else:
        st.caption("No service is watched on this host.")
    if health.remotes:
        st.markdown("**Remote** · " + " · ".join(
            f"{r.icon} {views.md_escape(r.what)} {r.status}" for r in health.remotes),
            help="\n\n".join(views.md_escape(f"{r.what}: {r.detail}") for r in health.remotes))
    disks = " · ".join(f"{u.path} {u.percent:.0f}%" if u.error is None else u.error for u in health.disks)
    review = (f"last review {views.duration(health.now - health.review_at)} ago"
              if health.review_at else "no sprint review yet")
    st.caption(f"Disks: {views.md_escape(disks) or '-'} (threshold {health.disk_threshold:g}%) · "
               f"{review}" + ("" if health.review_fresh or not health.review_at
                              else " (too old to judge stuck signals; is the runner up?)"))


@st.fragment(run_every=page.REFRESH_SECONDS)
def overview() -> None:
    with page.guard():
        health = home_view.health(ctx)
        stats = data.board_stats(ctx.store.board)
        runs = data.active_runs(ctx.store.board)
        events = data.recent_events(ctx.store.board)
        alerts = data.recent_alerts(ctx.store.ops, limit=10)
        boundaries = list(reversed(data.boundaries(ctx.store.ops)))[:5]

    show_health(health)

    st.subheader("Board")
    statuses = [s for s in Status if s != Status.ARCHIVED]
    for column, status in zip(st.columns(len(statuses)), statuses):
        column.metric(views.status_label(status), stats["by_status"].get(status, 0))

    left, middle, right = st.columns(3)
    left.metric("Open tasks", stats["open"], help="Tasks not done or archived")
    middle.metric("Active runs", stats["active_runs"])
    waiting = stats["ready_wait"]
    right.metric("Longest ready wait", views.duration(waiting["wait_seconds"]) if waiting else "-",
                 help=(f"{waiting['id']} ({waiting['title']}) has waited for a worker since it became ready "
                       f"at {views.when(waiting['ready_since'])}" if waiting else "No task is ready"))

    st.subheader("Active runs")
    if runs:
        st.dataframe(views.runs_frame(runs, stats["now"]), hide_index=True)
    else:
        st.caption("No run in progress.")

    alerts_col, phases_col = st.columns(2)
    with alerts_col:
        st.subheader("Recent alerts")
        if alerts:
            st.dataframe(events_view.alerts_frame(alerts)[["time", "level", "title", "outcome"]], hide_index=True)
        else:
            st.caption("No alert yet.")
    with phases_col:
        st.subheader("Phase boundaries")
        if boundaries:
            st.dataframe(views.boundaries_frame(boundaries), hide_index=True)
        else:
            st.caption("No phase finished yet.")

    st.subheader("Recent events")
    if events:
        st.dataframe(views.events_frame(events), hide_index=True)
    else:
        st.caption("No events yet. Create a task with `python -m sparkops task create`, "
                   "or add the demo sprint with `python -m sparkops demo`.")
    st.caption(f"Updated {views.when(stats['now'])}; refreshes every {page.REFRESH_SECONDS}s.")


overview()
