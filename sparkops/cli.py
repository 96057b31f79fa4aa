"""``python -m sparkops``: the command line for agents, scripts and operators.

Thin over the library: parse, call one library function, print. Library errors
become one line on stderr and an exit code: 0 ok, 1 not found or refused,
2 bad usage, bad configuration or an unusable database.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
import threading
import time
from typing import Any, Callable, Sequence

from sqlalchemy.exc import DBAPIError

from sparkops import __version__, board, fleet, queries
from sparkops.config import SETTINGS, Settings, load_secrets, load_settings, mask_url
from sparkops.db import retrying
from sparkops.errors import ConfigError, InvalidInput, NotFound, SparkOpsError, StorageError
from sparkops.store import Store, open_store

log = logging.getLogger("sparkops")

STATUS_MARK = {
    "triage": "?", "todo": "·", "scheduled": "⏲", "ready": "▶", "running": "●",
    "blocked": "■", "review": "◆", "done": "✓", "archived": "x",
}


# -- output helpers -----------------------------------------------------------------


def _when(ts: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


def _duration(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def _emit(args: argparse.Namespace, value: Any, text: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        _print_json(value)
    else:
        text()


# -- commands -----------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings, create=True)
    try:
        info = {
            "config": settings.describe_source(),
            "board": store.board.display_url,
            "ops": store.ops.display_url,
        }
        _emit(args, info, lambda: print(
            f"board: {info['board']}\nops:   {info['ops']}\nconfig: {info['config']}\n"
            "Ready. Create a task with: python -m sparkops task create \"Title\""))
    finally:
        store.dispose()
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the board (and the ops data) into an empty database, verified."""
    from sparkops import migrate
    from sparkops.db import Database

    busy = settings["storage.busy_timeout_ms"]
    board_from = args.source or settings["storage.board_url"]
    ops_from = args.ops_source or (None if args.source else settings["storage.ops_url"])
    ops_to = args.ops_target or args.target
    pairs = [("board", Database(board_from, role="board", busy_timeout_ms=busy),
              Database(args.target, role="board", busy_timeout_ms=busy))]
    if ops_from and not args.board_only:
        pairs.append(("ops", Database(ops_from, role="ops", busy_timeout_ms=busy),
                      Database(ops_to, role="ops", busy_timeout_ms=busy)))
    quiet = getattr(args, "json", False)
    try:
        report = migrate.migrate(pairs, progress=(lambda _line: None) if quiet else
                                 (lambda line: print(line, file=sys.stderr, flush=True)))
    finally:
        for _component, source, target in pairs:
            source.dispose()
            target.dispose()
    _emit(args, report.as_dict(), lambda: print(
        f"Copied {report.rows:,} rows in {len(report.tables)} tables in {report.seconds:.1f}s; "
        "counts and checksums match.\n"
        + "".join(f"{c}: {report.source[c]} -> {report.target[c]}\n" for c in report.source)
        + ("WARNING: the source changed while it was copied (is a jobs runner still running?); "
           "the copy is its state at the start.\n" if report.source_changed else "")
        + "Point storage.board_url and storage.ops_url at the target to use it."))
    return 0


def cmd_task_create(args, store: Store) -> int:
    body = args.body
    if args.body_file:
        try:
            with open(args.body_file, encoding="utf-8") as fh:
                body = fh.read()
        except OSError as exc:
            raise InvalidInput(f"cannot read --body-file {args.body_file}: {exc.strerror}") from exc
    requirements = fleet.parse_labels(args.require or (), what="--require")  # before anything is written
    task_id = board.create_task(
        store.board, args.title, body=body, assignee=args.assignee, priority=args.priority,
        parents=args.parent or (), triage=args.triage, created_by=args.created_by or _actor(),
        max_runtime_seconds=args.max_runtime, max_retries=args.max_retries,
        idempotency_key=args.idempotency_key,
    )
    if requirements:
        fleet.require(store.board, store.ops, task_id, requirements)
    _emit(args, queries.get_task(store.board, task_id) if args.json else None,
          lambda: print(task_id))
    return 0


def cmd_task_list(args, store: Store) -> int:
    rows = queries.list_tasks(store.board, status=args.status, assignee=args.assignee,
                              include_archived=args.archived, limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no tasks)")
        for r in rows:
            print(f"{STATUS_MARK.get(r['status'], ' ')} {r['id']}  {r['status']:<9} "
                  f"{(r['assignee'] or '(unassigned)'):<20} p{r['priority'] or 0:<3} {r['title']}")
    _emit(args, rows, text)
    return 0


