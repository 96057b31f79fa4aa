"""Usage an agent reports itself: ``sparkops task complete|block --usage-json FILE``
(and the flags ``--prompt-tokens``, ``--generation-tokens``, ``--cost``).

Agents on hosted models know what they used: Claude Code's result message has
``usage`` (``input_tokens``, ``output_tokens``, the cache's input tokens) and
``total_cost_usd``; Codex's ``turn.completed`` and OpenAI-style replies have
``usage`` with ``input_tokens``/``prompt_tokens`` and
``output_tokens``/``completion_tokens``. This module reads any of those shapes, or
SparkOps' own (``prompt_tokens``, ``generation_tokens``, ``cost``, ``currency``,
``model``), and checks every number: a report with a bad or missing figure is
refused with the field named, before anything is written. Kept beside the
measured figures (:mod:`sparkops.meters.ledger`) and preferred where present.

Only the standard library: the report's fast path imports this.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any

from sparkops.core.errors import InvalidInput

#: Names of the prompt tokens, each counted once (Claude's cache tokens are input
#: tokens beside ``input_tokens``; Codex's ``cached_input_tokens`` are inside its
#: ``input_tokens`` and so are not added).
PROMPT_NAMES = ("prompt_tokens", "input_tokens")
CACHE_INPUT_NAMES = ("cache_creation_input_tokens", "cache_read_input_tokens")
GENERATION_NAMES = ("generation_tokens", "completion_tokens", "output_tokens")
COST_NAMES = ("cost", "total_cost_usd", "cost_usd")
SHAPES = ("prompt_tokens/input_tokens, generation_tokens/completion_tokens/output_tokens, "
          "cost/total_cost_usd")


@dataclass(frozen=True)
class Reported:
    """What an agent said it used in one run."""

    prompt_tokens: float | None = None
    generation_tokens: float | None = None
    cost: float | None = None
    currency: str | None = None
    model: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: Any) -> Reported | None:
        """A stored report, leniently (None when it holds nothing usable)."""
        try:
            return parse(data, where="a stored report") if isinstance(data, dict) and data else None
        except InvalidInput:
            return None


def parse(data: Any, *, where: str) -> Reported:
    """A report from ``data`` (a JSON value from ``where``), or InvalidInput."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{where} must be a JSON object with {SHAPES}")
    fields = dict(data["usage"]) if isinstance(data.get("usage"), dict) else {}
    fields.update((k, v) for k, v in data.items() if k != "usage")

    def number(names: tuple[str, ...]) -> float | None:
        for name in names:
            if fields.get(name) is not None:
                return _count(fields[name], f"{where}: {name}")
        return None

    prompt = number(PROMPT_NAMES)
    cache = [_count(fields[n], f"{where}: {n}") for n in CACHE_INPUT_NAMES if fields.get(n) is not None]
    if cache:
        prompt = (prompt or 0.0) + sum(cache)
    generated, cost = number(GENERATION_NAMES), number(COST_NAMES)
    if prompt is None and generated is None and cost is None:
        raise InvalidInput(f"{where} has no token counts or cost: give {SHAPES}")
    currency = _text(fields.get("currency"), f"{where}: currency")
    if currency is None and cost is not None and fields.get("cost") is None:
        currency = "USD"  # total_cost_usd, cost_usd
    return Reported(prompt_tokens=prompt, generation_tokens=generated, cost=cost, currency=currency,
                    model=_text(fields.get("model"), f"{where}: model"))


def of_arguments(usage_json: str | None, prompt_tokens: float | None = None,
                 generation_tokens: float | None = None, cost: float | None = None) -> Reported | None:
    """The report's usage from ``--usage-json FILE`` (``-``: standard input) and the
    flags, which win over the file's figures; None when none was given."""
    found: dict[str, Any] = {}
    if usage_json:
        found = parse(_load(usage_json), where=f"--usage-json {usage_json}").as_dict()
    flags = {"prompt_tokens": prompt_tokens, "generation_tokens": generation_tokens, "cost": cost}
    for name, value in flags.items():
        if value is not None:
            found[name] = _count(value, f"--{name.replace('_', '-')}")
    return parse(found, where="the reported usage") if found else None


def _load(path: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()  # noqa: SIM115
    except OSError as exc:
        raise InvalidInput(f"--usage-json: cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InvalidInput(f"--usage-json {path} is not JSON ({exc}); give a JSON object with {SHAPES}") from None


def _count(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidInput(f"{what} must be a number of at least 0, got {value!r}")
    return float(value)


def _text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or not value.isprintable():
        raise InvalidInput(f"{what} must be a short line of text, got {value!r}")
    return value.strip()
