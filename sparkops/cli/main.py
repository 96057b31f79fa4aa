"""The entry point: the argument parser and ``main``, which loads the settings, opens the
store for the commands that need it and turns library errors into one line and an exit
code (0 ok, 1 not found or refused, 2 bad usage, configuration or database).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from sqlalchemy.exc import DBAPIError

from sparkops import __version__
from sparkops.cli import ops, remote, report, tasks
from sparkops.config import load_settings
from sparkops.core.errors import SparkOpsError, StorageError
from sparkops.storage.db import error_line, retrying
from sparkops.storage.store import Store, open_store

log = logging.getLogger("sparkops")


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

    add(sub, "init", ops.cmd_init, "create or upgrade the board and ops databases", store=False)
    p = add(sub, "up", ops.cmd_up, "start the jobs runner and the web app (Ctrl-C stops both)",
            store=False, json_out=False)
    p.add_argument("--demo", action="store_true", help="add demo tasks to an empty board")
    p.add_argument("--port", type=ops.port_number, help="serve the web app on this port (instead of ui.port)")
    add(sub, "demo", ops.cmd_demo, "add a small demo sprint to an empty board")
    add(sub, "config", ops.cmd_config, "show the effective settings and where they came from",
        store=False)

    task = sub.add_parser("task", help="create, list, show and change tasks")
    tsub = task.add_subparsers(dest="task_command", required=True, metavar="ACTION")

    p = add(tsub, "create", tasks.cmd_task_create, "create a task (prints its id)")
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

    p = add(tsub, "list", tasks.cmd_task_list, "list tasks (priority, then age)")
    p.add_argument("--status")
    p.add_argument("--assignee")
    p.add_argument("--archived", action="store_true", help="include archived tasks")
    p.add_argument("--limit", type=int)

    p = add(tsub, "show", tasks.cmd_task_show, "a task with comments, events and runs")
    p.add_argument("task_id")

    p = add(tsub, "complete", tasks.cmd_task_complete, "mark a task done (workers pass --run)")
    report.add_complete_arguments(p)
    p = add(tsub, "block", tasks.cmd_task_block, "block a task (workers pass --run)")
    report.add_block_arguments(p)

    p = add(tsub, "reclaim", tasks.cmd_task_reclaim,
            "stop a running task's worker on this host, then return the task to ready")
    p.add_argument("task_id")
    p.add_argument("--reason", help="why (kept in the run's error and the event)")

    p = add(tsub, "unblock", tasks.cmd_task_unblock, "return a blocked task to ready (or todo)")
    p.add_argument("task_id")

    p = add(tsub, "promote", tasks.cmd_task_promote, "move a todo/blocked/triage task to ready")
    p.add_argument("task_id")
    p.add_argument("--force", action="store_true", help="even with unfinished parents")
    p.add_argument("--reason")
    p.add_argument("--actor")

    p = add(tsub, "archive", tasks.cmd_task_archive, "archive a task")
    p.add_argument("task_id")

    p = add(tsub, "comment", tasks.cmd_task_comment, "add a comment")
    p.add_argument("task_id")
    p.add_argument("text", nargs="+")
    p.add_argument("--author")

    p = add(tsub, "require", tasks.cmd_task_require, "run a task only on hosts with these labels")
    p.add_argument("task_id")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE")
    p = add(tsub, "unrequire", tasks.cmd_task_unrequire, "drop some (or all) of a task's label requirements")
    p.add_argument("task_id")
    p.add_argument("labels", nargs="*", metavar="KEY=VALUE")
    p = add(tsub, "link", tasks.cmd_task_link, "make CHILD depend on PARENT")
    p.add_argument("parent_id")
    p.add_argument("child_id")

    p = add(sub, "runs", ops.cmd_runs, "runs, newest first (of one task, or all)")
    p.add_argument("task_id", nargs="?")
    p.add_argument("--active", action="store_true", help="only runs still in progress")
    p.add_argument("--limit", type=int, default=50)

    p = add(sub, "events", ops.cmd_events, "task events, oldest first (of one task, or all)")
    p.add_argument("task_id", nargs="?")
    p.add_argument("--since", type=int, metavar="SECONDS", help="only the last SECONDS")
    p.add_argument("--kind", action="append", help="only events of this kind (repeatable)")
    p.add_argument("--limit", type=int, default=100)

    add(sub, "stats", ops.cmd_stats, "counts per status and assignee, oldest ready task")

    job = sub.add_parser("job", help="list the jobs, or run one now")
    jsub = job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    add(jsub, "list", ops.cmd_job_list, "the jobs and how often the runner runs them")
    p = add(jsub, "run", ops.cmd_job_run, "run one job now, under its lock (exit 1 if it failed or was busy)")
    p.add_argument("name")
    p = add(sub, "reclaim", ops.cmd_reclaim,
            "close runs whose worker is dead, silent or over its max runtime, and requeue their tasks")
    p.add_argument("--dry-run", action="store_true", help="only say what would be reclaimed and why")

    p = add(sub, "watchdog", ops.cmd_watchdog,
            "check services, vLLM and the GPU now; restart what is down, kill GPU zombies")
    p.add_argument("--dry-run", action="store_true", help="only say what it would do")
    p = add(sub, "disk", ops.cmd_disk, "disk usage; clean old logs and finished workspaces above the threshold")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p.add_argument("--force", action="store_true", help="clean even below disk.threshold_percent")
    add(sub, "gpu", ops.cmd_gpu, "the GPUs and their processes, as NVML sees them", store=False)
    add(sub, "services", ops.cmd_services, "the services the watchdog checks, and their last state")
    p = add(sub, "alerts", ops.cmd_alerts, "recent alerts: sent, suppressed, failed")
    p.add_argument("--limit", type=int, default=50)

    add(sub, "review", ops.cmd_review, "write a sprint review report now (phases, metrics, risks, narrative)")
    add(sub, "report", ops.cmd_report, "print the latest sprint review report")
    p = add(sub, "migrate", ops.cmd_migrate, "copy the board (and the ops data) into an empty database, "
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
    p = add(rsub, "check", remote.cmd_remote_check, "log in to each remote host (key verified) and say how it "
            "went; read the GPU hosts' GPUs", store=False)
    p.add_argument("names", nargs="*", metavar="NAME", help="only these hosts (default: all)")
    add(rsub, "push", remote.cmd_remote_push, "copy the latest export to remote.push_host now (only changed files)")
    p = add(rsub, "tunnel", remote.cmd_remote_tunnel, "hold the reverse tunnel in the foreground until Ctrl-C "
            "(the runner's tunnel job does this when it runs)", json_out=False)
    p.add_argument("--check", action="store_true", help="only probe the tunnel end to end, once")
    p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    p = add(rsub, "trust-host", remote.cmd_remote_trust, "show a remote host's key fingerprint and record it in "
            "its known_hosts", store=False, json_out=False)
    p.add_argument("name", metavar="NAME")
    p.add_argument("--fingerprint", metavar="SHA256:...", help="record the key only if it has this fingerprint")
    p.add_argument("--yes", action="store_true", help="record the key without asking")
    p.add_argument("--replace", action="store_true", help="replace a different key recorded for the host")
    add(sub, "hosts", ops.cmd_hosts, "the fleet: every host's runner, state, capacity, open runs, GPUs, labels")
    add(sub, "export", ops.cmd_export, "write the board as CSV and JSON into export.dir (see docs/export.md)")
    p = add(sub, "metrics", ops.cmd_metrics, "sprint metrics over the review window")
    p.add_argument("--hours", type=float, help="the window (default: review.window_hours)")
    p = add(sub, "costs", ops.cmd_costs, "what the window's runs spent: tokens, energy, GPU time, money")
    p.add_argument("--hours", type=float, help="the window (default: review.window_hours)")
    p.add_argument("--by", choices=["phase", "assignee", "outcome", "host"], default="phase",
                   help="sum by this (default: phase)")
    p.add_argument("--top", type=int, default=10, help="how many of the most expensive tasks (default 10)")
    phase = sub.add_parser("phase", help="the phases of the sprint; assign a task to one")
    psub = phase.add_subparsers(dest="phase_command", required=True, metavar="ACTION")
    add(psub, "list", ops.cmd_phase_list, "phases with their tasks and when they finished")
    p = add(psub, "set", ops.cmd_phase_set, "put a task in a phase explicitly (beats title tags and depth)")
    p.add_argument("task_id")
    p.add_argument("phase")
    p = add(psub, "unset", ops.cmd_phase_unset, "drop a task's explicit phase")
    p.add_argument("task_id")

    from sparkops.demo import agent as demo_agent
    from sparkops.demo import vllm as demo_vllm

    p = add(sub, "demo-agent", ops.cmd_demo_agent,
            "a demo worker: does a little real work in its workspace and reports (for sparkops up --demo)",
            store=False, json_out=False)
    demo_agent.add_arguments(p)
    p = add(sub, "demo-vllm", ops.cmd_demo_vllm,
            "the demo's model server: vLLM's health, metrics and models on loopback, hanging now and "
            "then (for sparkops up --demo)", store=False, json_out=False)
    demo_vllm.add_arguments(p)
    p = add(sub, "demo-planner", ops.cmd_demo_planner,
            "the demo's planner: adds work as the sprint runs and asks a person now and then "
            "(for sparkops up --demo)", json_out=False)
    p.add_argument("--every", type=float, default=20.0, help="seconds between looks at the board")
    p.add_argument("--answer-after", type=float, default=240.0,
                   help="seconds before the demo's operator answers a question")
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
        reason = error_line(exc)
        print(f"sparkops: error: database error: {reason}", file=sys.stderr)
        return StorageError.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`sparkops task list | head`): stop quietly, as `cat` does
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    finally:
        if store is not None:
            store.dispose()
