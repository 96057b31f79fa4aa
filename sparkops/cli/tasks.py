"""``sparkops task ...``: create, list, show and change tasks, and a worker's report
(``task complete|block --run``).
"""

from __future__ import annotations

import getpass
import json
import os
import sys

from sqlalchemy.exc import DBAPIError

from sparkops.board import model, queries, requirements
from sparkops.board import transitions as board
from sparkops.cli import output, report
from sparkops.core import formatting, procs
from sparkops.core.errors import InvalidInput, SparkOpsError
from sparkops.engine import handoff
from sparkops.meters import ledger, reported, spend
from sparkops.storage.store import Store


def cmd_task_create(args, store: Store) -> int:
    body = args.body
    if args.body_file:
        try:
            with open(args.body_file, encoding="utf-8") as fh:
                body = fh.read()
        except OSError as exc:
            raise InvalidInput(f"cannot read --body-file {args.body_file}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise InvalidInput(f"--body-file {args.body_file} is not UTF-8 text (byte {exc.start}: "
                               f"{exc.object[exc.start:exc.start + 1]!r}); convert it, e.g. with iconv") from None
    _check_text("the title", args.title)
    _check_text("--body", body)
    required = requirements.parse_labels(args.require or (), what="--require")  # before anything is written
    task_id = board.create_task(
        store.board, args.title, body=body, assignee=args.assignee, priority=args.priority,
        parents=args.parent or (), triage=args.triage, created_by=args.created_by or actor(),
        max_runtime_seconds=args.max_runtime, max_retries=args.max_retries,
        idempotency_key=args.idempotency_key,
    )
    if required:
        requirements.require(store.board, store.ops, task_id, required)
    output.emit(args, queries.get_task(store.board, task_id) if args.json else None,
                lambda: print(task_id))
    return 0


def _check_text(what: str, text: str | None) -> None:
    """Text from the command line that is not valid UTF-8 (Python keeps the bad bytes
    as surrogates) is refused with one line, before anything is written."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(f"{what} is not valid UTF-8 (at character {exc.start}); give it as UTF-8 "
                           "text") from None


def cmd_task_list(args, store: Store) -> int:
    rows = queries.list_tasks(store.board, status=args.status, assignee=args.assignee,
                              include_archived=args.archived, limit=args.limit)

    def text() -> None:
        if not rows:
            print("(no tasks)")
        for r in rows:
            print(f"{output.STATUS_MARK.get(r['status'], ' ')} {r['id']}  {r['status']:<9} "
                  f"{(r['assignee'] or '(unassigned)'):<20} p{r['priority'] or 0:<3} {r['title']}")
    output.emit(args, rows, text)
    return 0


def cmd_task_show(args, store: Store) -> int:
    detail = queries.task_detail(store.board, args.task_id)
    prices = spend.Prices.of(args.settings)
    runs_spend = {run_id: spend.Spend.of(u, prices)
                  for run_id, u in ledger.of_runs(store.ops, [r["id"] for r in detail["runs"]]).items()}
    task_spend = spend.total(runs_spend.values()) if runs_spend else None
    detail["usage"] = {"currency": prices.currency, "task": task_spend.as_dict() if task_spend else None,
                       "runs": {str(k): v.as_dict() for k, v in runs_spend.items()}}

    def text() -> None:
        t = detail["task"]
        print(f"Task {t['id']}: {t['title']}")
        print(f"  status:    {t['status']}")
        print(f"  assignee:  {t['assignee'] or '(unassigned)'}")
        print(f"  priority:  {t['priority'] or 0}")
        print(f"  created:   {formatting.when(t['created_at'], seconds=False)} by {t['created_by'] or '-'}")
        print(f"  started:   {formatting.when(t['started_at'], seconds=False)}")
        print(f"  completed: {formatting.when(t['completed_at'], seconds=False)}")
        if t["consecutive_failures"]:
            print(f"  failures:  {t['consecutive_failures']} ({t['last_failure_error'] or ''})")
        if detail["runs"]:
            print(f"  usage:     {spend.describe(task_spend, prices)}")
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
                print(f"  [{formatting.when(c['created_at'], seconds=False)}] {c['author']}: {c['body']}")
        print(f"\nEvents ({len(detail['events'])}):")
        for e in detail["events"]:
            run = f"[run {e['run_id']}] " if e["run_id"] else ""
            payload = f" {json.dumps(e['payload'], ensure_ascii=False)}" if e["payload"] else ""
            print(f"  [{formatting.when(e['created_at'], seconds=False)}] {run}{e['kind']}{payload}")
        print(f"\nRuns ({len(detail['runs'])}):")
        output.print_runs(detail["runs"])
    output.emit(args, detail, text)
    return 0


def actor() -> str:
    """Who is acting: the Hermes profile of an agent, else the login name."""
    return os.environ.get("HERMES_PROFILE") or getpass.getuser()


def _report(args, change: model.Change, verb: str) -> int:
    report.print_change(change.as_dict(), verb, as_json=args.json)
    return 0


def cmd_task_complete(args, store: Store) -> int:
    """The direct path of a report (see :func:`sparkops.cli.report.hand_off` for the fast one)."""
    metadata = report.metadata_of(args.metadata)
    usage = report.usage_of(args)
    run_id = report.run_for(args.task_id, args.run)
    change = board.complete(store.board, args.task_id, run_id=run_id, result=args.result,
                            summary=args.summary, metadata=metadata,
                            reporter=handoff.reporter() if run_id is not None else None)
    _keep_usage(args, store, change, usage)
    return _report(args, change, report.VERBS["complete"])


def cmd_task_block(args, store: Store) -> int:
    reason = " ".join(args.reason).strip() or None
    usage = report.usage_of(args)
    run_id = report.run_for(args.task_id, args.run)
    change = board.block(store.board, args.task_id, reason=reason, kind=args.kind, run_id=run_id,
                         reporter=handoff.reporter() if run_id is not None else None)
    _keep_usage(args, store, change, usage)
    return _report(args, change, report.VERBS["block"])


def _keep_usage(args, store: Store, change: model.Change, usage: reported.Reported | None) -> None:
    """The report's usage, kept for the run it ended (the report itself stands if this fails)."""
    if usage is None:
        return
    if change.run_id is None:
        print(f"sparkops: warning: {change.task_id} had no run to keep the reported usage for",
              file=sys.stderr)
        return
    try:
        ledger.report(store.ops, run_id=change.run_id, task_id=change.task_id,
                      host=procs.host_name(args.settings["host.name"]), reported=usage)
    except (DBAPIError, SparkOpsError) as exc:
        print(f"sparkops: warning: the reported usage was not kept: {exc}", file=sys.stderr)


def cmd_task_reclaim(args, store: Store) -> int:
    from sparkops.engine.reclaim import reclaim_task
    from sparkops.jobs.framework import JobContext

    ctx = JobContext.create(args.settings, store)
    change, stopped = reclaim_task(ctx, args.task_id, actor=actor(), reason=args.reason)
    code = _report(args, change, "Reclaimed")
    if stopped and not args.json:
        print("  stopped " + "; ".join(stopped))
    return code


def cmd_task_unblock(args, store: Store) -> int:
    return _report(args, board.unblock(store.board, args.task_id), "Unblocked")


def cmd_task_promote(args, store: Store) -> int:
    change = board.promote(store.board, args.task_id, actor=args.actor or actor(),
                           reason=args.reason, force=args.force)
    return _report(args, change, "Promoted")


def cmd_task_archive(args, store: Store) -> int:
    return _report(args, board.archive(store.board, args.task_id), "Archived")


def cmd_task_comment(args, store: Store) -> int:
    author = args.author or actor()
    comment_id = board.comment(store.board, args.task_id, " ".join(args.text), author=author)
    output.emit(args, {"task_id": args.task_id, "comment_id": comment_id},
                lambda: print(f"Comment added to {args.task_id}"))
    return 0


def cmd_task_link(args, store: Store) -> int:
    board.link(store.board, args.parent_id, args.child_id)
    output.emit(args, {"parent": args.parent_id, "child": args.child_id},
                lambda: print(f"Linked {args.parent_id} -> {args.child_id}"))
    return 0


def cmd_task_require(args, store: Store) -> int:
    labels = requirements.require(store.board, store.ops, args.task_id, args.labels)
    output.emit(args, {"task": args.task_id, "requires": labels},
                lambda: print(f"{args.task_id} runs only on hosts labelled: {', '.join(labels)}"))
    return 0


def cmd_task_unrequire(args, store: Store) -> int:
    queries.get_task(store.board, args.task_id)  # NotFound for a wrong id
    labels = requirements.unrequire(store.ops, args.task_id, args.labels or None)
    output.emit(args, {"task": args.task_id, "requires": labels},
                lambda: print(f"{args.task_id} requires: {', '.join(labels) or 'nothing (any host)'}"))
    return 0
