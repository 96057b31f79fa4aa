"""Times, durations and counts for people, the same in the CLI, the app and the
sprint review: ``7m05s``, ``2026-12-03 14:05``, ``3.2 h``, ``1 run`` / ``3 runs``."""

from __future__ import annotations

import time

HOUR = 3600
DAY = 86400


def duration(seconds: float | None) -> str:
    """``42s``, ``7m05s``, ``3h12m``, ``2d04h``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def when(ts: int | None, *, seconds: bool = True) -> str:
    """Epoch seconds as local ``YYYY-MM-DD HH:MM:SS`` (``HH:MM`` without ``seconds``);
    ``-`` for None."""
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M", time.localtime(ts))


def iso_utc(ts: float | None) -> str | None:
    """Epoch seconds as ISO-8601 UTC (``2026-03-29T01:00:00Z``), for display only."""
    if ts is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(ts)))


def plural(count: int, word: str, many: str | None = None) -> str:
    """``1 run``, ``3 runs``; ``many`` for irregular plurals (``retry``/``retries``)."""
    return f"{count} {word if count == 1 else many or word + 's'}"


def human_seconds(seconds: float | None) -> str:
    """A duration for people: ``45 s``, ``12 min``, ``3.2 h``, ``2.1 d``; ``n/a`` for None."""
    if seconds is None:
        return "n/a"
    s = float(seconds)
    if abs(s) < 60:
        return f"{s:.0f} s"
    if abs(s) < HOUR:
        return f"{s / 60:.0f} min"
    if abs(s) < 2 * DAY:
        return f"{s / HOUR:.1f} h"
    return f"{s / DAY:.1f} d"
