"""The board's integer columns, read as data.

SQLite lets any writer put text in an INTEGER column (Hermes, a hand edit, another
tool): ``'2026-12-01T10:00:00Z'``, ``'high'``, ``'=1+2'``. One odd row must never stop
a dispatch tick, an export, a review or a page, so the board's integers are read
leniently (:class:`LenientInteger`); what is written is unchanged, and the DDL is
Hermes' own.
"""

from __future__ import annotations

import logging
import math
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, TypeDecorator

log = logging.getLogger(__name__)


class LenientInteger(TypeDecorator):
    """An INTEGER column of the board, read as data: SQLite lets another writer put
    any text in it (``'2026-12-01T10:00:00Z'``, ``'high'``, ``'=1+2'``). Read back, an
    integer stays one, a number or an ISO-8601 time (epoch seconds) is converted, and
    anything else becomes None (logged once per column and value kind), so one odd
    row never stops a dispatch tick, an export, a review or a page. The DDL is
    Hermes' own INTEGER; what is written is unchanged."""

    impl = Integer
    cache_ok = True
    _said: set[tuple[str, str]] = set()

    def process_result_value(self, value: Any, dialect: Any) -> int | None:
        return lenient_int(value)


def lenient_int(value: Any) -> int | None:
    """``value`` as an integer if it plainly is one (see :class:`LenientInteger`)."""
    if value is None or isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, float):
        return int(value) if math.isfinite(value) else None
    text_ = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    text_ = text_.strip()
    try:
        return int(text_)
    except ValueError:
        pass
    try:
        number = float(text_)
        return int(number) if math.isfinite(number) else None
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text_.replace("Z", "+00:00").replace("z", "+00:00"))
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return int(moment.timestamp())
    except ValueError:
        pass
    kind = type(value).__name__
    if ("value", kind) not in LenientInteger._said:
        LenientInteger._said.add(("value", kind))
        log.warning("a board integer column holds %r, which is no number or time; read as empty", text_[:80])
    return None


#: Epoch seconds: INTEGER on SQLite (as Hermes declares them), BIGINT on PostgreSQL.
Epoch = LenientInteger().with_variant(BigInteger(), "postgresql")
#: Other integers of the board tables.
Count = LenientInteger().with_variant(Integer(), "postgresql")
