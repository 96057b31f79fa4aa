"""The export's usage figures: what each run and each task used and cost.

The board's rows come from one snapshot of the board database; their usage is the
ops database's (:mod:`sparkops.meters.ledger`), read as the export reaches each chunk
of rows (``ledger.of_runs`` per chunk of run ids, ``ledger.of_tasks`` per chunk of
task ids) and priced with the ``usage.*`` settings (:class:`~sparkops.meters.spend.Prices`).
A task's figures sum those of its runs in the board's snapshot, so grouping
``runs.csv`` by ``task_id`` gives them. A run with no usage kept (not metered, and
its agent reported nothing) has every figure None ("not measured"), never 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from sparkops.meters import ledger
from sparkops.meters.spend import Prices, Spend, total
from sparkops.storage.db import Database
from sparkops.storage.schema import task_runs

#: runs.csv's usage columns and kinds, after ``metadata``, in this order.
RUN_USAGE = ("prompt_tokens:number generation_tokens:number requests:number energy_wh:number "
             "gpu_seconds:number usage_estimated:integer usage_reported:integer paid:number "
             "energy_cost:number api_cost:number")
#: tasks.csv's, after ``body``.
TASK_USAGE = "tokens:number energy_wh:number gpu_seconds:number cost:number"


def number(value: Any) -> float | None:
    """A figure as a cell of kind *number*: a finite float, else None (empty)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def numbers(column: Sequence[Any]) -> list[float | None]:
    """A column as cells of kind *number*; one of nothing but None (no run metered,
    the usual chunk of an old board) passes as it is, at C speed."""
    if isinstance(column, list) and column.count(None) == len(column):
        return column
    return [v if v is None or (v.__class__ is float and v - v == 0.0) else number(v) for v in column]


class UsageColumns:
    """The usage columns of the rows being exported, chunk by chunk, and the total
    of the runs written (:attr:`total`, every run counted in ``runs``)."""

    def __init__(self, ops: Database, prices: Prices):
        self.ops, self.prices = ops, prices
        self.total = Spend()

    def of_runs(self, run_ids: Sequence[Any]) -> list[list[Any]]:
        """The ten ``runs.csv`` usage columns of ``run_ids`` (one chunk)."""
        found = self._read(ledger.of_runs, [int(r) for r in run_ids])
        if not found:
            self.total = self.total + Spend(runs=len(run_ids))
            return [[None] * len(run_ids) for _ in range(10)]
        rows: list[tuple[Any, ...]] = []
        spends = []
        for run_id in run_ids:
            usage = found.get(int(run_id))
            if usage is None:
                rows.append((None,) * 10)
                continue
            s = Spend.of(usage, self.prices)
            spends.append(s)
            rows.append((s.prompt_tokens, s.generation_tokens, s.requests, s.energy_wh, s.gpu_seconds,
                         s.estimated, s.reported, s.paid, s.energy_cost, s.api_cost))
        self.total = self.total + total(spends) + Spend(runs=len(run_ids) - len(spends))
        return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(10)]

    def of_tasks(self, conn: Connection, task_ids: Sequence[str]) -> list[list[Any]]:
        """The four ``tasks.csv`` usage columns of ``task_ids`` (one chunk): their runs
        in the board's snapshot (``conn``) summed, retries included."""
        found = self._read(ledger.of_tasks, list(task_ids))
        sums: dict[str, Spend] = {}
        if found:
            on_board: dict[str, set[int]] = {}
            query = select(task_runs.c.task_id, task_runs.c.id).where(task_runs.c.task_id.in_(sorted(found)))
            for task_id, run_id in conn.execute(query):
                on_board.setdefault(task_id, set()).add(int(run_id))
            for task_id, runs in found.items():
                mine = on_board.get(task_id, set())
                spends = [Spend.of(u, self.prices) for run_id, u in runs.items() if run_id in mine]
                if spends:
                    sums[task_id] = total(spends)
        if not sums:
            return [[None] * len(task_ids) for _ in range(4)]
        rows = [(s.tokens, s.energy_wh, s.gpu_seconds, s.cost) if (s := sums.get(t)) else (None,) * 4
                for t in task_ids]
        return [list(c) for c in zip(*rows)] if rows else [[] for _ in range(4)]

    def summary(self) -> dict[str, Any]:
        """board.json's ``usage``: the prices and the total of the runs written."""
        p = self.prices
        return {"currency": p.currency, "energy_price_per_kwh": p.per_kwh,
                "api_price_per_million_prompt_tokens": p.prompt_per_million,
                "api_price_per_million_generation_tokens": p.generation_per_million,
                "total": {k: number(v) if isinstance(v, float) else v for k, v in self.total.as_dict().items()}}

    def _read(self, reader: Callable[[Database, Collection[Any]], dict[Any, Any]],
              ids: Collection[Any]) -> dict[Any, Any]:
        if not ids:
            return {}
        try:
            return reader(self.ops, ids)
        except DBAPIError as exc:
            raise self.ops.error("cannot read the runs' usage for the export from", exc) from exc

