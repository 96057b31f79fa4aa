"""The kanban board: one column per status, filtered by text and assignee."""

import streamlit as st

from sparkops.ui import data, page, views

ctx = page.start("Board")
st.title("Board")
page.security_banner(ctx)

text_col, assignee_col, archived_col = st.columns([3, 2, 1], vertical_alignment="bottom")
text = text_col.text_input("Filter", placeholder="words in the title, or a task id")
show_archived = archived_col.toggle("Archived", value=False)

with page.guard():
    tasks = data.tasks(ctx.store.board, include_archived=show_archived)
    now = data.board_stats(ctx.store.board)["now"]

ALL = "(everyone)"
assignee = assignee_col.selectbox("Assignee", [ALL, *views.assignees(tasks)])
shown = views.filter_tasks(tasks, text=text, assignee=None if assignee == ALL else assignee)
st.caption(f"{len(shown)} of {len(tasks)} tasks")

MAX_CARDS = 50
columns = views.board_columns(shown, show_archived=show_archived)
for column, (status, items) in zip(st.columns(len(columns)), columns):
    with column:
        st.markdown(f"**{views.status_label(status)}** · {len(items)}")
        for task in items[:MAX_CARDS]:
            with st.container(border=True):
                st.markdown(views.card_markdown(task, now))
        if len(items) > MAX_CARDS:
            st.caption(f"and {len(items) - MAX_CARDS} more; narrow the filter")
