"""Jobs: every job of the runner with its interval, last and next run, and a
"Run now" button (the same function the runner runs, under the same lock, audited);
the jobs runner's state on this host and the fleet's."""

import streamlit as st

from sparkops.control import actions
from sparkops.runner import registry
from sparkops.ui import data, fleet_view, jobs_view, page, views

ctx = page.start("Jobs")
st.title("Jobs")
st.caption("Each job runs on the jobs runner's schedule; **Run now** runs it here at once, under its "
           "lock (a run already in progress is reported, not doubled), and records who pressed it. "
           "Idle scheduled ticks (nothing to do) are not recorded, so the last run is the last one "
           "that did something, failed, or was started by hand.")
page.security_banner(ctx)

HOST = data.this_host(ctx.settings)
SPECS = registry.all_jobs()


def run_now(name: str) -> None:
    """The button's callback: run the job, keep its result for the page."""
    try:
        result = actions.run_job_now(data.job_context(ctx), page.actor(), name)
    except Exception as exc:  # noqa: BLE001 - e.g. the job context cannot be made; never a traceback
        result = actions.ActionResult(False, f"could not run {name}: {type(exc).__name__}: {exc}")
    st.session_state[f"jobs.result.{name}"] = result
    data.clear_after_action()


@st.fragment(run_every=page.REFRESH_SECONDS)
def show_jobs() -> None:
    now = data.now()
    with page.guard():
        rows = data.hosts(ctx.store.ops)
        last = jobs_view.last_job_runs(ctx.store.ops, HOST)
    runner = data.runner_status(rows, HOST, now)

    st.subheader(f"Jobs runner on {HOST}")
    if runner.problem:
        st.error(runner.problem, icon="🛑")
    state_col, pid_col, started_col, beat_col = st.columns(4)
    state_col.metric("State", runner.state)
    pid_col.metric("PID", runner.pid if runner.pid is not None else "-")
    started_col.metric("Started", views.when(runner.started_at))
    beat_col.metric("Last heartbeat",
                    f"{views.duration(runner.heartbeat_age)} ago" if runner.heartbeat_at else "-",
                    help=f"Every {data.HOST_HEARTBEAT_SECONDS:g}s; down after "
                         f"{data.RUNNER_STALE_SECONDS:g}s without one")
    if runner.version or runner.mode:
        st.caption(f"SparkOps {runner.version or '?'} · dispatch mode {runner.mode or '?'} · "
                   f"capacity {runner.capacity if runner.capacity is not None else '?'}")
    others = [r for r in rows if r["host"] != HOST]
    if others:
        with st.expander(f"Other hosts ({len(others)})"):
            st.dataframe(fleet_view.hosts_frame(others, now), hide_index=True)

    remotes = jobs_view.remote_lines(ctx.settings, jobs_view.remote_states(ctx.store.ops, HOST))
    if remotes:
        st.subheader("Remote hosts")
        st.caption("The tunnel, the push and the remote GPU hosts configured here ([remote] settings), "
                   "with what their jobs last recorded.")
        st.dataframe(jobs_view.remote_frame(remotes, now), hide_index=True)

    st.subheader("Jobs")
    for line in jobs_view.job_lines(SPECS, ctx.settings, last, runner, now):
        with st.container(border=True):
            name_col, last_col, next_col, button_col = st.columns([3, 4, 3, 1.6], vertical_alignment="center")
            name_col.markdown(f"**{line.name}** · every {line.interval:g}s")
            name_col.caption(line.help)
            last_col.markdown(views.md_escape(line.last_text))
            if line.last is not None:
                if line.last.get("summary"):
                    last_col.caption(views.md_escape(line.last["summary"]))
                if line.last.get("error"):
                    last_col.caption(f":red[{views.md_escape(line.last['error'])}]")
            next_col.markdown(f"Next: {views.md_escape(line.next_text)}")
            button_col.button("Run now", key=f"jobs.run.{line.name}", on_click=run_now, args=(line.name,),
                              help=f"Run {line.name} once now, on this host")
            result = st.session_state.get(f"jobs.result.{line.name}")
            if result is not None:
                page.show_result(result)
    st.caption(f"Updated {views.when(now)}; refreshes every {page.REFRESH_SECONDS}s.")


show_jobs()