def cmd_task_show(args, store: Store) -> int:
    detail = queries.task_detail(store.board, args.task_id)

    def text() -> None:
        t = detail["task"]
        print(f"Task {t['id']}: {t['title']}")
        print(f"  status:    {t['status']}")
        print(f"  assignee:  {t['assignee'] or '(unassigned)'}")
        print(f"  priority:  {t['priority'] or 0}")
        print(f"  created:   {_when(t['created_at'])} by {t['created_by'] or '-'}")
        print(f"  started:   {_when(t['started_at'])}")
        print(f"  completed: {_when(t['completed_at'])}")
        if t["consecutive_failures"]:
            print(f"  failures:  {t['consecutive_failures']} ({t['last_failure_error'] or ''})")
        if detail["parents"]:
            print(f"  parents:   {', '.join(detail['parents'])}")
        if detail["children"]:
            print(f"  children:  {', '.join(detail['children'])}")
        if t["body"]:
            print(f"\nBody:\n{t['body']}")
        if t["result"]:
            print(f"\nResult:\n{t['result']}")
        if detail["comments"]:
            print(f"\nComments ({len(detail['comments'])}):")
            for c in detail["comments"]:
                print(f"  [{_when(c['created_at'])}] {c['author']}: {c['body']}")
        print(f"\nEvents ({len(detail['events'])}):")
        for e in detail["events"]:
            run = f"[run {e['run_id']}] " if e["run_id"] else ""
            payload = f" {json.dumps(e['payload'], ensure_ascii=False)}" if e["payload"] else ""
            print(f"  [{_when(e['created_at'])}] {run}{e['kind']}{payload}")
        print(f"\nRuns ({len(detail['runs'])}):")
        _print_runs(detail["runs"])
    _emit(args, detail, text)
    return 0


def _print_runs(runs: list[dict]) -> None:
    now = int(time.time())
    for r in runs:
        ended = r["ended_at"]
        elapsed = (ended or now) - r["started_at"]
        print(f"  #{r['id']:<4} {r['outcome'] or r['status']:<18} {r['task_id']}  "
              f"@{r['profile'] or '-':<12} {_duration(elapsed):>7}  {_when(r['started_at'])}")
        detail = r["summary"] or r["error"]
        if detail:
            print(f"        → {detail.strip().splitlines()[0][:200]}")


def _actor() -> str:
    """Who is acting: the Hermes profile of an agent, else the login name."""
    return os.environ.get("HERMES_PROFILE") or getpass.getuser()


def _run_for(args, task_id: str) -> int | None:
    """``--run``, or the worker's own run when a worker reports on its own task."""
    if args.run is not None:
        return args.run
    if os.environ.get("SPARKOPS_TASK_ID") == task_id and os.environ.get("SPARKOPS_RUN_ID"):
        try:
            return int(os.environ["SPARKOPS_RUN_ID"])
        except ValueError:
            raise InvalidInput("SPARKOPS_RUN_ID must be a run number") from None
    return None


def _report(args, change: board.Change, verb: str) -> int:
    run = f" (run {change.run_id})" if change.run_id else ""
    _emit(args, change.as_dict(),
          lambda: print(f"{verb} {change.task_id}: {change.from_status} -> {change.to_status}{run}"))
    return 0


def cmd_task_complete(args, store: Store) -> int:
    metadata = None
    if args.metadata:
        try:
            metadata = json.loads(args.metadata)
        except ValueError:
            raise InvalidInput("--metadata must be a JSON object, e.g. '{\"tests\": 12}'") from None
        if not isinstance(metadata, dict):
            raise InvalidInput("--metadata must be a JSON object, e.g. '{\"tests\": 12}'")
    change = board.complete(store.board, args.task_id, run_id=_run_for(args, args.task_id),
                            result=args.result, summary=args.summary, metadata=metadata)
    return _report(args, change, "Completed")


def cmd_task_block(args, store: Store) -> int:
    reason = " ".join(args.reason).strip() or None
    change = board.block(store.board, args.task_id, reason=reason, kind=args.kind,
                         run_id=_run_for(args, args.task_id))
    return _report(args, change, "Blocked")


def cmd_task_unblock(args, store: Store) -> int:
    return _report(args, board.unblock(store.board, args.task_id), "Unblocked")


def cmd_task_promote(args, store: Store) -> int:
    change = board.promote(store.board, args.task_id, actor=args.actor or _actor(),
                           reason=args.reason, force=args.force)
    return _report(args, change, "Promoted")


