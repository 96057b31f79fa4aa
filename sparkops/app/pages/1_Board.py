"""The kanban board: one column per status, filters, a task's detail and its actions.

Filters stay outside the self-refreshing parts, so a refresh keeps them. Open a
card to see the task (body, comments, parents and children, runs, events, the
tail of its run log) and act on it; every button goes through
:mod:`sparkops.control.actions`, which audits it, and shows its result.
"""

import streamlit as st

from sparkops.control import actions
from sparkops.core.clock import epoch
from sparkops.core.errors import NotFound
from sparkops.engine import runlog
from sparkops.ui import board_view as bv
from sparkops.ui import data, page, views

ctx = page.start("Board")
st.title("Board")
page.security_banner(ctx)

ALL = "(everyone)"
MAX_CARDS = 50
#: Finished columns (done, archived) show this many cards at first; "Show more" adds as many.
FINISHED_CARDS = 8
OPEN_KEY = "board_open"  # the task whose detail is shown


# -- buttons (callbacks: they run before the page renders, so it shows their effect) ----------


def _record(result, where: str) -> None:
    bv.remember_result(result, where)
    bv.forget()


def _act(name: str, task_id: str) -> None:
    job, who, state = data.job_context(ctx), page.actor(), st.session_state
    if name == "priority":
        result = actions.set_priority(job, who, task_id, int(state[f"board_prio_{task_id}"]))
    elif name == "block":
        result = actions.block(job, who, task_id, (state.get(f"board_reason_{task_id}") or "").strip())
    elif name == "unblock":
        result = actions.unblock(job, who, task_id)
    elif name == "promote":
        result = actions.promote(job, who, task_id, force=bool(state.get(f"board_force_{task_id}")))
    elif name == "requeue":
        result = actions.requeue(job, who, task_id)
    elif name == "reclaim":
        result = actions.reclaim_task(job, who, task_id)
    elif name == "archive":
        result = actions.archive(job, who, task_id)
    elif name == "workspace":
        result = actions.recreate_workspace(job, who, task_id)
    elif name == "comment":
        result = actions.comment(job, who, task_id, state.get(f"board_comment_{task_id}") or "")
    else:  # pragma: no cover - a typo in this page
        raise ValueError(name)
    _record(result, "detail")


def _create() -> None:
    state = st.session_state
    result = actions.create_task(
        data.job_context(ctx), page.actor(), (state.get("board_new_title") or "").strip(),
        body=(state.get("board_new_body") or "").strip() or None,
        assignee=(state.get("board_new_assignee") or "").strip() or None,
        priority=int(state.get("board_new_priority") or 0),
        parents=list(state.get("board_new_parents") or []))
    _record(result, "create")
    if result.ok:  # a refused form keeps what was typed
        state[OPEN_KEY] = result.data["task_id"]
        for key, empty in (("board_new_title", ""), ("board_new_body", ""), ("board_new_assignee", ""),
                           ("board_new_priority", 0), ("board_new_parents", [])):
            state[key] = empty


def _close() -> None:
    st.session_state.pop(OPEN_KEY, None)


# -- filters (outside the fragments, so a refresh keeps them) ----------------------------------

text_col, assignee_col, phase_col, priority_col, archived_col = st.columns(
    [3, 2, 2, 1, 1], vertical_alignment="bottom")
text = text_col.text_input("Filter", placeholder="words in the title, or a task id")
show_archived = archived_col.toggle("Archived", value=False)

with page.guard():
    options = bv.board_options(ctx.store.board, include_archived=show_archived)
    phase_of = bv.phase_map(ctx)

assignee = assignee_col.selectbox("Assignee", [ALL, *options["assignees"]])
phase = phase_col.selectbox("Phase", [bv.ANY, *bv.phase_names(phase_of)])
priority = priority_col.selectbox("Priority", [bv.ANY, *options["priorities"]])
filters = {
    "text": text,
    "assignee": None if assignee == ALL else assignee,
    "phase": None if phase == bv.ANY else phase,
    "priority": None if priority == bv.ANY else int(priority),
}

# -- creating a task -----------------------------------------------------------------------------

created = bv.pending_result("create")
with (st.expander("➕ New task", expanded=created is not None and not created.ok),
      st.form("board_new_task", border=False)):
    st.text_input("Title", key="board_new_title")
    st.text_area("Body", key="board_new_body", height=100)
    left, right = st.columns(2)
    left.text_input("Assignee", key="board_new_assignee", placeholder="e.g. builder")
    right.number_input("Priority", key="board_new_priority", step=1)
    with page.guard():
        titles = bv.open_tasks(ctx.store.board)
    st.multiselect("Parents", list(titles), key="board_new_parents",
                   format_func=lambda i: f"{i} · {titles.get(i, '')[:60]}",
                   help=f"The newest {bv.PARENT_CHOICES} open tasks; link any other with "
                        "`python -m sparkops task link PARENT CHILD`.")
    st.form_submit_button("Create task", on_click=_create, type="primary")
