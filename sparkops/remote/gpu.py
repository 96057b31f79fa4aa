"""Other hosts' GPUs over SSH: ``nvidia-smi`` there, parsed into the NVML adapter's shape.

The ``remote-gpu`` job logs in to each of ``remote.gpu_hosts`` (:mod:`sparkops.net.ssh`,
host key verified) and runs ``nvidia-smi --query-gpu=... --format=csv,noheader,nounits``
and the ``--query-compute-apps`` query (:mod:`sparkops.meters.gpu_smi` parses them into a
:class:`sparkops.meters.gpu.GpuSnapshot`). A GB10 answers ``[N/A]`` for its memory; then
the host's ``/proc/meminfo`` is read too, as the local adapter does.

Each host's snapshot is kept in ``ops_remote`` (kind ``gpu``) for the GPU page, and
one sample per device goes into ``ops_gpu_samples`` under the remote host's name,
so its history is drawn like a local one. A host that cannot be reached is recorded
as such (the page says why) and does not stop the others.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from sqlalchemy import insert

from sparkops.config import Settings
from sparkops.core.clock import epoch
from sparkops.jobs.framework import JobReport
from sparkops.meters import gpu_smi
from sparkops.meters.gpu import GpuDevice, GpuProcess, GpuSnapshot
from sparkops.net import ssh as remote
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_gpu_samples

if TYPE_CHECKING:
    from sparkops.jobs.framework import JobContext

KIND = "gpu"


def read(settings: Settings, name: str, *, now: float | None = None) -> GpuSnapshot:
    """The GPUs of remote host ``name``. Raises RemoteError when it cannot be asked;
    an nvidia-smi that fails there gives a snapshot with ``available=False``."""
    taken = time.time() if now is None else float(now)
    spec = settings.remote(name)
    timeout = settings["remote.io_timeout_seconds"]
    with remote.connect(settings, name) as conn:
        gpus = conn.run(gpu_smi.gpu_argv(spec.nvidia_smi), timeout=timeout)
        if gpus.returncode != 0:
            said = (gpus.stdout.strip() or gpus.stderr.strip() or "no output").splitlines()[0][:200]
            why = f"not found there (remotes.{name}.nvidia_smi)" if gpus.returncode == 127 else said
            return gpu_smi.failed(f"nvidia-smi on {name} exited {gpus.returncode}: {why}", taken)
        apps = conn.run(gpu_smi.apps_argv(spec.nvidia_smi), timeout=timeout)
        apps_csv = apps.stdout if apps.returncode == 0 else ""
        snap = gpu_smi.parse(gpus.stdout, apps_csv, None, taken_at=taken, host=name)
        if not any(d.unified for d in snap.devices):
            return snap
        mem = conn.run(["cat", "/proc/meminfo"], timeout=timeout)  # a GB10: totals from there
    return gpu_smi.parse(gpus.stdout, apps_csv, mem.stdout if mem.returncode == 0 else None,
                         taken_at=taken, host=name)


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    """The ``remote-gpu`` job (off while ``remote.gpu_hosts`` is empty)."""
    hosts = ctx.settings["remote.gpu_hosts"]
    if not hosts:
        return JobReport("off (remote.gpu_hosts is empty)", acted=False)
    taken = epoch(now)
    lines, failed, samples = [], [], []
    for name in hosts:
        try:
            snap = read(ctx.settings, name, now=taken)
        except remote.RemoteError as exc:
            remote.save_state(ctx.store.ops, ctx.host, KIND, name, "error", str(exc), now=taken)
            failed.append(name)
            lines.append(f"{name}: {exc}")
            continue
        status = "ok" if snap.available else "error"
        remote.save_state(ctx.store.ops, ctx.host, KIND, name, status, snap.reason, snap.as_dict(), now=taken)
        if not snap.available:
            failed.append(name)
        lines.append(f"{name}: {snap.reason}")
        samples += [{
            "created_at": taken, "host": name, "device": d.index, "name": d.name,
            "utilization_pct": d.utilization_pct, "memory_used_mb": d.memory_used_mb,
            "memory_total_mb": d.memory_total_mb, "temperature_c": d.temperature_c, "power_w": d.power_w,
            "unified": int(d.unified), "processes": len(snap.processes_on(d.index)),
        } for d in snap.devices]
    if samples:
        with ctx.store.ops.write() as conn:
            conn.execute(insert(ops_gpu_samples), samples)
    summary = "; ".join(lines)
    if failed and len(failed) == len(hosts):
        raise remote.RemoteError(failed[0], f"no remote GPU could be read: {summary}")
    return JobReport(summary, acted=bool(failed), details={"hosts": hosts, "failed": failed})


def snapshots(ops: Database, host: str) -> dict[str, tuple[remote.RemoteState, GpuSnapshot | None]]:
    """What ``host`` last recorded of each remote GPU host: its state and snapshot."""
    return {state.remote: (state, snapshot_from(state.data) if state.data else None)
            for state in remote.states(ops, host, KIND)}


def snapshot_from(data: dict) -> GpuSnapshot:
    """A GpuSnapshot back from its ``as_dict()``."""

    return GpuSnapshot(
        available=data.get("available", False), reason=data.get("reason", ""),
        driver_version=data.get("driver_version"),
        devices=[GpuDevice(**d) for d in data.get("devices", [])],
        processes=[GpuProcess(**p) for p in data.get("processes", [])],
        taken_at=data.get("taken_at", 0.0))