def cmd_task_archive(args, store: Store) -> int:
    return _report(args, board.archive(store.board, args.task_id), "Archived")


def cmd_task_comment(args, store: Store) -> int:
    author = args.author or _actor()
    comment_id = board.comment(store.board, args.task_id, " ".join(args.text), author=author)
    _emit(args, {"task_id": args.task_id, "comment_id": comment_id},
          lambda: print(f"Comment added to {args.task_id}"))
    return 0


def cmd_task_link(args, store: Store) -> int:
    board.link(store.board, args.parent_id, args.child_id)
    _emit(args, {"parent": args.parent_id, "child": args.child_id},
          lambda: print(f"Linked {args.parent_id} -> {args.child_id}"))
    return 0


def cmd_task_require(args, store: Store) -> int:
    labels = fleet.require(store.board, store.ops, args.task_id, args.labels)
    _emit(args, {"task": args.task_id, "requires": labels},
          lambda: print(f"{args.task_id} runs only on hosts labelled: {', '.join(labels)}"))
    return 0


def cmd_task_unrequire(args, store: Store) -> int:
    queries.get_task(store.board, args.task_id)  # NotFound for a wrong id
    labels = fleet.unrequire(store.ops, args.task_id, args.labels or None)
    _emit(args, {"task": args.task_id, "requires": labels},
          lambda: print(f"{args.task_id} requires: {', '.join(labels) or 'nothing (any host)'}"))
    return 0


def cmd_hosts(args, store: Store) -> int:
    found = fleet.hosts(store.ops, store.board, timeout_seconds=args.settings["reclaim.heartbeat_timeout_seconds"])

    def text() -> None:
        if not found:
            print("(no jobs runner has registered yet)")
        for h in found:
            gpus = ", ".join(d.get("name") or "?" for d in h.gpu.get("devices", [])) or "no GPU"
            print(f"{h.host:<20} {h.state:<8} runs {h.open_runs}/{h.capacity or '?'}  heartbeat {h.heartbeat_age}s ago  "
                  f"v{h.version or '?'}  {gpus}  {' '.join(h.labels)}")
    _emit(args, [h.as_dict() for h in found], text)
    return 0


def cmd_runs(args, store: Store) -> int:
    rows = queries.list_runs(store.board, task_id=args.task_id, active_only=args.active,
                             limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no runs)")
        _print_runs(rows)
    _emit(args, rows, text)
    return 0


def cmd_events(args, store: Store) -> int:
    since = int(time.time()) - args.since if args.since is not None else None
    rows = queries.list_events(store.board, task_id=args.task_id, since=since,
                               kinds=args.kind, limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no events)")
        for e in reversed(rows):
            run = f"[run {e['run_id']}] " if e["run_id"] else ""
            payload = f" {json.dumps(e['payload'], ensure_ascii=False)}" if e["payload"] else ""
            print(f"[{_when(e['created_at'])}] {e['task_id']} {run}{e['kind']}{payload}")
    _emit(args, rows, text)
    return 0


def cmd_stats(args, store: Store) -> int:
    stats = queries.board_stats(store.board)

    def text() -> None:
        total = sum(stats["by_status"].values())
        print(f"{total} tasks ({stats['archived']} archived not counted), {stats['open']} open, "
              f"{stats['active_runs']} running runs")
        for status, count in stats["by_status"].items():
            print(f"  {status:<10} {count}")
        if stats["by_assignee"]:
            print("By assignee:")
            for who, counts in stats["by_assignee"].items():
                print(f"  {who:<20} " + ", ".join(f"{s} {n}" for s, n in counts.items()))
        age = stats["oldest_ready_age_seconds"]
        print(f"Oldest ready task: {_duration(age) if age is not None else 'none'}")
    _emit(args, stats, text)
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    values = {s.key: (mask_url(v) if s.kind == "url" else str(v) if s.kind == "path" else v)
              for s in SETTINGS for v in [settings[s.key]]}

    def text() -> None:
        print(f"# from {settings.describe_source()}")
        for key, value in values.items():
            print(f"{key} = {value!r}")
    _emit(args, {"source": settings.describe_source(), "settings": values}, text)
    return 0


def cmd_job_list(args, store: Store) -> int:
    from sparkops.jobs import registry

    settings = args.settings
    specs = registry()
    rows = [{"name": s.name, "every_seconds": s.interval(settings), "setting": s.interval_setting,
             "help": s.help} for s in specs.values()]

    def text() -> None:
        for r in rows:
            print(f"{r['name']:<10} every {r['every_seconds']:g}s ({r['setting']})  {r['help']}")
    _emit(args, rows, text)
    return 0


