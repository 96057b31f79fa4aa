"""The operator's commands beside ``task``: init, migrate, up, the jobs (``job``, ``reclaim``,
``watchdog``, ``disk``, ``review``, ``export``), what the box and the sprint look like
(``runs``, ``events``, ``stats``, ``gpu``, ``services``, ``alerts``, ``metrics``, ``phase``,
``hosts``, ``config``) and the demo.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from sparkops.board import queries
from sparkops.cli import output, tasks
from sparkops.config import SETTINGS, Settings, load_secrets, load_settings, mask_url, mask_web_url
from sparkops.core import formatting
from sparkops.core.errors import InvalidInput, NotFound
from sparkops.jobs import hosts as fleet
from sparkops.storage.store import Store, open_store


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    store = open_store(settings, create=True)
    try:
        info = {
            "config": settings.describe_source(),
            "board": store.board.display_url,
            "ops": store.ops.display_url,
        }
        output.emit(args, info, lambda: print(
            f"board: {info['board']}\nops:   {info['ops']}\nconfig: {info['config']}\n"
            "Ready. Create a task with: python -m sparkops task create \"Title\""))
    finally:
        store.dispose()
    return 0


def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    """Copy the board (and the ops data) into an empty database, verified."""
    from sparkops.storage import migrate
    from sparkops.storage.db import Database

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
    output.emit(args, report.as_dict(), lambda: print(
        f"Copied {report.rows:,} rows in {len(report.tables)} tables in {report.seconds:.1f}s; "
        "counts and checksums match.\n"
        + "".join(f"{c}: {report.source[c]} -> {report.target[c]}\n" for c in report.source)
        + ("WARNING: the source changed while it was copied (is a jobs runner still running?); "
           "the copy is its state at the start.\n" if report.source_changed else "")
        + "Point storage.board_url and storage.ops_url at the target to use it."))
    return 0


def cmd_hosts(args, store: Store) -> int:
    found = fleet.hosts(store.ops, store.board)

    def text() -> None:
        if not found:
            print("(no jobs runner has registered yet)")
        for h in found:
            gpus = ", ".join(d.get("name") or "?" for d in h.gpu.get("devices", [])) or "no GPU"
            print(f"{h.host:<20} {h.state:<8} runs {h.open_runs}/{h.capacity or '?'}  "
                  f"heartbeat {h.heartbeat_age}s ago  "
                  f"v{h.version or '?'}  {gpus}  {' '.join(h.labels)}")
    output.emit(args, [h.as_dict() for h in found], text)
    return 0


def cmd_runs(args, store: Store) -> int:
    rows = queries.list_runs(store.board, task_id=args.task_id, active_only=args.active,
                             limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no runs)")
        output.print_runs(rows)
    output.emit(args, rows, text)
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
            print(f"[{formatting.when(e['created_at'], seconds=False)}] {e['task_id']} {run}{e['kind']}{payload}")
    output.emit(args, rows, text)
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
        waiting = stats["ready_wait"]
        print("Longest ready wait: " + (f"{waiting['id']}, {formatting.duration(waiting['wait_seconds'])} "
                                        "since it became ready" if waiting else "none (nothing is ready)"))
    output.emit(args, stats, text)
    return 0


def cmd_config(args: argparse.Namespace, settings: Settings) -> int:
    values = {s.key: (mask_url(v) if s.kind == "url" else mask_web_url(v) if s.kind == "weburl" and v
                      else str(v) if s.kind == "path" else v)
              for s in SETTINGS for v in [settings[s.key]]}

    def text() -> None:
        print(f"# from {settings.describe_source()}")
        for key, value in values.items():
            print(f"{key} = {value!r}")
    output.emit(args, {"source": settings.describe_source(), "settings": values}, text)
    return 0


def cmd_job_list(args, store: Store) -> int:
    from sparkops.runner import registry

    settings = args.settings
    specs = registry.all_jobs()
    rows = [{"name": s.name, "every_seconds": s.interval(settings), "setting": s.interval_setting,
             "help": s.help} for s in specs.values()]

    def text() -> None:
        for r in rows:
            print(f"{r['name']:<10} every {r['every_seconds']:g}s ({r['setting']})  {r['help']}")
    output.emit(args, rows, text)
    return 0


def run_job(args, store: Store, name: str, **options) -> int:
    from sparkops.jobs.framework import JobContext
    from sparkops.runner.registry import run_job

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
    output.emit(args, payload, text)
    return 0 if result.ok else 1


def cmd_job_run(args, store: Store) -> int:
    return run_job(args, store, args.name)


def cmd_reclaim(args, store: Store) -> int:
    return run_job(args, store, "reclaim", dry_run=args.dry_run)


def cmd_watchdog(args, store: Store) -> int:
    return run_job(args, store, "watchdog", dry_run=args.dry_run)


def cmd_disk(args, store: Store) -> int:
    return run_job(args, store, "disk", dry_run=args.dry_run, force=args.force)


def cmd_gpu(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.meters import gpu

    snap = gpu.snapshot()
    output.emit(args, snap.as_dict(), lambda: output.print_gpus(snap))
    return 0


def cmd_services(args, store: Store) -> int:
    from sparkops.core.procs import host_name
    from sparkops.watch import services

    host = host_name(args.settings["host.name"])
    states = services.load_states(store.ops, host)
    rows = []
    for spec in args.settings.services:
        state = states.get(spec.name)
        status = state.status if state and spec.enabled else "unknown" if spec.enabled else "disabled"
        rows.append({"name": spec.name, "check": spec.check, "enabled": spec.enabled, "declared": spec.declared,
                     "status": status, "since": state.since if state else None,
                     "checked_at": state.checked_at if state else None,
                     "detail": (state.detail if state else "not checked yet: the watchdog checks it when the "
                                "jobs runner starts (or run `python -m sparkops watchdog`)"),
                     "hint": spec.toggle_hint(), "restart_configured": bool(spec.restart_argv)})

    def text() -> None:
        for r in rows:
            words = "disabled" if r["status"] == "disabled" else services.status_words(r["status"])
            print(f"{r['name']:<10} {r['check']:<8} {words:<16} {r['detail']}")
            if r["status"] in (services.NOT_CONFIGURED, "disabled"):
                print(f"{'':<36}{r['hint'].replace('`', '')}")
        if not rows:
            print("(no service is configured)")
    output.emit(args, rows, text)
    return 0


def cmd_alerts(args, store: Store) -> int:
    from sparkops.watch import alerts

    rows = alerts.recent(store.ops, limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no alerts)")
        for r in reversed(rows):
            at = formatting.when(r["created_at"], seconds=False)
            print(f"[{at}] {r['level']:<8} {r['outcome']:<10} {r['key']}: {r['title']}")
    output.emit(args, rows, text)
    return 0


def cmd_review(args, store: Store) -> int:
    return run_job(args, store, "review")


def cmd_export(args, store: Store) -> int:
    return run_job(args, store, "export")


def cmd_report(args, store: Store) -> int:
    from sparkops.sprint import review

    [latest] = review.latest(store.ops, limit=1) or [None]
    if latest is None:
        raise NotFound("review report", "(none yet; run `python -m sparkops review`)")
    output.emit(args, latest, lambda: print(latest["markdown"], end=""))
    return 0


def cmd_metrics(args, store: Store) -> int:
    from sparkops.board import phases
    from sparkops.sprint import measure

    mapping = phases.resolve(store.board, store.ops, args.settings["review.phase_patterns"])
    options = measure.options_from(args.settings)
    if args.hours is not None:
        options["window_hours"] = args.hours
    computed = measure.compute(store.board, now=int(time.time()),
                               phase_of={t: p.phase for t, p in mapping.items()}, **options)
    output.emit(args, computed.as_dict(series=False), lambda: [print(line) for line in computed.summary_lines()])
    return 0


def cmd_costs(args, store: Store) -> int:
    """What the window's runs spent (the Sprint review's "Where the GPU went")."""
    from sparkops.board import phases
    from sparkops.meters.spend import Prices, describe
    from sparkops.sprint import costs

    hours = args.hours if args.hours is not None else float(args.settings["review.window_hours"])
    if hours <= 0:
        raise InvalidInput(f"--hours must be more than 0, got {hours:g}")
    if args.top < 1:
        raise InvalidInput(f"--top must be at least 1, got {args.top}")
    mapping = phases.resolve(store.board, store.ops, args.settings["review.phase_patterns"])
    prices = Prices.of(args.settings)
    found = costs.compute(store.board, store.ops, prices, phase_of={t: p.phase for t, p in mapping.items()},
                          since=time.time() - hours * 3600)
    by, top = costs.by(found, args.by), costs.most_expensive(found, args.top)

    def records(frame) -> list[dict]:
        return [{k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
                for row in frame.to_dict(orient="records")]

    def text() -> None:
        print(f"Runs since {time.strftime('%Y-%m-%d %H:%M', time.localtime(found.since))} ({hours:g} h): "
              f"{describe(found.total, prices)}")
        if not found.measured_any:
            return
        print(f"\nBy {args.by}:")
        for row in records(by):
            print(f"  {str(row[args.by]):<24} {row['runs']:>4} runs  "
                  f"{describe(_spend_of(row), prices)}")
        print("\nThe most expensive task:" if len(top) == 1 else f"\nThe {len(top)} most expensive tasks:")
        for row in records(top):
            print(f"  {row['task_id']}  {str(row['title'])[:50]:<50}  {describe(_spend_of(row), prices)}")
    output.emit(args, {"hours": hours, "since": found.since, "currency": prices.currency,
                       "total": found.total.as_dict(), "by": args.by, "rows": records(by),
                       "most_expensive": records(top)}, text)
    return 0


def _spend_of(row: dict):
    from dataclasses import fields

    from sparkops.meters.spend import Spend

    return Spend(**{f.name: row.get(f.name) for f in fields(Spend)})


def cmd_phase_set(args, store: Store) -> int:
    from sparkops.board import phases

    name = phases.assign(store.board, store.ops, args.task_id, args.phase, by=tasks.actor())
    output.emit(args, {"task_id": args.task_id, "phase": name}, lambda: print(f"{args.task_id} is in phase {name}"))
    return 0


def cmd_phase_unset(args, store: Store) -> int:
    from sparkops.board import phases

    if not phases.unassign(store.ops, args.task_id, by=tasks.actor()):
        raise NotFound("explicit phase of task", args.task_id)
    output.emit(args, {"task_id": args.task_id}, lambda: print(f"{args.task_id}: explicit phase removed"))
    return 0


def cmd_phase_list(args, store: Store) -> int:
    from sparkops.board import phases

    mapping = phases.resolve(store.board, store.ops, args.settings["review.phase_patterns"])
    rows = phases.summary(store.board, mapping)
    boundaries = {b.phase: b for b in phases.recorded(store.ops)}
    for row in rows:
        row["finished_at"] = boundaries[row["phase"]].reached_at if row["phase"] in boundaries else None

    def text() -> None:
        for r in rows:
            finished = formatting.when(r["finished_at"], seconds=False)
            done = f"finished {finished}" if r["finished_at"] else f"{r['open']} open"
            print(f"{r['phase']:<12} {r['total']:>5} tasks  {r['done']:>5} done  {done}")
    output.emit(args, rows, text)
    return 0


def cmd_demo_agent(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.demo import agent as demo_agent

    return demo_agent.run(args)


def cmd_demo_vllm(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.demo import vllm as demo_vllm

    return demo_vllm.run(args)


def cmd_demo_planner(args, store: Store) -> int:
    import signal

    from sparkops.demo.sprint import Planner, run_planner

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    run_planner(store.board, stop, every=args.every, planner=Planner(answer_after=args.answer_after))
    return 0


def port_number(text: str) -> int:
    """A TCP port for --port: a whole number from 1 to 65535."""
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 1 to 65535, got {text!r}")
    return port


def cmd_up(args: argparse.Namespace, settings: Settings) -> int:
    from sparkops.runner.launcher import run_up

    if args.port is not None:
        # the children (the runner checks the app's health URL) read it from the environment too
        os.environ["SPARKOPS_UI_PORT"] = str(args.port)
        settings = load_settings(args.config)
    return run_up(settings, config_path=args.config, demo=args.demo)


def cmd_demo(args, store: Store) -> int:
    from sparkops.demo.sprint import seed_demo

    created = seed_demo(store.board)
    output.emit(args, {"created": created}, lambda: print(
        f"Created {len(created)} demo tasks" if created else "The board is not empty; no demo tasks added"))
    return 0
