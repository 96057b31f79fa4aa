"""A run's log: ``dispatch.run_log_root/<task id>/run-<run id>.log``, where the shim
and its agent write (appending), and what a failed run's card says from its end."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sparkops.board import model
from sparkops.config import Settings
from sparkops.core.errors import InvalidInput

LOG_TAIL_LINES = 20


def run_log_path(settings: Settings, task_id: str, run_id: int) -> Path:
    """RUN_LOG_ROOT/<task id>/run-<run id>.log; InvalidInput for an id that is not
    plain (it would leave the root, or be no path at all)."""
    if not model.is_safe_id(task_id):
        raise InvalidInput(model.unsafe_id_reason(task_id))
    return Path(settings["dispatch.run_log_root"]) / task_id / f"run-{int(run_id)}.log"


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Fault|Failure)\b(:.*)?$")
#: The markers Python 3.11 prints under a failing expression (``^^^^``, ``~~~^~~``).
_MARKERS_ONLY = re.compile(r"^\s*[\^~]+\s*$")


def read_log_end(path: Path, max_bytes: int) -> tuple[list[str], bool] | None:
    """The lines of a run log's last ``max_bytes`` (and whether the file is longer,
    so the first line may be cut), or None when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            start = max(0, size - max_bytes)
            fh.seek(start)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return None
    return text.splitlines(), start > 0


def log_tail(path: Path, lines: int = LOG_TAIL_LINES, limit: int = 400) -> str:
    """What a failed run's log says last, at most ``limit`` characters: the
    exception's own line when the log ends in a traceback (``ValueError: bad
    input``: what an operator needs on the card), else its last lines, joined."""
    end = read_log_end(path, 16384)
    if end is None:
        return ""
    kept = [line.rstrip() for line in end[0] if line.strip() and not _MARKERS_ONLY.match(line)]
    tail = kept[-lines:]
    if any(line.startswith("Traceback (most recent call last)") for line in tail):
        exception = next((line for line in reversed(tail) if _EXCEPTION_LINE.match(line)), None)
        if exception is not None:
            return exception[:limit]
    return " | ".join(tail)[-limit:]