def _run_job(args, store: Store, name: str, **options) -> int:
    from sparkops.jobs import JobContext, run_job

    ctx = JobContext.create(args.settings, store, secrets=load_secrets())
    result = run_job(ctx, name, trigger="cli", **options)
    payload = {"job": result.job, "outcome": result.outcome, "summary": result.summary,
               "error": result.error, "duration_seconds": round(result.duration_seconds, 3),
               "details": result.details}

    def text() -> None:
        print(f"{result.job}: {result.outcome}: {result.summary}"
              + (f" ({result.error})" if result.error else ""))
        for verdict in result.details.get("verdicts", []):
            print(f"  {verdict['task_id']} run {verdict['run_id']}: {verdict['outcome']}: {verdict['reason']}")
    _emit(args, payload, text)
    return 0 if result.ok else 1


def cmd_job_run(args, store: Store) -> int:
    return _run_job(args, store, args.name)


def cmd_reclaim(args, store: Store) -> int:
    return _run_job(args, store, "reclaim", dry_run=args.dry_run)


def cmd_watchdog(args, store: Store) -> int:
    return _run_job(args, store, "watchdog", dry_run=args.dry_run)


def cmd_disk(args, store: Store) -> int:
    return _run_job(args, store, "disk", dry_run=args.dry_run, force=args.force)


