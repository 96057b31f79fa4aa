"""The watchdog job: services, vLLM, GPU zombies and stale runs, in one pass.

:func:`run` (the ``watchdog`` job, every ``watchdog.interval_seconds``):

1. checks every enabled service (:mod:`sparkops.watch.services`) and decides, from its
   remembered state, whether it is up, down, to be restarted, or given up on;
2. applies the GPU zombie rule (:mod:`sparkops.meters.gpu`): kills the zombies that match
   ``gpu.kill_patterns`` (SIGTERM, grace, SIGKILL), waits for their memory to be
   released, then restarts the model server;
3. restarts the services that need it (``restart_argv``, never a shell);
4. sends the alerts (:mod:`sparkops.watch.alerts`: cooldown, recovery, records);
5. reports the runs the reclaimer would close now (it closes them itself).

Disk usage and cleanup is its own job (``disk``, :mod:`sparkops.watch.disk`). With
``dry_run`` the pass checks everything and says what it would do, changing nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sparkops.config import ServiceSpec
from sparkops.core.clock import epoch
from sparkops.engine import reclaim
from sparkops.jobs.framework import JobContext, JobReport
from sparkops.meters import gpu
from sparkops.watch import alerts, services, zombie_rule
from sparkops.watch.alerts import Alert
from sparkops.watch.services import Decision, ServiceState

log = logging.getLogger(__name__)


@dataclass
class Pass:
    """What one watchdog pass found and did."""

    lines: list[str] = field(default_factory=list)
    acted: bool = False
    details: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def say(self, line: str, *, acted: bool = False, problem: bool = False) -> None:
        self.lines.append(line)
        self.acted = self.acted or acted
        if problem:
            self.problems.append(line)


def run(ctx: JobContext, *, now: float | None = None, dry_run: bool = False,
        nvml: Any = None) -> JobReport:
    """One watchdog pass (see the module docstring). ``nvml``: the NVML module to
    use (tests pass a fake; default: the real one, if any)."""
    ts = epoch(now)
    report = Pass()
    decisions = check_services(ctx, ts, report)
    vllm = next(((spec, d) for spec, d in decisions if spec.check == "vllm"), None)
    zombies_killed = handle_gpu(ctx, ts, report, vllm, dry_run=dry_run, nvml=nvml)
    if vllm is not None and zombies_killed and not vllm[1].restart:
        _force_restart(vllm[0], vllm[1], ts, report)
    for spec, decision in decisions:
        apply(ctx, spec, decision, ts, report, dry_run=dry_run)
    report_stale(ctx, ts, report)
    summary = ("; ".join(report.lines) or "all well") + _unchecked_note(report)
    return JobReport(("dry run: " if dry_run else "") + summary, acted=report.acted and not dry_run,
                     details=report.details, problems=tuple(report.problems))


def check_services(ctx: JobContext, now: int, report: Pass) -> list[tuple[ServiceSpec, Decision]]:
    states = services.load_states(ctx.store.ops, ctx.host)
    decisions = []
    for spec in ctx.settings.services:
        if not spec.enabled:
            continue
        state = states.get(spec.name) or ServiceState(spec.name, since=now)
        result = services.check(spec, secrets=ctx.secrets, memory=state.memory, now=now)
        decision = services.assess(spec, result, state, now=now)
        # the health-failure streak the zombie rule counts is not reset by restarts
        failed = not result.ok and decision.state.status != services.NOT_CONFIGURED
        streak = int(state.memory.get("health_failures", 0)) + 1 if failed else 0
        decision.state.memory["health_failures"] = streak
        decisions.append((spec, decision))
        report.details.setdefault("services", {})[spec.name] = {
            "status": decision.state.status, "detail": result.detail, "ok": result.ok}
    return decisions


def handle_gpu(ctx: JobContext, now: int, report: Pass, vllm: tuple[ServiceSpec, Decision] | None,
               *, dry_run: bool, nvml: Any = None) -> bool:
    """The zombie rule; returns True when a zombie was killed."""
    snapshot = gpu.snapshot(nvml=nvml, now=now)
    report.details["gpu"] = {"available": snapshot.available, "reason": snapshot.reason,
                             "devices": len(snapshot.devices), "processes": len(snapshot.processes)}
    if not snapshot.available:
        return False
    healthy = services.serving_healthy(vllm[1].state if vllm else None)
    failures = int(vllm[1].state.memory.get("health_failures", 0)) if vllm else 0
    zombies = zombie_rule.find_zombies(snapshot, ctx.settings, serving_healthy=healthy, health_failures=failures,
                                       watched_port=zombie_rule.watched_port(vllm[0] if vllm else None))
    if not zombies:
        return False
    plan = zombie_rule.explain(zombies)
    report.details["zombies"] = plan
    if dry_run:
        report.say("GPU zombies: " + "; ".join(plan), problem=True)
        return False
    killable = [z for z in zombies if z.killable]
    if not killable:
        report.say("GPU zombies found, none may be killed: " + "; ".join(plan), problem=True)
        alerts.notify(ctx, Alert("gpu:zombies", "error", "GPU zombies found (not killed)", "\n".join(plan)),
                      now=now)
        return False
    result = zombie_rule.kill_zombies(killable, ctx.settings, nvml=nvml)
    ended = [k for k in result.killed if k.ended]
    report.details["kill"] = result.as_dict()
    report.say(result.summary(), acted=True, problem=True)
    left = [line for line in plan if "would leave" in line]
    alerts.notify(ctx, Alert("gpu:zombies", "error", f"GPU zombies: {len(ended)} killed",
                             "\n".join(result.lines() + left)), now=now)
    return bool(ended)


def _force_restart(spec: ServiceSpec, decision: Decision, now: int, report: Pass) -> None:
    """After zombies were killed, restart the model server (within its restart limit)."""
    state = decision.state
    window = spec.restart_window_minutes * 60
    recent = [t for t in state.restarts if now - t < window]
    if not spec.restart_argv:
        report.say(f"{spec.name}: no restart_argv configured, not restarted after the zombie kill")
        return
    if len(recent) >= spec.restart_limit:
        report.say(f"{spec.name}: not restarted after the zombie kill ({len(recent)} restarts in "
                   f"{spec.restart_window_minutes:g} min already)")
        return
    state.restarts = recent + [now]
    state.last_restart_at, state.status, state.consecutive_failures = now, "restarting", 0
    decision.restart = True


def apply(ctx: JobContext, spec: ServiceSpec, decision: Decision, now: int, report: Pass,
          *, dry_run: bool) -> None:
    state = decision.state
    if dry_run:
        if decision.restart:
            report.say(f"would restart {spec.name}: {list(spec.restart_argv)}", problem=True)
        elif decision.alert:
            report.say(f"would alert: {decision.alert[1]}", problem=decision.alert[0] != "recovery")
        elif state.status not in ("up", services.NOT_CONFIGURED):
            report.say(f"{spec.name} {services.status_words(state.status)}: {state.detail}", problem=True)
        return
    if decision.restart:
        try:
            proc = services.restart(spec, ctx.settings)
            ctx.restarts.append(proc)
            report.say(f"restarted {spec.name} (pid {proc.pid})", acted=True)
        except OSError as exc:
            report.say(f"cannot restart {spec.name}: {exc}", acted=True)
            state.detail = f"restart failed: {exc}"
    _reap_restart_commands(ctx)
    services.save_state(ctx.store.ops, ctx.host, state)
    if decision.alert:
        level, title, message = decision.alert
        alerts.notify(ctx, Alert(f"service:{spec.name}", level, title, message), now=now)
        report.say(title, acted=True, problem=level != "recovery")
    elif state.status not in ("up", services.NOT_CONFIGURED):
        report.say(f"{spec.name} {services.status_words(state.status)}: {state.detail}", problem=True)


def _unchecked_note(report: Pass) -> str:
    """What the pass could not look at, so that "all well" is never more than it saw."""
    notes = []
    absent = [name for name, s in report.details.get("services", {}).items()
              if s["status"] == services.NOT_CONFIGURED]
    if absent:
        notes.append("not configured here (not found): " + ", ".join(absent))
    if not report.details.get("services"):
        notes.append("no service is watched")
    gpu_seen = report.details.get("gpu") or {}
    if not gpu_seen.get("available", True):
        notes.append(f"GPU not checked: {gpu_seen.get('reason') or 'no NVML'}")
    return f" ({'; '.join(notes)})" if notes else ""


def _reap_restart_commands(ctx: JobContext) -> None:
    """Restart commands that exited (``systemctl restart``, a script) are reaped."""
    ctx.restarts[:] = [p for p in ctx.restarts if p.poll() is None]


def report_stale(ctx: JobContext, now: int, report: Pass) -> None:
    """The reclaimer's check, reported (the reclaim job acts on it)."""
    verdicts = [v for v in (reclaim.assess(ctx, row, now=now) for row in reclaim.open_runs(ctx))
                if v is not None]
    report.details["stale"] = [v.as_dict() for v in verdicts]
    if verdicts:
        report.say(f"{len(verdicts)} stale run(s) for the reclaimer: "
                   + ", ".join(f"{v.task_id} ({v.reason})" for v in verdicts), problem=True)