if created is not None:
    page.show_result(created)


# -- a task's detail -------------------------------------------------------------------------------


@st.fragment(run_every=page.REFRESH_SECONDS)
def live_runs(task_id: str) -> None:
    """The task's runs and the tail of its current (or last) run's log."""
    try:
        detail = bv.task_detail(ctx.store.board, task_id)
    except NotFound:
        return
    now = epoch()
    if detail["runs"]:
        spend = bv.run_spend(ctx.store.ops, bv.Prices.of(ctx.settings), tuple(int(r["id"]) for r in detail["runs"]))
        frame = bv.runs_frame(reversed(detail["runs"]), now, spend=spend).drop(columns=["task", "title"])
        st.dataframe(frame, hide_index=True)
    else:
        st.markdown("No run yet.")
    run_id = bv.log_run_id(detail)
    if run_id is None:
        return
    path = runlog.run_log_path(ctx.settings, task_id, run_id)
    running = detail["task"].get("current_run_id") == run_id
    st.markdown(f"**Log of run {run_id}**" + (" (running; tailing)" if running else ""))
    tail = bv.read_log_tail(path)
    if tail is None:
        st.info(bv.missing_log_note(path, {"id": run_id}), icon="📄")
    else:
        st.code(tail or "(empty)", language=None, wrap_lines=True)
        st.markdown(f"{views.code(path)} · last {bv.LOG_TAIL_LINES} lines")


@st.fragment(run_every=page.REFRESH_SECONDS)
def live_events(task_id: str) -> None:
    try:
        detail = bv.task_detail(ctx.store.board, task_id)
    except NotFound:
        return
    if detail["events"]:
        st.dataframe(views.events_frame(list(reversed(detail["events"]))), hide_index=True)
    else:
        st.markdown("No events.")


@st.fragment(run_every=page.REFRESH_SECONDS)
def live_header(task_id: str) -> None:
    """The task's title and facts (status, block reason, ...), read again at every refresh."""
    try:
        task = bv.task_detail(ctx.store.board, task_id)["task"]
    except NotFound:
        st.warning(f"Task {task_id} is not on this board (any more).")
        return
    st.subheader(views.md_escape(task["title"]))
    st.markdown(bv.task_facts(task, phase_of.get(task_id), epoch()))
    if task.get("current_run_id") is not None or task["status"] not in ("triage", "todo", "ready"):
        spent = bv.task_spend(ctx, [task_id]).get(task_id)
        st.markdown(bv.usage_summary(spent, bv.Prices.of(ctx.settings)))


