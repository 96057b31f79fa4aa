"""Every job, by name: the one module that lists them (and so imports every job
module). The runner schedules them, the CLI's ``job run`` and the app's buttons
run one now; all three through :func:`run_job`, under the job's lock and recorded."""

from __future__ import annotations

from typing import Any

from sparkops.engine import dispatch, promote, reclaim
from sparkops.jobs.framework import JobContext, JobRun, JobSpec
from sparkops.jobs.framework import run_job as _run
from sparkops.meters import gpu
from sparkops.remote import gpu as remote_gpu
from sparkops.remote import push, tunnel
from sparkops.sprint import export, review
from sparkops.watch import disk, watchdog


def all_jobs() -> dict[str, JobSpec]:
    """Every job, by name, in the order the pages list them."""
    jobs = [
        JobSpec("dispatch", dispatch.run, "dispatch.interval_seconds",
                "Reap dead local runs, then claim ready tasks into free slots and start workers."),
        JobSpec("reclaim", reclaim.run, "reclaim.interval_seconds",
                "Close runs whose worker is gone, silent or over its max runtime; requeue the task."),
        JobSpec("promote", promote.run, "runner.promote_interval_seconds",
                "Promote todo tasks whose parents are all finished.", fleet=True),
        JobSpec("watchdog", watchdog.run, "watchdog.interval_seconds",
                "Check the services and vLLM, restart what is down, kill GPU zombies, report stale runs.",
                background=True, at_start=True),
        JobSpec("disk", disk.run, "watchdog.interval_seconds",
                "Above disk.threshold_percent, delete old logs and finished workspaces.",
                background=True, at_start=True),
        JobSpec("gpu-sample", gpu.sample, "gpu.sample_interval_seconds",
                "Store one GPU sample per device for the GPU page; prune old samples.", background=True, at_start=True),
        JobSpec("review", review.run, "review.interval_seconds",
                "Record phase boundaries; write the sprint review report (metrics, phases, risks, narrative).",
                fleet=True, background=True, at_start=True),
        JobSpec("export", export.run, "export.interval_seconds",
                "Write the board as CSV and JSON into export.dir (the files replaced atomically).",
                background=True),
        JobSpec("push", push.run, "remote.push_interval_seconds",
                "Copy the latest export to remote.push_host over SFTP (only changed files, each "
                "renamed into place whole).", background=True, needs="remote.push_host"),
        JobSpec("tunnel", tunnel.run, "remote.tunnel_interval_seconds",
                "Keep the reverse tunnel to the app open on remote.tunnel_host: probe it end to end, "
                "reconnect with backoff.", background=True, needs="remote.tunnel_host"),
        JobSpec("remote-gpu", remote_gpu.run, "remote.gpu_interval_seconds",
                "Read the GPUs of remote.gpu_hosts over SSH with nvidia-smi, for the GPU page.",
                background=True, needs="remote.gpu_hosts"),
    ]
    return {spec.name: spec for spec in jobs}


def run_job(ctx: JobContext, name: str, *, now: float | None = None, trigger: str = "cli",
            specs: dict[str, JobSpec] | None = None, **options: Any) -> JobRun:
    """Run job ``name`` of ``specs`` (default: every job) once, under its lock, and
    record it (see :func:`sparkops.jobs.framework.run_job`)."""
    return _run(ctx, name, specs if specs is not None else all_jobs(), now=now, trigger=trigger, **options)

