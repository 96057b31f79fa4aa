"""The clock. Library functions take ``now`` (epoch seconds) and call :func:`epoch`.

Tests pass ``now`` explicitly and backdate rows instead of sleeping.
"""

from __future__ import annotations

import time


def epoch(now: float | None = None) -> int:
    """``now`` as whole epoch seconds, or the current time when ``now`` is None."""
    return int(time.time()) if now is None else int(now)
