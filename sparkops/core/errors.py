"""Small exceptions that carry data and say what to do.

Every error SparkOps raises on purpose derives from :class:`SparkOpsError` and
carries the exit code the CLI should use: 1 for "not found / refused",
2 for "bad usage, bad configuration or an unusable database".
"""

from __future__ import annotations

EXIT_REFUSED = 1
EXIT_USAGE = 2


class SparkOpsError(Exception):
    """Base class; ``str(err)`` is the one-line message shown to the operator."""

    exit_code = EXIT_REFUSED


class ConfigError(SparkOpsError):
    """A setting, the config file or a secret is wrong."""

    exit_code = EXIT_USAGE


class StorageError(SparkOpsError):
    """A database cannot be used safely (unreadable, not SQLite, unknown schema)."""

    exit_code = EXIT_USAGE


class InvalidInput(SparkOpsError):
    """A value given by the caller is not acceptable (empty title, bad id...)."""

    exit_code = EXIT_USAGE


class NotFound(SparkOpsError):
    """A task or run that does not exist."""

    def __init__(self, kind: str, ident: object):
        self.kind = kind
        self.ident = ident
        super().__init__(f"{kind} {ident} not found")


class Refused(SparkOpsError):
    """A request that is valid but not allowed in the current state."""


class TransitionRefused(Refused):
    """A status change that the state machine does not allow right now."""

    def __init__(self, task_id: str, action: str, status: str, reason: str):
        self.task_id = task_id
        self.action = action
        self.status = status
        self.reason = reason
        super().__init__(f"cannot {action} {task_id}: {reason} (task is {status!r})")


class StaleRun(Refused):
    """A worker reported on a run that is no longer the task's current run."""

    def __init__(self, task_id: str, run_id: int, current_run_id: int | None):
        self.task_id = task_id
        self.run_id = run_id
        self.current_run_id = current_run_id
        current = f"run {current_run_id}" if current_run_id else "no run"
        super().__init__(
            f"run {run_id} is not the current run of {task_id} (it now has {current}); "
            "the report was refused and nothing was changed"
        )