@st.dialog("Task", width="large", on_dismiss=_close)
def detail_view(task_id: str) -> None:
    """The task's detail, as a dialog: wherever the card was on the page, the detail
    is in view; its header, runs and events refresh while it is open."""
    if st.session_state.get(OPEN_KEY) != task_id:
        st.rerun()  # closed (the Close button): the dialog goes with a full rerun
    with st.container():
        close_col = st.columns([5, 1], vertical_alignment="center")[1]
        close_col.button("✖ Close", key="board_close", on_click=_close, width="stretch")
        with page.guard():
            try:
                detail = bv.task_detail(ctx.store.board, task_id)
            except NotFound:
                st.warning(f"Task {task_id} is not on this board (any more).")
                return
        task = detail["task"]
        live_header(task_id)
        result = bv.pending_result("detail")
        if result is not None:
            page.show_result(result)

        overview, act, runs_tab, events_tab = st.tabs(["Overview", "Actions", "Runs and log", "Events"])
        with overview:
            if views.block_note(task):
                st.warning(views.block_note(task, limit=None).removeprefix("⛔ ") + " · unblock it under "
                           "**Actions** once it is answered", icon="⛔")
            st.markdown("**Body**")
            st.markdown(bv.text_block(task.get("body")) or "(no body)")
            if task.get("last_failure_error"):
                st.markdown("**Last failure**")
                st.text(task["last_failure_error"])
            if task.get("workspace_path"):
                st.markdown(f"**Workspace** {views.code(task['workspace_path'])}")
            by_id = bv.titles(ctx.store.board, detail["parents"] + detail["children"])
            parents_col, children_col = st.columns(2)
            with parents_col:
                st.markdown("**Parents**")
                st.markdown("  \n".join(bv.link_lines(detail["parents"], by_id)) or "none")
            with children_col:
                st.markdown("**Children**")
                st.markdown("  \n".join(bv.link_lines(detail["children"], by_id)) or "none")
            st.markdown(f"**Comments** ({len(detail['comments'])})")
            for c in detail["comments"]:
                with st.container(border=True):
                    author, at = views.md_escape(c.get("author") or "?"), views.when(c["created_at"])
                    st.markdown(f"**{author}** · {at}  \n{bv.text_block(c.get('body'))}")
            with st.form(f"board_comment_form_{task_id}", clear_on_submit=True, border=False):
                st.text_area("Comment", key=f"board_comment_{task_id}", height=80)
                st.form_submit_button("Add comment", on_click=_act, args=("comment", task_id))

        with act:
            prio, prio_button = st.columns([2, 1], vertical_alignment="bottom")
            prio.number_input("Priority", key=f"board_prio_{task_id}", value=int(task.get("priority") or 0),
                              step=1)
            prio_button.button("Set priority", key="board_do_priority", on_click=_act,
                               args=("priority", task_id), width="stretch")
            with st.form(f"board_block_form_{task_id}", clear_on_submit=True, border=False):
                st.text_input("Reason for blocking", key=f"board_reason_{task_id}",
                              placeholder="what a human has to do")
                st.form_submit_button("⛔ Block", on_click=_act, args=("block", task_id))
            st.checkbox("Promote even with unfinished parents", key=f"board_force_{task_id}")
            buttons = [
                ("unblock", "Unblock", "blocked or scheduled -> ready (todo while parents are unfinished)"),
                ("promote", "Promote", "todo, blocked or triage -> ready"),
                ("requeue", "Requeue", "blocked, triage or todo -> ready now, with a fresh failure budget"),
                ("reclaim", "Reclaim", "running: stop its worker and put it back to ready"),
                ("archive", "Archive", "any task (a running one's agent is stopped by its shim)"),
                ("workspace", "Re-create workspace", "make the task's missing workspace again"),
            ]
            for column, (name, label, help_text) in zip(st.columns(3) * 2, buttons):
                column.button(label, key=f"board_do_{name}", help=help_text, on_click=_act,
                              args=(name, task_id), width="stretch")

        with runs_tab:
            live_runs(task_id)
        with events_tab:
            live_events(task_id)


open_id = st.session_state.get(OPEN_KEY)
if open_id:
    detail_view(open_id)


# -- the board -------------------------------------------------------------------------------------

#: Columns that only grow: their cards are capped, with "Show more".
FINISHED_COLUMNS = ("done", "archived")


def _show_more(key: str, showing: int) -> None:
    st.session_state[key] = min(showing + FINISHED_CARDS, MAX_CARDS)


@st.fragment(run_every=page.REFRESH_SECONDS)
def board(filters: dict, show_archived: bool) -> None:
    with page.guard():
        phase_of = bv.phase_map(ctx)
        shown = bv.board_slice(ctx.store.board, filters, show_archived=show_archived, phase_of=phase_of,
                               per_status=MAX_CARDS)
    now = epoch()
    spent = bv.task_spend(ctx, [t["id"] for items in shown.cards.values() for t in items])
    prices = bv.Prices.of(ctx.settings)
    st.caption(f"{shown.matched:,} of {shown.total:,} tasks")
    skipped = bv.hermes_skips_note(ctx)
    if skipped:
        st.warning(skipped, icon="🙈")
    statuses = views.board_statuses(shown.counts, show_archived=show_archived)
    for column, status in zip(st.columns(len(statuses)), statuses):
        count, items = shown.counts.get(status, 0), shown.cards.get(status, [])
        with column:
            st.markdown(f"**{views.status_label(status)}** · {count:,}")
            more_key = f"board_more_{status}"
            if status in FINISHED_COLUMNS:
                items = items[:st.session_state.get(more_key, FINISHED_CARDS)]
            for task in items:
                with st.container(border=True):
                    st.markdown(views.card_markdown(task, now, phase_of.get(task["id"], (None,))[0],
                                                    bv.usage_line(spent.get(task["id"]), prices)))
                    if st.button("Open", key=f"open_{task['id']}", width="stretch"):
                        st.session_state[OPEN_KEY] = task["id"]
                        st.rerun()
            if count > len(items):
                if status in FINISHED_COLUMNS and len(items) < len(shown.cards.get(status, [])):
                    st.button(f"Show more ({count - len(items):,} not shown)", key=f"board_show_more_{status}",
                              on_click=_show_more, args=(more_key, len(items)), width="stretch")
                else:
                    st.caption(f"and {count - len(items):,} more; narrow the filter")


board(filters, show_archived)
