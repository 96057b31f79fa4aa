"""The clock. Library functions take ``now`` (epoch seconds) and call :func:`epoch`.

Tests pass ``now`` explicitly and backdate rows instead of sleeping.

On a fleet (a PostgreSQL board shared by several hosts) "now" is the database's:
hosts compare each other's heartbeats and claim expiries, and their own clocks may
disagree. :func:`follow_database` measures this host's offset from the database's
clock (the runner does it again with every host heartbeat) and :func:`epoch` adds
it. On SQLite, one host, the offset stays 0.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from sparkops.storage.db import Database

log = logging.getLogger(__name__)

#: Seconds to add to this host's clock to get the database's.
_offset = 0.0
#: An offset larger than this is logged as a warning (fix NTP on that host).
SKEW_WARNING_SECONDS = 2.0


def epoch(now: float | None = None) -> int:
    """``now`` as whole epoch seconds, or the current time when ``now`` is None."""
    return int(time.time() + _offset) if now is None else int(now)


def now() -> float:
    """The current time, epoch seconds (the database's on a fleet)."""
    return time.time() + _offset


def offset() -> float:
    """This host's offset from the clock that counts (0 unless following a database)."""
    return _offset


def set_offset(seconds: float) -> None:
    global _offset
    _offset = float(seconds)


def follow_database(db: Database) -> float:
    """Use ``db``'s clock from now on (PostgreSQL; a no-op for SQLite); returns the offset."""
    measured = db.clock_offset()
    if measured is None:
        return _offset
    if abs(measured) > SKEW_WARNING_SECONDS and abs(measured - _offset) > 0.5:
        log.warning("this host's clock is %.1f s %s the database's; SparkOps uses the database's",
                    abs(measured), "behind" if measured > 0 else "ahead of")
    set_offset(measured)
    return measured
