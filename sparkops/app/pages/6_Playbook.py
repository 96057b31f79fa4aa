"""Playbook: the seed's "Common Failures & Fixes", each as a live diagnosis (is it
happening now, the evidence, what the fix does and what it would do now) and a
button that applies the fix once the operator has confirmed it. Every fix is an
audited action."""

import streamlit as st

from sparkops.control import actions, playbook
from sparkops.ui import data, page, playbook_view, views

ctx = page.start("Playbook")
st.title("Playbook")
st.caption("The seed's *Common Failures & Fixes*, checked live on this host. A fix runs only "
           "after you tick **I understand** on its card; it runs the same code as the jobs runner "
           "and is recorded in the audit log (Events and alerts).")
page.security_banner(ctx)


def confirm_key(index: int, key: str) -> str:
    return f"playbook.confirm.{index}.{key}"


def result_key(index: int, key: str) -> str:
    return f"playbook.result.{index}.{key}"


def apply_fix(index: int, key: str, target: str | None) -> None:
    """The button's callback: apply the fix only when it was confirmed, then ask
    for a fresh confirmation next time."""
    if not st.session_state.get(confirm_key(index, key)):
        st.session_state[result_key(index, key)] = actions.ActionResult(
            False, "Not applied: tick “I understand” first.")
        return
    try:
        result = playbook.apply(data.job_context(ctx), page.actor(), key, target)
    except Exception as exc:  # noqa: BLE001 - never a traceback on the page
        result = actions.ActionResult(False, f"the fix {key} failed: {type(exc).__name__}: {exc}")
    st.session_state[result_key(index, key)] = result
    st.session_state[confirm_key(index, key)] = False
    data.clear_after_action()


def card(index: int, diagnosis: playbook.Diagnosis) -> None:
    with st.container(border=True):
        st.markdown(f"#### {views.md_escape(diagnosis.title)}")
        st.markdown(playbook_view.happening_badge(diagnosis.happening))
        st.markdown("**Evidence**\n\n" + "\n".join(f"- {views.md_escape(e)}" for e in diagnosis.evidence)
                    if diagnosis.evidence else "**Evidence**: none")
        if diagnosis.key == "none":
            st.caption("No fix to run from here.")
            return
        st.markdown(f"**The fix** {views.md_escape(diagnosis.fix)}")
        st.markdown("**What it would do now** (dry run)")
        st.code("\n".join(diagnosis.preview) or "nothing", language=None, wrap_lines=True)
        confirmed = st.checkbox("I understand what this fix does", key=confirm_key(index, diagnosis.key))
        label = f"Apply the fix{f' to {diagnosis.target}' if diagnosis.target else ''}"
        st.button(label, key=f"playbook.apply.{index}.{diagnosis.key}", type="primary",
                  disabled=not confirmed, on_click=apply_fix, args=(index, diagnosis.key, diagnosis.target))
        result = st.session_state.get(result_key(index, diagnosis.key))
        if result is not None:
            page.show_result(result)


@st.fragment(run_every=page.REFRESH_SECONDS)
def cards() -> None:
    with page.guard():
        diagnoses = playbook_view.diagnoses(ctx)
    applying = [d for d in diagnoses if d.applies]
    happening = [d for d in applying if d.happening]
    unchecked = [d for d in applying if d.happening is None]
    if happening:
        st.error(f"Happening now: {len(happening)} of the {len(applying)} failures that apply to this host.",
                 icon="🚨")
    if unchecked:
        st.info("Not checked yet: " + "; ".join(views.md_escape(d.title) for d in unchecked)
                + ". The watchdog looks when the jobs runner starts.", icon="⏳")
    elif not happening:
        st.success(f"None of the {len(applying)} failures that apply to this host is happening now.", icon="✅")
    for index, diagnosis in enumerate(diagnoses):
        if diagnosis.applies:
            card(index, diagnosis)
    absent = [d for d in diagnoses if not d.applies]
    if absent:
        st.markdown("**Not applicable on this host**\n\n" + "\n".join(
            f"- {views.md_escape(d.title)}: {views.md_escape(d.not_applicable, code_spans=True)}" for d in absent))
    st.caption(f"Checked {views.when(data.now())}; refreshes every {page.REFRESH_SECONDS}s.")


cards()
