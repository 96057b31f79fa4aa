"""Actions an operator takes from the app, each audited.

Every button of the app calls one function here. It runs the same library code
the CLI and the runner use (the state machine, the jobs under their locks, the
watchdog's pieces) and writes one ``ops_audit`` row: who, when, what, on what, with
which parameters, and the result (``ok``, ``refused`` with the library's message,
or ``error``). An action never raises: the page shows :attr:`ActionResult.message`.
"""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import desc, insert, select

from sparkops.board import model, queries
from sparkops.board import transitions as board
from sparkops.core.clock import epoch
from sparkops.core.errors import NotFound, Refused, SparkOpsError
from sparkops.engine import reclaim, workspace
from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu
from sparkops.runner.registry import run_job
from sparkops.storage.schema import ops_audit
from sparkops.watch import services, zombie_rule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActionResult:
    ok: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)


def perform(ctx: JobContext, actor: str, action: str, target: str | None, params: dict[str, Any],
            fn: Callable[[], Any], *, now: float | None = None) -> ActionResult:
    """Run ``fn`` and audit it. ``fn`` returns a message, an ActionResult, or anything."""
    ts = epoch(now)
    try:
        value = fn()
        result = value if isinstance(value, ActionResult) else ActionResult(True, str(value))
        outcome = "ok" if result.ok else "refused"
    except SparkOpsError as err:
        result, outcome = ActionResult(False, str(err)), "refused"
    except Exception as exc:  # noqa: BLE001 - the page shows a message, never a traceback
        log.error("action %s on %s failed: %s\n%s", action, target, exc, traceback.format_exc().rstrip())
        result, outcome = ActionResult(False, f"{action} failed: {type(exc).__name__}: {exc}"), "error"
    try:
        with ctx.store.ops.write() as conn:
            conn.execute(insert(ops_audit).values(
                created_at=ts, actor=actor, action=action, target=target,
                params=json.dumps(params, default=str) if params else None, result=outcome,
                message=result.message[:2000]))
    except Exception as exc:  # noqa: BLE001 - the action happened; say so even if the audit failed
        log.error("could not audit %s: %s", action, exc)
    return result


def audit_log(ops_db, *, since: int | None = None, limit: int = 200) -> list[dict[str, Any]]:
    query = select(ops_audit).order_by(desc(ops_audit.c.id)).limit(limit)
    if since is not None:
        query = query.where(ops_audit.c.created_at >= since)
    with ops_db.read() as conn:
        return [dict(r._mapping) for r in conn.execute(query)]


# -- tasks ----------------------------------------------------------------------------------


def create_task(ctx: JobContext, actor: str, title: str, *, body: str | None = None,
                assignee: str | None = None, priority: int = 0, parents: list[str] | None = None) -> ActionResult:
    params = {"title": title, "assignee": assignee, "priority": priority, "parents": parents or []}

    def do() -> ActionResult:
        task_id = board.create_task(ctx.store.board, title, body=body, assignee=assignee, priority=priority,
                                    parents=parents or (), created_by=actor)
        return ActionResult(True, f"created {task_id}", {"task_id": task_id})
    return perform(ctx, actor, "task.create", None, params, do)


def set_priority(ctx: JobContext, actor: str, task_id: str, priority: int) -> ActionResult:
    def do() -> str:
        was = board.set_priority(ctx.store.board, task_id, priority)
        return f"{task_id}: priority {was} -> {priority}"
    return perform(ctx, actor, "task.priority", task_id, {"priority": priority}, do)


def _change(verb: str, change: model.Change) -> str:
    return f"{verb} {change.task_id}: {change.from_status} -> {change.to_status}"


def block(ctx: JobContext, actor: str, task_id: str, reason: str) -> ActionResult:
    return perform(ctx, actor, "task.block", task_id, {"reason": reason},
                   lambda: _change("blocked", board.block(ctx.store.board, task_id, reason=reason or None)))


def unblock(ctx: JobContext, actor: str, task_id: str) -> ActionResult:
    return perform(ctx, actor, "task.unblock", task_id, {},
                   lambda: _change("unblocked", board.unblock(ctx.store.board, task_id)))


def promote(ctx: JobContext, actor: str, task_id: str, *, force: bool = False) -> ActionResult:
    return perform(ctx, actor, "task.promote", task_id, {"force": force},
                   lambda: _change("promoted", board.promote(ctx.store.board, task_id, actor=actor, force=force)))


def archive(ctx: JobContext, actor: str, task_id: str) -> ActionResult:
    return perform(ctx, actor, "task.archive", task_id, {},
                   lambda: _change("archived", board.archive(ctx.store.board, task_id)))


