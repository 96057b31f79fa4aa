"""The GPU: devices and processes now, the stored history, and the vLLM server."""

import time

import streamlit as st

from sparkops.control import actions
from sparkops.ui import data, gpu_view, page, views

ctx = page.start("GPU")
st.title("GPU")
page.security_banner(ctx)
job_ctx = data.job_context(ctx)

if st.button("Sample now", help="Store one sample per GPU now (the gpu-sample job), for the history"):
    result = actions.run_job_now(job_ctx, page.actor(), "gpu-sample", **data.sample_options())
    gpu_view.forget()
    page.show_result(result)


@st.fragment(run_every=page.REFRESH_SECONDS)
def devices_now() -> None:
    snapshot = data.gpu_snapshot()
    if not snapshot.available:
        st.info(f"**No GPU data.** {snapshot.reason}", icon="ℹ️")
        return
    st.caption(f"{snapshot.reason} · driver {snapshot.driver_version or '?'} · "
               f"read {views.when(int(snapshot.taken_at))}; refreshes every {page.REFRESH_SECONDS}s")
    for device in snapshot.devices:
        st.subheader(gpu_view.device_title(device))
        for column, (label, value, help_) in zip(st.columns(4), gpu_view.device_tiles(device)):
            column.metric(label, value, help=help_)
        for note in device.notes:
            st.caption(note)
    st.subheader("Processes")
    if snapshot.processes:
        st.dataframe(gpu_view.processes_frame(snapshot), hide_index=True)
    else:
        st.caption("No process uses a GPU.")


@st.fragment(run_every=page.REFRESH_SECONDS)
def other_hosts() -> None:
    names = ctx.settings["remote.gpu_hosts"]
    if not names:
        return
    st.subheader("Other hosts")
    with page.guard():
        recorded = gpu_view.remote_gpus(ctx)
    for name in names:
        state, snapshot = recorded.get(name, (None, None))
        st.markdown(f"**{views.md_escape(name)}** · over SSH with nvidia-smi")
        if state is None:
            st.caption(f"Not read yet: the remote-gpu job reads it every "
                       f"{ctx.settings['remote.gpu_interval_seconds']:g}s.")
            continue
        read = f"read {views.when(state.checked_at)}"
        if snapshot is None or not snapshot.available:
            st.warning(f"{views.md_escape(state.detail)} ({read})", icon="⚠️")
            continue
        st.caption(f"{snapshot.reason} · driver {snapshot.driver_version or '?'} · {read}")
        for device in snapshot.devices:
            st.markdown(gpu_view.device_title(device))
            for column, (label, value, help_) in zip(st.columns(4), gpu_view.device_tiles(device)):
                column.metric(label, value, help=help_)
        if snapshot.processes:
            st.dataframe(gpu_view.processes_frame(snapshot), hide_index=True)


@st.fragment(run_every=gpu_view.SLOW_REFRESH_SECONDS)
def history() -> None:
    st.subheader("History")
    hosts = [job_ctx.host, *ctx.settings["remote.gpu_hosts"]]
    range_col, host_col = st.columns(2)
    hours = range_col.selectbox("Range", gpu_view.HISTORY_HOURS,
                                index=gpu_view.HISTORY_HOURS.index(gpu_view.DEFAULT_HISTORY_HOURS),
                                format_func=views.hours_label, key="gpu_history_hours")
    host = host_col.selectbox("Host", hosts, key="gpu_history_host") if len(hosts) > 1 else hosts[0]
    with page.guard():
        frame = gpu_view.gpu_history(ctx.store.ops, host, hours)
    if frame.empty:
        st.caption(f"No GPU sample of {host} in the last {views.hours_label(hours)}. The runner "
                   f"stores one every {ctx.settings['gpu.sample_interval_seconds']:g}s; "
                   "**Sample now** stores one.")
        return
    left, right = st.columns(2)
    left.altair_chart(gpu_view.utilization_chart(frame), width="stretch")
    right.altair_chart(gpu_view.memory_chart(frame), width="stretch")


@st.fragment(run_every=page.REFRESH_SECONDS)
def vllm() -> None:
    st.subheader("vLLM")
    specs = gpu_view.vllm_services(ctx.settings)
    if not specs:
        st.caption("No vLLM service is configured (services.NAME.check = \"vllm\").")
        return
    with page.guard():
        states = data.service_states(ctx.store.ops, job_ctx.host)
    now = time.time()
    for spec in specs:
        st.markdown(f"**{views.md_escape(spec.name)}** · {views.code(spec.url)}")
        state = states.get(spec.name)
        if state is None:
            st.caption(f"Not checked yet: the watchdog checks it every "
                       f"{ctx.settings['watchdog.interval_seconds']:g}s.")
            continue
        st.markdown(gpu_view.vllm_status_line(state, now))
        if state.detail:
            st.caption(views.md_escape(state.detail))
        for column, (label, value) in zip(st.columns(4), gpu_view.vllm_tiles(state)):
            column.metric(label, value)
        st.markdown(f"Models: {gpu_view.vllm_models(state)}")


devices_now()
other_hosts()
history()
vllm()
