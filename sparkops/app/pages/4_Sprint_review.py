"""The sprint review: metrics over a window, phases, charts, blocked and stuck work,
the review reports, and the export files as downloads."""

import streamlit as st

from sparkops.control import actions
from sparkops.core import formatting
from sparkops.ui import costs_view as cv
from sparkops.ui import data, page, views
from sparkops.ui import review_view as rv

ctx = page.start("Sprint review")
st.title("Sprint review")
page.security_banner(ctx)
job_ctx = data.job_context(ctx)

window_col, review_col, export_col = st.columns([2, 1, 1], vertical_alignment="bottom")
windows, configured = rv.window_choices(ctx.settings)
window_hours = window_col.selectbox("Window", windows, index=configured, format_func=views.hours_label,
                                    key="review_window_hours",
                                    help="Completions, runs and WIP are counted over this many hours")
write_review = review_col.button("Write a review now", help="Run the review job now: a new report")
export_now = export_col.button("Export now", help="Run the export job now: fresh CSV and JSON files")
for pressed, job in ((write_review, "review"), (export_now, "export")):
    if pressed:
        result = actions.run_job_now(job_ctx, page.actor(), job)
        rv.forget()
        page.show_result(result)


@st.fragment(run_every=rv.SLOW_REFRESH_SECONDS)
def sprint(hours: float) -> None:
    with page.guard():
        current = rv.sprint(ctx.store.board, ctx.store.ops, ctx.settings, hours)
    m = current.metrics
    tiles = rv.tiles(m)
    for row in range(0, len(tiles), 4):
        for column, (label, value, help_) in zip(st.columns(4), tiles[row:row + 4]):
            column.metric(label, value, help=help_)
    st.markdown(rv.summary_markdown(m))

    st.subheader("Stuck signals")
    risks = m.risk_lines()
    for line in risks:
        st.warning(views.md_escape(line), icon="⚠️")
    if not risks:
        st.success("No stuck signal.", icon="✅")
    if m.stuck.over_max_runs["active"]:
        st.dataframe(rv.over_max_runs_frame(m), hide_index=True)

    st.subheader("Phases")
    st.dataframe(rv.phase_frame(current), hide_index=True)

    left, right = st.columns(2)
    left.altair_chart(rv.burnup_chart(m.burnup), width="stretch")
    with right:
        per = st.radio("Throughput", ["hour", "day"], horizontal=True, format_func=lambda p: f"per {p}",
                       key="review_throughput_per", label_visibility="collapsed")
        frame = m.throughput.hourly if per == "hour" else m.throughput.daily
        st.altair_chart(rv.throughput_chart(frame, per), width="stretch")

    left, right = st.columns(2)
    for column, durations, title in ((left, m.lead_time, "Lead time"), (right, m.cycle_time, "Cycle time")):
        if durations.count:
            label = f"{title} ({formatting.plural(durations.count, 'task')})"
            column.altair_chart(rv.duration_histogram(durations, label),
                                width="stretch")
        else:
            column.caption(f"{title}: no task completed in the window.")
    st.altair_chart(rv.wip_chart(m.wip), width="stretch")

    with page.guard():
        spent = cv.costs_of(ctx.store.board, ctx.store.ops, ctx.settings, current.phase_of, hours)
    cv.render(spent)

    st.subheader(f"Blocked ({m.blocked_count})")
    if m.blocked_count:
        st.dataframe(rv.blocked_frame(m), hide_index=True)
    else:
        st.caption("No blocked task.")
    st.caption(f"Window {m.window.as_dict()['start_iso']} to {m.window.as_dict()['end_iso']}; "
               f"refreshes every {rv.SLOW_REFRESH_SECONDS}s.")


@st.fragment(run_every=rv.SLOW_REFRESH_SECONDS)
def boundaries_and_reports() -> None:
    with page.guard():
        recorded = data.boundaries(ctx.store.ops)
        reports = rv.reports(ctx.store.ops)
    st.subheader("Phase boundaries")
    if recorded:
        st.dataframe(views.boundaries_frame(recorded, recorded=True), hide_index=True)
    else:
        st.caption("No phase finished yet.")

    st.subheader("Review reports")
    if not reports:
        st.caption("No review report yet. The runner writes one every "
                   f"{ctx.settings['review.interval_seconds']:g}s; **Write a review now** writes one.")
        return
    by_id = {r["id"]: r for r in reports}
    chosen = st.selectbox("Report", list(by_id), format_func=lambda i: rv.report_label(by_id[i]),
                          key="review_report")
    report = by_id.get(chosen, reports[0])
    st.caption(f"{report['path']} on {report['host']}")
    with st.container(border=True):
        if st.toggle("Show the markdown source", key="review_report_source"):
            st.code(report["markdown"], language="markdown", wrap_lines=True)
        else:
            st.markdown(report["markdown"])


@st.fragment(run_every=rv.SLOW_REFRESH_SECONDS)
def downloads() -> None:
    st.subheader("Downloads")
    files = rv.export_files(ctx.settings)
    if not files:
        st.info(f"No export in {ctx.settings['export.dir']} yet. The runner writes one every "
                f"{ctx.settings['export.interval_seconds']:g}s; **Export now** writes one.", icon="ℹ️")
        return
    st.caption(f"The files of the latest export in {ctx.settings['export.dir']} (columns and escaping: "
               "docs/export.md).")
    for column, file in zip(st.columns(len(files)), files):
        column.download_button(f"{file.name} ({rv.size_text(file.size)})", rv.file_bytes(file.path),
                               file_name=file.name, mime="text/csv", on_click="ignore",
                               key=f"download_{file.name}")
        column.caption(f"exported {views.when(int(file.modified))}")


sprint(window_hours)
boundaries_and_reports()
downloads()
