"""The seed's "Common Failures & Fixes", as live diagnoses with a fix each.

:func:`diagnose` answers, for each failure the seed's operators met, "is it
happening now?", with the evidence, and what its fix would do (a dry run). The fix
itself is an audited action (:mod:`sparkops.control.actions`), run after the operator
confirms. Nothing here changes anything.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from sparkops.board import model, queries
from sparkops.board.model import Status
from sparkops.control import actions
from sparkops.core.clock import epoch
from sparkops.engine import reclaim, workspace
from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu
from sparkops.watch import cleanup_plan, disk, services, zombie_rule


@dataclass
class Diagnosis:
    key: str  # what the fix button runs: see FIXES
    title: str  # the seed's words
    happening: bool | None  # None: not checked yet (the watchdog has not looked)
    evidence: list[str] = field(default_factory=list)
    fix: str = ""  # what the fix does, in words
    preview: list[str] = field(default_factory=list)  # what it would do now (dry run)
    target: str | None = None  # a task id, a service name, when the fix needs one
    #: Why this failure cannot happen on this host (what it concerns is not here);
    #: None when it applies.
    not_applicable: str | None = None

    @property
    def applies(self) -> bool:
        return self.not_applicable is None


def not_applicable(title: str, why: str) -> Diagnosis:
    return Diagnosis("none", title, False, not_applicable=why)


def diagnose(ctx: JobContext, *, now: float | None = None, nvml: Any = None) -> list[Diagnosis]:
    ts = epoch(now)
    states = services.load_states(ctx.store.ops, ctx.host)
    specs = {s.name: s for s in ctx.settings.services}
    return [
        _capacity(ctx, ts),
        _vllm(ctx, ts, states, specs, nvml),
        _service(states, specs, "gateway", "reclaim.gateway", "Gateway stopped while an agent was working",
                 "restart the gateway with services.gateway.restart_argv; orphaned runs are then reclaimed"),
        _workspaces(ctx),
        _service(states, specs, "ui", "restart.ui", "Kanban board shows stale data",
                 "restart the board's web server with services.ui.restart_argv"),
        _disk(ctx, ts),
        not_applicable("Traefik cannot start (port 80 in use)",
                       "Traefik runs on the VPS, not on this host; SparkOps does not manage it"),
        not_applicable("Close button not working on mobile",
                       "a bug of the seed's board UI; SparkOps' task detail closes with a real button "
                       "on every screen size"),
    ]


def _capacity(ctx: JobContext, now: int) -> Diagnosis:
    verdicts = [v for v in (reclaim.assess(ctx, r, now=now) for r in reclaim.open_runs(ctx)) if v is not None]
    return Diagnosis(
        "reclaim", '"At capacity: 1/1 running. Skipping." while nothing runs', bool(verdicts),
        [f"{v.task_id} run {v.run_id}: {v.reason}" for v in verdicts] or ["every open run has a live worker"],
        "run the reclaimer: close the runs whose worker is gone, silent or over its time; their tasks go "
        "back to ready (or blocked at the failure limit)",
        [f"would close {v.task_id} run {v.run_id} as {v.outcome}" for v in verdicts])


def _vllm(ctx: JobContext, now: int, states: dict, specs: dict, nvml: Any) -> Diagnosis:
    title = "vLLM crashed (GPU OOM): a zombie holds GPU memory"
    spec = next((s for s in specs.values() if s.check == "vllm" and s.enabled), None)
    state = states.get(spec.name) if spec else None
    snapshot = gpu.snapshot(nvml=nvml, now=now)
    absent = spec is None or (state is not None and state.status == services.NOT_CONFIGURED)
    if absent and not snapshot.available:
        served = (f"{spec.name} is not configured here ({state.detail}); {spec.toggle_hint()}" if spec
                  else "no vLLM service is watched here (services.*.check = \"vllm\")")
        return not_applicable(title, f"{served}, and this host has no GPU to read ({snapshot.reason})")
    evidence = [f"{spec.name}: {services.status_words(state.status)} ({state.detail})" if state else
                f"{spec.name}: not checked yet" if spec else "no vLLM service configured"]
    zombies: list = []
    if snapshot.available:
        healthy = services.serving_healthy(state)
        failures = int(state.memory.get("health_failures", 0)) if state else 0
        zombies = zombie_rule.find_zombies(snapshot, ctx.settings, serving_healthy=healthy, health_failures=failures,
                                           watched_port=zombie_rule.watched_port(spec))
        used = sum(p.used_memory_mb or 0 for p in snapshot.processes) / 1024
        evidence.append(f"GPU: {len(snapshot.processes)} processes holding {used:.0f} GiB")
    else:
        evidence.append(f"GPU: {snapshot.reason}")
    down = state is not None and state.status in ("down", "gave_up")
    checked = state is not None or spec is None
    return Diagnosis(
        "gpu_zombies", title, bool(zombies) or down if checked or zombies else None, evidence,
        "kill the GPU zombies that match gpu.kill_patterns (SIGTERM, grace, SIGKILL), wait for the memory, "
        "then restart vLLM with its restart_argv",
        zombie_rule.explain(zombies) + ([f"then restart {spec.name}: {list(spec.restart_argv)}"]
                                        if spec and spec.restart_argv else ["no restart_argv for vLLM: not restarted"]),
        spec.name if spec else None)


def _service(states: dict, specs: dict, name: str, key: str, title: str, fix: str) -> Diagnosis:
    spec, state = specs.get(name), states.get(name)
    if spec is None or not spec.enabled:
        return not_applicable(title, f"service {name} is not watched here"
                              + (f"; {spec.toggle_hint()}" if spec else ""))
    if state is not None and state.status == services.NOT_CONFIGURED:
        return not_applicable(title, f"{name} is not configured here ({state.detail}); {spec.toggle_hint()}")
    happening = None if state is None else state.status in ("down", "gave_up", "restarting")
    since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(state.since)) if state else ""
    evidence = [f"{name}: {services.status_words(state.status)} since {since} ({state.detail})" if state
                else f"{name}: not checked yet (the watchdog checks it when the jobs runner starts)"]
    preview = [f"would run {list(spec.restart_argv)}"] if spec.restart_argv else \
        [f"services.{name}.restart_argv is not configured: nothing to run"]
    return Diagnosis(f"restart.{name}", title, happening, evidence, fix, preview, name)


def _workspaces(ctx: JobContext) -> Diagnosis:
    missing = []
    for status in (Status.RUNNING, Status.READY):
        for task in queries.list_tasks(ctx.store.board, status=status, limit=500):
            # one that has had a workspace: the root and the (plain) id, as the shim makes it
            # (the row's workspace_path only says there was one; it is data, not a path to use)
            if not model.is_safe_id(task["id"]) or not queries.get_task(ctx.store.board, task["id"])["workspace_path"]:
                continue
            path = workspace.path_of(ctx.settings, task["id"])
            if not path.exists():
                missing.append((task["id"], str(path)))
    return Diagnosis(
        "workspace", '"No such file or directory": a task\'s workspace is missing', bool(missing),
        [f"{t}: {p} is missing" for t, p in missing] or ["every running or ready task's workspace exists"],
        "re-create the workspace (and its TASK.md); the next dispatch would also re-create it",
        [f"would re-create {p}" for _, p in missing], missing[0][0] if missing else None)


def _disk(ctx: JobContext, now: int) -> Diagnosis:
    usage = disk.usage(ctx.settings["disk.paths"])
    threshold = ctx.settings["disk.threshold_percent"]
    over = [u for u in usage if not u.error and u.percent > threshold]
    plan = cleanup_plan.plan_cleanup(ctx, now=now)
    return Diagnosis(
        "disk", f"Disk above {threshold:g}%", bool(over),
        [f"{u.path}: {u.percent:.0f}% used" for u in usage],
        "delete logs older than the retention and workspaces of long-finished tasks, inside the "
        "configured roots only",
        [f"would delete {c.path} ({c.kind}, {c.age_days:.0f} days old)" for c in plan.candidates[:20]]
        + ([f"... and {len(plan.candidates) - 20} more"] if len(plan.candidates) > 20 else [])
        or ["nothing old enough to delete"])


def apply(ctx: JobContext, actor: str, key: str, target: str | None = None, *, nvml: Any = None):
    """Run the fix of diagnosis ``key`` (after the operator confirmed it); audited."""

    if key == "reclaim":
        return actions.run_job_now(ctx, actor, "reclaim")
    if key == "gpu_zombies":
        return actions.fix_gpu_zombies(ctx, actor, nvml=nvml)
    if key.startswith("restart."):
        return actions.restart_service(ctx, actor, key.split(".", 1)[1])
    if key == "workspace" and target:
        return actions.recreate_workspace(ctx, actor, target)
    if key == "disk":
        return actions.run_job_now(ctx, actor, "disk", force=True)
    return actions.perform(ctx, actor, f"fix.{key}", target, {},
                           lambda: actions.ActionResult(False, f"there is no fix for {key!r} on this host"))
