"""The ``promote`` job: todo tasks whose parents are all finished become ready.

Finishing a task promotes its children in the same transaction
(:func:`sparkops.board.transitions.complete`); this job is the safety net for
parents finished by another tool (Hermes, an operator's SQL)."""

from __future__ import annotations

from sparkops.board import transitions as board
from sparkops.jobs.framework import JobContext, JobReport


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    token = ctx.store.board.change_token()
    if token is not None and ctx.last_seen.get("promote") == token:
        return JobReport("nothing changed since the last look", acted=False)
    promoted = board.promote_ready(ctx.store.board, now=now)
    ctx.last_seen["promote"] = ctx.store.board.change_token()
    if not promoted:
        return JobReport("nothing to promote", acted=False)
    return JobReport(f"promoted {len(promoted)} task{'' if len(promoted) == 1 else 's'}: {', '.join(promoted)}",
                     details={"promoted": promoted})
