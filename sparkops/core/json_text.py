"""JSON text columns read leniently. Hermes, SparkOps and any other tool write the
board's ``metadata``, ``payload`` and ``info`` columns as JSON text, so a reader gets
whatever another writer put there: these never raise."""

from __future__ import annotations

import json
from typing import Any


def value_of(raw: Any) -> Any:
    """The decoded JSON of ``raw``, or ``raw`` itself when it is not JSON text
    (None, a number, a dict already decoded, text that does not parse)."""
    if isinstance(raw, (str, bytes)) and raw:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    return raw


def object_of(raw: Any) -> dict[str, Any]:
    """``raw`` as a JSON object: ``{}`` for NULL, bad JSON or anything but an object."""
    value = value_of(raw)
    return value if isinstance(value, dict) else {}


def number_of(value: Any) -> float | None:
    """A decoded JSON value as a number: None for anything else (text, a bool, null)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def text_of(value: dict | list | None) -> str | None:
    """A value as JSON text for a column (``None`` for an empty one)."""
    return json.dumps(value, ensure_ascii=False) if value else None
