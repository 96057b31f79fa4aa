"""What goes into one cell of the export's CSV files (and the app's CSV downloads):
text a spreadsheet would run as a formula, escaped; epoch seconds as ISO 8601 UTC.
Values come from rows other tools write, so any type is taken and none raises."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

#: A text cell starting with one of these gets a ``'`` in front in the CSV files.
FORMULA_START = frozenset("=+-@\t\r'")


def escape_cell(value: Any) -> Any:
    """``'`` in front of text a spreadsheet would run as a formula (or that starts with ``'``)."""
    if isinstance(value, str) and value and value[0] in FORMULA_START:
        return "'" + value
    return value


def unescape_cell(text: str) -> str:
    return text.removeprefix("'")


# -- times --------------------------------------------------------------------------------

_EPOCH_DATE = dt.date(1970, 1, 1)
_CLOCK = tuple(f"T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86400))


class _Dates(dict):
    """Day number since the epoch -> ``YYYY-MM-DD``, computed once per day seen."""

    def __missing__(self, day: int) -> str:
        if len(self) > 100_000:
            self.clear()
        text = self[day] = (_EPOCH_DATE + dt.timedelta(days=day)).isoformat()
        return text


_DATES = _Dates()


def iso_time(value: Any) -> str | None:
    """Epoch seconds as ``2026-11-29T04:20:00Z``; None for None. A value outside
    the years 1-9999, or not a number, is returned as text, unchanged."""
    if value is None:
        return None
    try:
        seconds = int(value)
        return _DATES[seconds // 86400] + _CLOCK[seconds % 86400]
    except (TypeError, ValueError, OverflowError):
        return str(value)


def times(column: Sequence[Any]) -> list[str | None]:
    date, clock = _DATES, _CLOCK
    try:
        return [None if v is None else date[v // 86400] + clock[v % 86400] for v in column]
    except (TypeError, ValueError, OverflowError):  # a float, text or absurd value somewhere
        return [iso_time(v) for v in column]


def escaped(column: Sequence[Any]) -> list[Any]:
    start = FORMULA_START
    try:
        return [("'" + v) if v and v[0] in start else v for v in column]
    except (TypeError, KeyError, IndexError):  # a non-text value in a text column (SQLite)
        return [escape_cell(v) for v in column]