def requeue(ctx: JobContext, actor: str, task_id: str) -> ActionResult:
    """A blocked, triage or todo task back to ready now, with a fresh failure budget."""
    def do() -> str:
        status = queries.get_task(ctx.store.board, task_id)["status"]
        if status in ("blocked", "scheduled"):
            change = board.unblock(ctx.store.board, task_id)
            if change.to_status == "ready":
                return _change("requeued", change)
            return _change("requeued", board.promote(ctx.store.board, task_id, actor=actor, force=True))
        return _change("requeued", board.promote(ctx.store.board, task_id, actor=actor, force=True))
    return perform(ctx, actor, "task.requeue", task_id, {}, do)


def reclaim_task(ctx: JobContext, actor: str, task_id: str) -> ActionResult:
    """Stop a running task's worker (its recorded processes only), then release the
    claim: the task goes back to ready. Refused when the worker cannot be stopped.
    The same code path as ``sparkops task reclaim`` (:func:`sparkops.engine.reclaim.reclaim_task`)."""
    def do() -> str:
        change, stopped = reclaim.reclaim_task(ctx, task_id, actor=actor)
        return _change("reclaimed", change) + (f" ({'; '.join(stopped)})" if stopped else "")
    return perform(ctx, actor, "task.reclaim", task_id, {}, do)


def comment(ctx: JobContext, actor: str, task_id: str, text: str) -> ActionResult:
    return perform(ctx, actor, "task.comment", task_id, {"length": len(text or "")},
                   lambda: f"comment {board.comment(ctx.store.board, task_id, text, author=actor)} added")


def recreate_workspace(ctx: JobContext, actor: str, task_id: str) -> ActionResult:
    """Re-create a task's missing workspace (the seed's "No such file or directory")."""
    def do() -> str:
        task = queries.get_task(ctx.store.board, task_id)
        path = workspace.path_of(ctx.settings, task_id)
        if path.exists():
            return f"{path} exists already"
        workspace.prepare(ctx.settings, task_id, task["title"], task["body"])
        return f"re-created {path}"
    return perform(ctx, actor, "task.recreate_workspace", task_id, {}, do)


# -- jobs and fixes ----------------------------------------------------------------------------


def run_job_now(ctx: JobContext, actor: str, name: str, **options: Any) -> ActionResult:
    """Run a job now, under its lock (the same function the runner uses)."""
    def do() -> ActionResult:
        result = run_job(ctx, name, trigger="ui", **options)
        text = f"{name}: {result.summary}" + (f" ({result.error})" if result.error else "")
        return ActionResult(result.ok, text, {"details": result.details, "outcome": result.outcome})
    return perform(ctx, actor, f"job.{name}", name, options, do)


def restart_service(ctx: JobContext, actor: str, name: str) -> ActionResult:
    """Run a service's configured restart command now."""

    def do() -> str:
        spec = next((s for s in ctx.settings.services if s.name == name), None)
        if spec is None:
            raise NotFound("service", name)
        if not spec.restart_argv:
            raise Refused(f"services.{name}.restart_argv is not configured; nothing to run")
        proc = services.restart(spec, ctx.settings)
        ctx.restarts.append(proc)
        return f"restarting {name}: {list(spec.restart_argv)} (pid {proc.pid})"
    return perform(ctx, actor, "service.restart", name, {}, do)


def fix_gpu_zombies(ctx: JobContext, actor: str, *, nvml: Any = None) -> ActionResult:
    """Kill the GPU zombies that may be killed, wait for their memory, restart vLLM."""

    def do() -> ActionResult:
        snapshot = gpu.snapshot(nvml=nvml)
        if not snapshot.available:
            raise Refused(f"no GPU information: {snapshot.reason}")
        spec = next((s for s in ctx.settings.services if s.check == "vllm" and s.enabled), None)
        state = services.load_states(ctx.store.ops, ctx.host).get(spec.name) if spec else None
        zombies = zombie_rule.find_zombies(snapshot, ctx.settings, serving_healthy=services.serving_healthy(state),
                                           health_failures=int(state.memory.get("health_failures", 0)) if state else 0,
                                           watched_port=zombie_rule.watched_port(spec))
        killable = [z for z in zombies if z.killable]
        if not killable:
            return ActionResult(True, "no GPU zombie that may be killed" + (
                ": " + "; ".join(zombie_rule.explain(zombies)) if zombies else ""))
        report = zombie_rule.kill_zombies(killable, ctx.settings, nvml=nvml)
        lines = report.lines()
        if spec is not None and spec.restart_argv and any(k.ended for k in report.killed):
            proc = services.restart(spec, ctx.settings)
            ctx.restarts.append(proc)
            lines.append(f"restarted {spec.name} (pid {proc.pid})")
        return ActionResult(True, "; ".join(lines), {"kill": report.as_dict()})
    return perform(ctx, actor, "fix.gpu_zombies", None, {}, do)