def cmd_gpu(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops import gpu

    snap = gpu.snapshot()
    _emit(args, snap.as_dict(), lambda: _print_gpus(snap))
    return 0


def _print_gpus(snap, indent: str = "") -> None:
    if not snap.available:
        print(f"{indent}No GPU information: {snap.reason}")
        return
    print(f"{indent}NVIDIA driver {snap.driver_version or '?'}")
    for d in snap.devices:
        memory = (f"{(d.memory_used_mb or 0) / 1024:.1f} / {(d.memory_total_mb or 0) / 1024:.1f} GiB"
                  + (" (unified memory)" if d.unified else ""))
        print(f"{indent}  GPU {d.index}: {d.name}  util {d.utilization_pct if d.utilization_pct is not None else '?'}%"
              f"  {d.temperature_c if d.temperature_c is not None else '?'} C"
              f"  {d.power_w if d.power_w is not None else '?'} W  {memory}")
    for p in snap.processes:
        used = f"{p.used_memory_mb / 1024:.1f} GiB" if p.used_memory_mb is not None else "? GiB"
        print(f"{indent}    pid {p.pid:<8} GPU {p.device_index}  {used:>10}  {(p.command_line or '?')[:100]}")


# -- remote hosts ---------------------------------------------------------------------


def _remote_names(args, settings: Settings) -> list[str]:
    names = args.names or [r.name for r in settings.remotes]
    if not names:
        raise InvalidInput("no remote host is configured; add a [remotes.NAME] table with its address "
                           "(see docs/remote.md)")
    for name in names:
        settings.remote(name)  # ConfigError naming the missing host
    return names


def cmd_remote_check(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops import remote, remote_gpu

    rows = []
    for name in _remote_names(args, settings):
        spec = settings.remote(name)
        roles = [role for role, on in (("push", settings["remote.push_host"] == name),
                                       ("tunnel", settings["remote.tunnel_host"] == name),
                                       ("gpu", name in settings["remote.gpu_hosts"])) if on]
        row: dict[str, Any] = {"name": name, "destination": spec.destination, "roles": roles,
                               "via": spec.jump or None}
        started = time.monotonic()
        try:
            with remote.connect(settings, name) as conn:
                key = conn.transport.get_remote_server_key()
                row.update(ok=True, key=f"{key.get_name()} {remote.fingerprint(key)}",
                           login_ms=round((time.monotonic() - started) * 1000))
            if "gpu" in roles:
                row["gpu"] = remote_gpu.read(settings, name).as_dict()
        except remote.RemoteError as exc:
            row.update(ok=False, error=str(exc))
        rows.append(row)

    def text() -> None:
        for r in rows:
            via = f" via {r['via']}" if r["via"] else ""
            roles = f" [{', '.join(r['roles'])}]" if r["roles"] else ""
            if r["ok"]:
                print(f"{r['name']}: ok: {r['destination']}{via}{roles}, {r['key']}, logged in in {r['login_ms']} ms")
                if "gpu" in r:
                    from sparkops.remote_gpu import snapshot_from

                    _print_gpus(snapshot_from(r["gpu"]), indent="  ")
            else:
                print(f"{r['name']}: FAILED: {r['error']}")
    _emit(args, rows, text)
    return 0 if all(r["ok"] for r in rows) else 1


def cmd_remote_trust(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops import remote

    spec = settings.remote(args.name)
    key = remote.scan_key(settings, args.name)
    offered = f"{key.get_name()} {remote.fingerprint(key)}"
    print(f"{args.name} ({remote.host_entry(spec)}) offers {offered}")
    if args.fingerprint:
        if args.fingerprint.strip() != remote.fingerprint(key):
            print(f"sparkops: error: {args.name} offers {remote.fingerprint(key)}, not {args.fingerprint}; "
                  "nothing was recorded", file=sys.stderr)
            return 1
    elif not args.yes:
        if not sys.stdin.isatty():
            print("sparkops: error: not a terminal, so nobody can confirm the key: pass --fingerprint "
                  "SHA256:... (compared with the key) or --yes; nothing was recorded", file=sys.stderr)
            return 2
        answer = input(f"Record this key in {spec.known_hosts}? Compare it with `ssh-keygen -lf "
                       "/etc/ssh/ssh_host_*_key.pub` on the host first. [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing was recorded")
            return 1
    print(remote.trust(spec, key, replace=args.replace))
    return 0


def cmd_remote_push(args, store: Store) -> int:
    def progress(name: str, sent: int, total: int) -> None:
        if total >= 1_000_000 and not args.json:
            print(f"  {name}: {sent * 100 // max(total, 1)}% of {total / 1e6:.1f} MB", file=sys.stderr)
    if not args.settings["remote.push_host"]:
        raise InvalidInput("no push host: set remote.push_host to one of the [remotes.NAME] hosts")
    return _run_job(args, store, "push", progress=progress)


def cmd_remote_tunnel(args, store: Store) -> int:
    """Hold the tunnel in the foreground (or probe it once with --check)."""
    from sparkops import tunnel
    from sparkops.jobs import JobContext, JobLock, lock_dir
    from sparkops.runner import install_stop_handlers

    settings = args.settings
    name = settings["remote.tunnel_host"]
    if not name:
        raise InvalidInput("no tunnel host: set remote.tunnel_host to one of the [remotes.NAME] hosts")
    if args.check:
        return _run_job(args, store, "tunnel")
    ctx = JobContext.create(settings, store, secrets=load_secrets())
    refused = tunnel.exposure(settings, ctx.secrets)
    if refused:
        raise ConfigError(refused)
    stop = threading.Event()
    install_stop_handlers(stop)
    keeper = tunnel.Tunnel(settings)
    last = None
    with JobLock(lock_dir(settings) / "tunnel.lock"):  # the runner's tunnel job waits meanwhile
        try:
            while not stop.is_set():
                status = tunnel.step_and_record(ctx, keeper)
                line = f"{status.status}: {status.detail}"
                if line != last:
                    print(f"[{time.strftime('%H:%M:%S')}] {line}", flush=True)
                    last = line
                interval = settings["remote.tunnel_interval_seconds"]
                if status.retry_at is not None:  # down: come back when the backoff allows
                    interval = min(interval, max(0.5, status.retry_at - time.time()))
                stop.wait(interval)
        finally:
            keeper.close()
    print("tunnel closed")
    return 0


def cmd_services(args, store: Store) -> int:
    from sparkops import services
    from sparkops.procs import host_name

    host = host_name(args.settings["host.name"])
    states = services.load_states(store.ops, host)
    rows = [{"name": spec.name, "check": spec.check, "enabled": spec.enabled,
             "status": (states[spec.name].status if spec.name in states else "unknown"),
             "since": states[spec.name].since if spec.name in states else None,
             "detail": states[spec.name].detail if spec.name in states else "",
             "restart_configured": bool(spec.restart_argv)} for spec in args.settings.services]

    def text() -> None:
        for r in rows:
            state = r["status"] if r["enabled"] else "disabled"
            print(f"{r['name']:<10} {r['check']:<8} {state:<10} {r['detail']}")
    _emit(args, rows, text)
    return 0


def cmd_alerts(args, store: Store) -> int:
    from sparkops import alerts

    rows = alerts.recent(store.ops, limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no alerts)")
        for r in reversed(rows):
            print(f"[{_when(r['created_at'])}] {r['level']:<8} {r['outcome']:<10} {r['key']}: {r['title']}")
    _emit(args, rows, text)
    return 0


def cmd_review(args, store: Store) -> int:
    return _run_job(args, store, "review")


def cmd_export(args, store: Store) -> int:
    return _run_job(args, store, "export")


def cmd_report(args, store: Store) -> int:
    from sparkops import review

    [latest] = review.latest(store.ops, limit=1) or [None]
    if latest is None:
        raise NotFound("review report", "(none yet; run `python -m sparkops review`)")
    _emit(args, latest, lambda: print(latest["markdown"], end=""))
    return 0


def cmd_metrics(args, store: Store) -> int:
    from sparkops import metrics, phases

    mapping = phases.resolve(store.board, store.ops, args.settings["review.phase_patterns"])
    options = metrics.options_from(args.settings)
    if args.hours is not None:
        options["window_hours"] = args.hours
    computed = metrics.compute(store.board, now=int(time.time()),
                               phase_of={t: p.phase for t, p in mapping.items()}, **options)
    _emit(args, computed.as_dict(series=False), lambda: [print(line) for line in computed.summary_lines()])
    return 0


def cmd_phase_set(args, store: Store) -> int:
    from sparkops import phases

    name = phases.assign(store.board, store.ops, args.task_id, args.phase, by=_actor())
    _emit(args, {"task_id": args.task_id, "phase": name}, lambda: print(f"{args.task_id} is in phase {name}"))
    return 0


def cmd_phase_unset(args, store: Store) -> int:
    from sparkops import phases

    if not phases.unassign(store.ops, args.task_id, by=_actor()):
        raise NotFound("explicit phase of task", args.task_id)
    _emit(args, {"task_id": args.task_id}, lambda: print(f"{args.task_id}: explicit phase removed"))
    return 0


def cmd_phase_list(args, store: Store) -> int:
    from sparkops import phases

    mapping = phases.resolve(store.board, store.ops, args.settings["review.phase_patterns"])
    rows = phases.summary(store.board, mapping)
    boundaries = {b.phase: b for b in phases.recorded(store.ops)}
    for row in rows:
        row["finished_at"] = boundaries[row["phase"]].reached_at if row["phase"] in boundaries else None

    def text() -> None:
        for r in rows:
            done = f"finished {_when(r['finished_at'])}" if r["finished_at"] else f"{r['open']} open"
            print(f"{r['phase']:<12} {r['total']:>5} tasks  {r['done']:>5} done  {done}")
    _emit(args, rows, text)
    return 0


def cmd_demo_agent(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops import demo_agent

    return demo_agent.run(args)


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.launcher import run_up

    return run_up(settings, config_path=args.config, demo=args.demo)


def cmd_demo(args, store: Store) -> int:
    from sparkops.demo import seed_demo

    created = seed_demo(store.board)
    _emit(args, {"created": created}, lambda: print(
        f"Created {len(created)} demo tasks" if created else "The board is not empty; no demo tasks added"))
    return 0


# -- the parser ----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, metavar="PATH",
                        help="settings file (default: $SPARKOPS_CONFIG or ./sparkops.toml)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")

    parser = argparse.ArgumentParser(
        prog="sparkops", parents=[common],
        description="SparkOps: operations for autonomous AI coding sprints on a GPU box.")
    parser.add_argument("--version", action="version", version=f"sparkops {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(subparsers, name: str, func, help_text: str, *, store: bool = True,
            json_out: bool = True) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=help_text, description=help_text,
                                  parents=[common] + ([as_json] if json_out else []))
        p.set_defaults(func=func, needs_store=store)
        return p

    add(sub, "init", cmd_init, "create or upgrade the board and ops databases", store=False)
    p = add(sub, "up", cmd_up, "start the jobs runner and the web app (Ctrl-C stops both)",
            store=False, json_out=False)
    p.add_argument("--demo", action="store_true", help="add demo tasks to an empty board")
    add(sub, "demo", cmd_demo, "add a small demo sprint to an empty board")
    add(sub, "config", cmd_config, "show the effective settings and where they came from",
        store=False)

    task = sub.add_parser("task", help="create, list, show and change tasks")
    tsub = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    p = add(tsub, "create", cmd_task_create, "create a task (prints its id)")
    p.add_argument("title")
    p.add_argument("--body")
    p.add_argument("--body-file", metavar="PATH", help="read the body from a file")
    p.add_argument("--assignee")
    p.add_argument("--priority", type=int, default=0)
    p.add_argument("--parent", action="append", metavar="TASK_ID", help="repeatable")
    p.add_argument("--triage", action="store_true", help="park in triage")
    p.add_argument("--created-by", default=None)
    p.add_argument("--max-runtime", type=int, metavar="SECONDS")
    p.add_argument("--max-retries", type=int, metavar="N")
    p.add_argument("--idempotency-key")
    p.add_argument("--require", action="append", metavar="KEY=VALUE",
                   help="run only on a host with this label (host.labels), e.g. gpu=gb10; repeatable")

    p = add(tsub, "list", cmd_task_list, "list tasks (priority, then age)")
    p.add_argument("--status")
    p.add_argument("--assignee")
    p.add_argument("--archived", action="store_true", help="include archived tasks")
    p.add_argument("--limit", type=int)

    p = add(tsub, "show", cmd_task_show, "a task with comments, events and runs")
    p.add_argument("task_id")

    p = add(tsub, "complete", cmd_task_complete, "mark a task done (workers pass --run)")
    p.add_argument("task_id")
    p.add_argument("--run", type=int, metavar="RUN_ID",
                   help="the reporting worker's run; a stale run is refused")
    p.add_argument("--result")
    p.add_argument("--summary")
    p.add_argument("--metadata", help="JSON object stored on the run")

    p = add(tsub, "block", cmd_task_block, "block a task (workers pass --run)")
    p.add_argument("task_id")
    p.add_argument("reason", nargs="*")
    p.add_argument("--run", type=int, metavar="RUN_ID")
    p.add_argument("--kind", choices=sorted(board.BLOCK_KINDS))

    p = add(tsub, "unblock", cmd_task_unblock, "return a blocked task to ready (or todo)")
    p.add_argument("task_id")

    p = add(tsub, "promote", cmd_task_promote, "move a todo/blocked/triage task to ready")
    p.add_argument("task_id")
    p.add_argument("--force", action="store_true", help="even with unfinished parents")
    p.add_argument("--reason")
    p.add_argument("--actor")

    p = add(tsub, "archive", cmd_task_archive, "archive a task")
    p.add_argument("task_id")

    p = add(tsub, "comment", cmd_task_comment, "add a comment")
    p.add_argument("task_id")
    p.add_argument("text", nargs="+")
    p.add_argument("--author")

    p = add(tsub, "require", cmd_task_require, "run a task only on hosts with these labels")
    p.add_argument("task_id")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    p = add(tsub, "unrequire", cmd_task_unrequire, "drop some (or all) of a task's label requirements")
    p.add_argument("task_id")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p = add(tsub, "link", cmd_task_link, "make CHILD depend on PARENT")
    p.add_argument("parent_id")
    p.add_argument("child_id")

    p = add(sub, "runs", cmd_runs, "runs, newest first (of one task, or all)")
    p.add_argument("task_id", nargs="?")
    p.add_argument("--active", action="store_true", help="only runs still in progress")
    p.add_argument("--limit", type=int, default=50)

    p = add(sub, "events", cmd_events, "task events, oldest first (of one task, or all)")
    p.add_argument("task_id", nargs="?")
    p.add_argument("--since", type=int, metavar="SECONDS", help="only the last SECONDS")
    p.add_argument("--kind", action="append", help="only events of this kind (repeatable)")
    p.add_argument("--limit", type=int, default=100)

    add(sub, "stats", cmd_stats, "counts per status and assignee, oldest ready task")

    job = sub.add_parser("job", help="list the jobs, or run one now")
    jsub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    add(jsub, "list", cmd_job_list, "the jobs and how often the runner runs them")
    p = add(jsub, "run", cmd_job_run, "run one job now, under its lock (exit 1 if it failed or was busy)")
    p.add_argument("name")
    p = add(sub, "reclaim", cmd_reclaim,
            "close runs whose worker is dead, silent or over its max runtime, and requeue their tasks")
    p.add_argument("--dry-run", action="store_true", help="only say what would be reclaimed and why")

    p = add(sub, "watchdog", cmd_watchdog,
            "check services, vLLM and the GPU now; restart what is down, kill GPU zombies")
    p.add_argument("--dry-run", action="store_true", help="only say what it would do")
    p = add(sub, "disk", cmd_disk, "disk usage; clean old logs and finished workspaces above the threshold")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--force", action="store_true", help="clean even below disk.threshold_percent")
    add(sub, "gpu", cmd_gpu, "the GPUs and their processes, as NVML sees them", store=False)
    add(sub, "services", cmd_services, "the services the watchdog checks, and their last state")
    p = add(sub, "alerts", cmd_alerts, "recent alerts: sent, suppressed, failed")
    p.add_argument("--limit", type=int, default=50)

    add(sub, "review", cmd_review, "write a sprint review report now (phases, metrics, risks, narrative)")
    add(sub, "report", cmd_report, "print the latest sprint review report")
    p = add(sub, "migrate", cmd_migrate, "copy the board (and the ops data) into an empty database, "
            "verified by counts and checksums", store=False)
    p.add_argument("--from", dest="source", metavar="URL",
                   help="the board to copy (default: storage.board_url)")
    p.add_argument("--to", dest="target", metavar="URL", required=True,
                   help="an empty database, e.g. postgresql://sparkops@db.internal/sparkops")
    p.add_argument("--ops-from", dest="ops_source", metavar="URL",
                   help="the ops data to copy (default: storage.ops_url, unless --from is given)")
    p.add_argument("--ops-to", dest="ops_target", metavar="URL", help="where the ops data goes (default: --to)")
    p.add_argument("--board-only", action="store_true", help="copy the board, not the ops data")
    remote_cmd = sub.add_parser("remote", help="remote hosts over SSH: check, push, tunnel, trust a host key")
    rsub = remote_cmd.add_subparsers(dest="remote_command", required=True, metavar="ACTION")
    p = add(rsub, "check", cmd_remote_check, "log in to each remote host (key verified) and say how it "
            "went; read the GPU hosts' GPUs", store=False)
    p.add_argument("names", nargs="*", metavar="NAME", help="only these hosts (default: all)")
    add(rsub, "push", cmd_remote_push, "copy the latest export to remote.push_host now (only changed files)")
    p = add(rsub, "tunnel", cmd_remote_tunnel, "hold the reverse tunnel in the foreground until Ctrl-C "
            "(the runner's tunnel job does this when it runs)", json_out=False)
    p.add_argument("--check", action="store_true", help="only probe the tunnel end to end, once")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p = add(rsub, "trust-host", cmd_remote_trust, "show a remote host's key fingerprint and record it in "
            "its known_hosts", store=False, json_out=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--fingerprint", metavar="SHA256:...", help="record the key only if it has this fingerprint")
    p.add_argument("--yes", action="store_true", help="record the key without asking")
    p.add_argument("--replace", action="store_true", help="replace a different key recorded for the host")
    add(sub, "hosts", cmd_hosts, "the fleet: every host's runner, state, capacity, open runs, GPUs, labels")
    add(sub, "export", cmd_export, "write the board as CSV and JSON into export.dir (see docs/export.md)")
    p = add(sub, "metrics", cmd_metrics, "sprint metrics over the review window")
    p.add_argument("--hours", type=float, help="the window (default: review.window_hours)")
    phase = sub.add_parser("phase", help="the phases of the sprint; assign a task to one")
    psub = phase.add_subparsers(dest="phase_command", required=True, metavar="ACTION")
    add(psub, "list", cmd_phase_list, "phases with their tasks and when they finished")
    p = add(psub, "set", cmd_phase_set, "put a task in a phase explicitly (beats title tags and depth)")
    p.add_argument("task_id")
    p.add_argument("phase")
    p = add(psub, "unset", cmd_phase_unset, "drop a task's explicit phase")
    p.add_argument("task_id")

    from sparkops import demo_agent

    p = add(sub, "demo-agent", cmd_demo_agent,
            "a demo worker: does a little real work in its workspace and reports (for sparkops up --demo)",
            store=False, json_out=False)
    demo_agent.add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("SPARKOPS_LOG_LEVEL", "WARNING").upper(),
                        format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    args.config = getattr(args, "config", None)
    store: Store | None = None
    try:
        settings = load_settings(args.config)
        args.settings = settings
        if not args.needs_store:
            return args.func(args, settings)
        if getattr(args, "run", None) is None or not settings["storage.retry_seconds"]:
            store = open_store(settings)
            return args.func(args, store)

        # A worker's report: a database restart must not turn finished work into a crash.
        def report() -> int:
            nonlocal store
            if store is not None:
                store.dispose()
            store = open_store(settings)
            return args.func(args, store)
        return retrying(report, seconds=settings["storage.retry_seconds"],
                        what=f"{args.command} {getattr(args, 'task_command', '')} --run {args.run}".strip())
    except SparkOpsError as err:
        print(f"sparkops: error: {err}", file=sys.stderr)
        return err.exit_code
    except DBAPIError as exc:
        reason = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        print(f"sparkops: error: database error: {reason}", file=sys.stderr)
        return StorageError.exit_code
    except KeyboardInterrupt:
        return 130
    finally:
        if store is not None:
            store.dispose()

