"""The board's values: statuses, run outcomes, what a transition did, the retry
policy and the failure limits, which task ids are safe, a run's claim lock
(``host:pid``) and what counts as a protocol violation. Plain values, no database: the state machine
(:mod:`sparkops.board.transitions`) and everything that reads the board share them.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from sparkops.board import BLOCK_KINDS  # noqa: F401 - part of the model's vocabulary
from sparkops.core import json_text


class Status(StrEnum):
    TRIAGE = "triage"
    TODO = "todo"
    SCHEDULED = "scheduled"
    READY = "ready"
    RUNNING = "running"
    BLOCKED = "blocked"
    REVIEW = "review"
    DONE = "done"
    ARCHIVED = "archived"


class Outcome(StrEnum):
    """How a run ended (``task_runs.outcome``)."""

    COMPLETED = "completed"
    BLOCKED = "blocked"
    CRASHED = "crashed"
    TIMED_OUT = "timed_out"
    SPAWN_FAILED = "spawn_failed"
    GAVE_UP = "gave_up"
    RECLAIMED = "reclaimed"
    PROTOCOL_VIOLATION = "protocol_violation"
    RATE_LIMITED = "rate_limited"
    WORKSPACE_MISSING = "workspace_missing"


#: A parent in one of these no longer holds back its children.
FINISHED = frozenset({Status.DONE, Status.ARCHIVED})


#: Failure outcomes that count toward ``consecutive_failures`` and the failure limit.
COUNTED_FAILURES = frozenset(
    {Outcome.CRASHED, Outcome.TIMED_OUT, Outcome.SPAWN_FAILED, Outcome.WORKSPACE_MISSING}
)


#: Outcomes of :func:`fail`: the counted ones, a protocol violation (its own limit,
#: on the streak of such runs) and a rate limit (never counted).
FAILURE_OUTCOMES = COUNTED_FAILURES | {Outcome.PROTOCOL_VIOLATION, Outcome.RATE_LIMITED}


DEFAULT_CLAIM_TTL = 15 * 60
#: How much of an error message a run or event keeps.
ERROR_EXCERPT = 500


@dataclass(frozen=True)
class Change:
    """What a transition did."""

    task_id: str
    action: str
    from_status: str
    to_status: str
    run_id: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id, "action": self.action, "from": self.from_status,
            "to": self.to_status, "run_id": self.run_id,
        }


@dataclass(frozen=True)
class RetryPolicy:
    """When a task that failed or was rate limited may be claimed again."""

    backoff_seconds: float = 30.0
    backoff_max_seconds: float = 1800.0
    rate_limit_cooldown_seconds: float = 300.0

    def backoff(self, failures: int) -> float:
        """Wait after ``failures`` consecutive failures: none after the first (a lone
        crash is usually the environment, and the slot should not idle), then base,
        2x base, 4x base ... up to the maximum."""
        if failures <= 1:
            return 0.0
        return min(self.backoff_seconds * 2 ** (failures - 2), self.backoff_max_seconds)

    def not_before(self, failures: int, last_outcome: str | None, last_end: int | None) -> float:
        """The earliest time a task may be claimed again."""
        if last_end is None:
            return 0.0
        if last_outcome == Outcome.RATE_LIMITED:
            return last_end + self.rate_limit_cooldown_seconds
        return last_end + self.backoff(failures)


#: Ids SparkOps turns into paths, argv elements and hand-over records: Hermes' own
#: (``t_`` + 8 hex) and, for boards other tools wrote, letters, digits, ``_`` and
#: ``-`` (at most 64, starting with a letter or digit). A task with any other id is
#: never started: the dispatcher blocks it, saying why.
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def is_safe_id(value: Any) -> bool:
    return isinstance(value, str) and SAFE_ID.fullmatch(value) is not None


def unsafe_id_reason(task_id: str) -> str:
    return (f"task id {task_id!r} is not a plain id (letters, digits, _ and -, at most 64): SparkOps "
            "will not make it a path or an argument; re-create the task (sparkops task create) and "
            "archive this one")


def new_task_id() -> str:
    """``t_`` and 8 hex digits, as Hermes makes them."""
    return "t_" + secrets.token_hex(4)


@dataclass(frozen=True)
class FailureLimits:
    """The two circuit breakers of :func:`sparkops.board.transitions.fail`: counted
    failures in a row (a task's own ``max_retries`` wins) and protocol violations in
    a row (their own streak)."""

    failure_limit: int = 3
    protocol_violation_limit: int = 3

    @classmethod
    def from_settings(cls, settings: Any) -> FailureLimits:
        return cls(int(settings["dispatch.failure_limit"]), int(settings["dispatch.protocol_violation_limit"]))

    def as_kwargs(self) -> dict[str, int]:
        return {"failure_limit": self.failure_limit, "protocol_violation_limit": self.protocol_violation_limit}


def claim_lock(host: str, pid: int) -> str:
    """The claim lock a process writes on the runs it claims: ``host:pid``, as Hermes'
    workers do (the host names whose reclaimer judges the run)."""
    return f"{host}:{int(pid)}"


def host_of_lock(lock: str | None) -> str:
    """The host of a claim lock ``host:pid`` ("" for none)."""
    return (lock or "").rpartition(":")[0]


def host_lock_pattern(host: str) -> str:
    """A LIKE pattern for the claim locks of ``host`` (``host:pid``), escaped."""
    escaped = host.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return escaped + ":%"


def is_protocol_violation(outcome: str | None, error: str | None, metadata: Any) -> bool:
    """A run that ended as a protocol violation: Hermes' shape (``crashed`` with
    ``metadata.protocol_violation``, or "protocol violation" in the error) or the
    ``protocol_violation`` outcome that earlier SparkOps versions wrote."""
    if outcome == Outcome.PROTOCOL_VIOLATION:
        return True
    if outcome != Outcome.CRASHED:
        return False
    return bool(json_text.object_of(metadata).get("protocol_violation")) or "protocol violation" in (error or "")


