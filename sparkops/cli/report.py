"""A worker's report: ``sparkops task complete|block``, its arguments and its output,
and the fast path that hands the report to the worker's shim
(:mod:`sparkops.engine.handoff`).

``python -m sparkops`` tries :func:`hand_off` before importing the rest of the
command line: a report from under a live shim is made by that shim, and this
process imports only the standard library and these few modules. Anything else
(another command, no shim, ``--config``, a report for another run, a refusal by
the shim, bad arguments) returns None and goes through the full command line,
which makes the report itself, with the same fencing and the same output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from sparkops.board import BLOCK_KINDS
from sparkops.core.errors import InvalidInput
from sparkops.engine import handoff
from sparkops.meters import reported

#: verb -> the word the output starts with
VERBS = {"complete": "Completed", "block": "Blocked"}


def add_complete_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id")
    p.add_argument("--run", type=int, metavar="RUN_ID",
                   help="the reporting worker's run; a stale run is refused")
    p.add_argument("--result")
    p.add_argument("--summary")
    p.add_argument("--metadata", help="JSON object stored on the run")
    add_usage_arguments(p)


def add_block_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task_id")
    p.add_argument("reason", nargs="*")
    p.add_argument("--run", type=int, metavar="RUN_ID")
    p.add_argument("--kind", choices=sorted(BLOCK_KINDS))
    add_usage_arguments(p)


def add_usage_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--usage-json", metavar="FILE",
                   help="what the run used, as the agent knows it: a JSON file (- for standard input) "
                        "in SparkOps', Claude Code's, Codex's or OpenAI's shape (tokens, cost)")
    p.add_argument("--prompt-tokens", type=float, metavar="N", help="prompt (input) tokens the run used")
    p.add_argument("--generation-tokens", type=float, metavar="N", help="tokens the run generated")
    p.add_argument("--cost", type=float, metavar="AMOUNT", help="what the run cost on a hosted API")


def usage_of(args: argparse.Namespace) -> reported.Reported | None:
    """The usage the report gives (``--usage-json`` and the flags), or InvalidInput."""
    return reported.of_arguments(args.usage_json, args.prompt_tokens, args.generation_tokens, args.cost)


def metadata_of(text: str | None) -> dict[str, Any] | None:
    """``--metadata``: a JSON object, or InvalidInput."""
    if not text:
        return None
    try:
        metadata = json.loads(text)
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise InvalidInput("--metadata must be a JSON object, e.g. '{\"tests\": 12}'")
    return metadata


def run_for(task_id: str, run: int | None, environ: Mapping[str, str] | None = None) -> int | None:
    """``--run``, or the worker's own run when a worker reports on its own task."""
    environ = os.environ if environ is None else environ
    if run is not None:
        return run
    if environ.get("SPARKOPS_TASK_ID") == task_id and environ.get("SPARKOPS_RUN_ID"):
        try:
            return int(environ["SPARKOPS_RUN_ID"])
        except ValueError:
            raise InvalidInput("SPARKOPS_RUN_ID must be a run number") from None
    return None


def print_change(change: dict[str, Any], verb: str, *, as_json: bool) -> None:
    """What a transition did, as the command line says it."""
    if as_json:
        print(json.dumps(change, indent=2, ensure_ascii=False, default=str))
        return
    run = f" (run {change['run_id']})" if change.get("run_id") else ""
    print(f"{verb} {change['task_id']}: {change['from']} -> {change['to']}{run}")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # the full command line says it, with its usage
        raise ValueError(message)


def _parse(verb: str, argv: Sequence[str]) -> argparse.Namespace | None:
    parser = _Parser(prog=f"sparkops task {verb}", add_help=False)
    (add_complete_arguments if verb == "complete" else add_block_arguments)(parser)
    parser.add_argument("--json", action="store_true")
    try:
        return parser.parse_args(argv)
    except ValueError:
        return None


def request_of(verb: str, args: argparse.Namespace, run_id: int, token: str) -> dict[str, Any]:
    request: dict[str, Any] = {"verb": verb, "task_id": args.task_id, "run_id": run_id, "token": token}
    if verb == "complete":
        request.update(result=args.result, summary=args.summary, metadata=metadata_of(args.metadata))
    else:
        request.update(reason=" ".join(args.reason).strip() or None, kind=args.kind)
    usage = usage_of(args)
    if usage is not None:
        request["usage"] = usage.as_dict()
    return request


def hand_off(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> int | None:
    """Make a worker's report through its shim; the exit code, or None when the
    full command line has to make it."""
    environ = os.environ if environ is None else environ
    if len(argv) < 2 or argv[0] != "task" or argv[1] not in VERBS:
        return None
    name, token = environ.get(handoff.SOCKET_ENV), environ.get(handoff.REPORT_TOKEN_ENV)
    rest = argv[2:]
    if not name or not token or any(a in ("-h", "--help") or a.startswith("--config") for a in rest):
        return None
    verb = argv[1]
    args = _parse(verb, rest)
    if args is None:
        return None
    try:
        run_id = run_for(args.task_id, args.run, environ)
        request = request_of(verb, args, run_id, token) if run_id is not None else None
    except InvalidInput:
        return None
    if (request is None or args.task_id != environ.get("SPARKOPS_TASK_ID")
            or str(run_id) != environ.get("SPARKOPS_RUN_ID")):
        return None  # the shim makes only its own run's report
    reply = handoff.ask(name, request)
    if reply is None or not reply.get("handled"):
        return None
    if "error" in reply:
        print(f"sparkops: error: {reply['error']}", file=sys.stderr)
        return int(reply.get("code") or 1)
    print_change(reply["change"], VERBS[verb], as_json=args.json)
    return 0
