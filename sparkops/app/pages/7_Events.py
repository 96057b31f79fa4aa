"""Events and alerts: the board's task events, the jobs' runs, the alerts sent (or
held back), and the audit of every button press; each filtered and downloadable
as CSV (cells a spreadsheet would run as formulas are escaped)."""

import streamlit as st

from sparkops.runner import registry
from sparkops.ui import data, events_view, page, views

ctx = page.start("Events and alerts")
st.title("Events and alerts")
page.security_banner(ctx)

since_col, limit_col = st.columns([3, 1])
since_label = since_col.selectbox("Since", list(events_view.SINCE_CHOICES), index=2, key="events.since")
limit = int(limit_col.number_input("Rows at most", min_value=10, max_value=10_000, value=500, step=100,
                                   key="events.limit"))


def table(frame, name: str, total: int) -> None:
    """The filtered table, how many rows, and its CSV download."""
    st.caption(f"{len(frame)} of {total} row(s) read" + (" (raise “Rows at most” to read more)"
                                                         if total >= limit else ""))
    st.dataframe(frame, hide_index=True)
    st.download_button(f"Download {name}.csv", events_view.csv_bytes(frame), file_name=f"{name}.csv",
                       mime="text/csv", key=f"events.download.{name}", on_click="ignore")


def chosen(key: str) -> list[str]:
    return list(st.session_state.get(key) or [])


events_tab, runs_tab, alerts_tab, audit_tab = st.tabs(["Task events", "Job runs", "Alerts", "Audit"])

with events_tab:
    kind_col, text_col = st.columns(2)
    kinds = kind_col.multiselect("Kind", events_view.options(events_view.EVENT_KINDS, [], chosen("events.kinds")),
                                 key="events.kinds", placeholder="every kind")
    events_text = text_col.text_input("Text", key="events.text", placeholder="a task id, words in the details")

    @st.fragment(run_every=page.REFRESH_SECONDS)
    def events_table(kinds: list[str], text: str) -> None:
        with page.guard():
            rows = events_view.task_events(ctx.store.board, kinds=kinds,
                                           since=events_view.since_epoch(since_label), limit=limit)
        table(events_view.filter_text(views.events_frame(rows), text), "task_events", len(rows))

    events_table(kinds, events_text)

with runs_tab:
    job_col, outcome_col, text_col = st.columns(3)
    job_names = job_col.multiselect("Job", events_view.options(registry.all_jobs(), [], chosen("runs.jobs")),
                                    key="runs.jobs", placeholder="every job")
    outcomes = outcome_col.multiselect("Outcome", list(events_view.JOB_OUTCOMES), key="runs.outcomes",
                                       placeholder="every outcome")
    runs_text = text_col.text_input("Text", key="runs.text", placeholder="words in the summary or error")

    @st.fragment(run_every=page.REFRESH_SECONDS)
    def runs_table(job_names: list[str], outcomes: list[str], text: str) -> None:
        with page.guard():
            rows = events_view.job_runs(ctx.store.ops, jobs_=job_names, outcomes=outcomes,
                                        since=events_view.since_epoch(since_label), limit=limit)
        table(events_view.filter_text(events_view.job_runs_frame(rows), text), "job_runs", len(rows))

    runs_table(job_names, outcomes, runs_text)

with alerts_tab:
    outcome_col, level_col, text_col = st.columns(3)
    alert_outcomes = outcome_col.multiselect("Outcome", list(events_view.ALERT_OUTCOMES), key="alerts.outcomes",
                                             placeholder="sent, suppressed, failed, logged")
    levels = level_col.multiselect("Level", list(events_view.ALERT_LEVELS), key="alerts.levels",
                                   placeholder="every level")
    alerts_text = text_col.text_input("Text", key="alerts.text", placeholder="a key, words in the title")

    @st.fragment(run_every=page.REFRESH_SECONDS)
    def alerts_table(alert_outcomes: list[str], levels: list[str], text: str) -> None:
        with page.guard():
            rows = data.recent_alerts(ctx.store.ops, since=events_view.since_epoch(since_label), limit=limit)
        frame = events_view.filter_in(events_view.alerts_frame(rows), "outcome", alert_outcomes)
        frame = events_view.filter_in(frame, "level", levels)
        table(events_view.filter_text(frame, text), "alerts", len(rows))

    alerts_table(alert_outcomes, levels, alerts_text)

with audit_tab:
    result_col, text_col = st.columns(2)
    results = result_col.multiselect("Result", list(events_view.AUDIT_RESULTS), key="audit.results",
                                     placeholder="every result")
    audit_text = text_col.text_input("Text", key="audit.text", placeholder="who, an action, a target")

    @st.fragment(run_every=page.REFRESH_SECONDS)
    def audit_table(results: list[str], text: str) -> None:
        with page.guard():
            rows = events_view.audit(ctx.store.ops, since=events_view.since_epoch(since_label), limit=limit)
        frame = events_view.filter_in(events_view.audit_frame(rows), "result", results)
        table(events_view.filter_text(frame, text), "audit", len(rows))

    audit_table(results, audit_text)
