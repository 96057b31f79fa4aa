"""The review job: the seed's "CTO review", as a markdown report every 10 minutes.

:func:`run` (the ``review`` job):

1. resolves every task's phase and records phase boundaries once
   (:mod:`sparkops.board.phases`), alerting each and, when configured, promoting the
   next phase;
2. computes the sprint metrics over ``review.window_hours`` (:mod:`sparkops.sprint.metrics`);
3. writes a markdown report: the metrics, the phase table, the boundaries since the
   last review, and the risks (stuck signals, poison tasks, blocked age);
4. asks the local model (an OpenAI-compatible ``/v1/chat/completions``,
   ``review.model_url``) for a short narrative, with a bounded timeout; when it is
   off, unreachable, slow or answers nonsense, the report says so and keeps its
   deterministic summary;
5. stores the report in ``ops_reports`` and as a file under ``review.reports_dir``
   (written to a temp file, then renamed).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import desc, insert, select

from sparkops.board import phases
from sparkops.config import Settings
from sparkops.core.clock import epoch
from sparkops.jobs.framework import JobContext, JobReport
from sparkops.meters.spend import Prices, describe, energy_text, money_text, tokens_text
from sparkops.sprint import costs, measure, metrics
from sparkops.storage.schema import ops_events, ops_reports
from sparkops.watch import alerts

log = logging.getLogger(__name__)

NARRATIVE_PROMPT = (
    "You are the engineering lead reviewing an autonomous AI coding sprint. In one short "
    "paragraph (at most 120 words), say how the sprint is going and the one thing to act "
    "on next. Use only the facts below; do not invent numbers.\n\n"
)
#: Model servers answer on loopback: no proxy from the environment between them.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Narrative:
    status: str  # ok | off | unreachable | timed out | garbage
    text: str


def run(ctx: JobContext, *, now: float | None = None) -> JobReport:
    ts = epoch(now)
    settings = ctx.settings
    mapping = phases.resolve(ctx.store.board, ctx.store.ops, settings["review.phase_patterns"])
    new = phases.record_boundaries(ctx.store.board, ctx.store.ops, mapping,
                                   promote_next=settings["review.promote_next_phase"], now=ts)
    for boundary in new:
        promoted = f"; promoted {len(boundary.promoted)} task(s) of the next phase" if boundary.promoted else ""
        alerts.notify(ctx, alerts.Alert(f"phase:{boundary.phase}", "info", f"Phase {boundary.phase} finished",
                                        f"{boundary.tasks} tasks, the last {boundary.last_task_id}{promoted}"),
                      now=ts)
    computed = measure.compute(ctx.store.board, now=ts, phase_of={t: p.phase for t, p in mapping.items()},
                               **measure.options_from(settings))
    phase_rows = phases.summary(ctx.store.board, mapping)
    previous = _last_review_at(ctx)
    since_last = phases.recorded(ctx.store.ops, after=previous)
    spent = costs.compute(ctx.store.board, ctx.store.ops, Prices.of(settings),
                          phase_of={t: p.phase for t, p in mapping.items()},
                          since=ts - float(settings["review.window_hours"]) * 3600)
    facts = render(computed, phase_rows, since_last, now=ts, spent=spent)
    narrative = narrate(settings, facts)
    markdown = facts + "\n## Narrative\n\n" + (
        narrative.text if narrative.status == "ok" else f"_No narrative: {narrative.text}_") + "\n"
    path = write_report(Path(settings["review.reports_dir"]), markdown, ts)
    with ctx.store.ops.write() as conn:
        report_id = conn.execute(insert(ops_reports).values(
            created_at=ts, host=ctx.host, path=str(path), narrative=narrative.status, markdown=markdown,
            metrics=json.dumps(computed.as_dict(series=False), default=str))).inserted_primary_key[0]
        conn.execute(insert(ops_events).values(created_at=ts, kind="review", subject=str(report_id),
                                               payload=json.dumps({"path": str(path),
                                                                   "narrative": narrative.status})))
    boundaries = f"; phase(s) finished: {', '.join(b.phase for b in new)}" if new else ""
    return JobReport(f"report {report_id} written to {path} (narrative: {narrative.status}){boundaries}",
                     details={"report_id": report_id, "path": str(path), "narrative": narrative.status,
                              "boundaries": [b.as_dict() for b in new]})


def _last_review_at(ctx: JobContext) -> int | None:
    with ctx.store.ops.read() as conn:
        return conn.execute(select(ops_reports.c.created_at).order_by(desc(ops_reports.c.id)).limit(1)).scalar()


def render(computed: metrics.Metrics, phase_rows: list[dict[str, Any]],
           boundaries: list[phases.Boundary], *, now: int, spent: costs.Costs | None = None) -> str:
    """The deterministic part of the report."""
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now))
    lines = [f"# Sprint review, {when}", "", "## Summary", ""]
    lines += [f"- {line}" for line in computed.summary_lines(risks=False)]
    lines += ["", "## Phases", "", "| phase | total | done | open | blocked | running | last completed |",
              "|---|---|---|---|---|---|---|"]
    eta = {e["phase"]: e for e in computed.as_dict(series=False).get("phases") or []}
    for row in phase_rows:
        last = time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["last_completed_at"])) \
            if row["last_completed_at"] else "-"
        lines.append(f"| {row['phase']} | {row['total']} | {row['done']} | {row['open']} | {row['blocked']} "
                     f"| {row['running']} | {last} |")
    if eta:
        lines += ["", "ETA per phase (open tasks at the recent throughput): " + ", ".join(
            f"{p}: {e.get('eta') or 'unknown'}" for p, e in eta.items() if e.get("open"))]
    lines += ["", "## Phase boundaries since the last review", ""]
    lines += [f"- {b.phase} finished at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(b.reached_at))} "
              f"({b.tasks} tasks)" + (f"; promoted {', '.join(b.promoted)}" if b.promoted else "")
              for b in boundaries] or ["- none"]
    lines += ["", "## Risks", ""]
    lines += [f"- {r}" for r in computed.risk_lines()] or ["- none"]
    if spent is not None:
        lines += ["", "## Cost", "", *cost_lines(spent)]
    return "\n".join(lines) + "\n"


def cost_lines(spent: costs.Costs) -> list[str]:
    """The report's cost section: what the window's runs spent, by phase and outcome,
    and the costliest tasks (by id: a title is another tool's text)."""
    total, prices = spent.total, spent.prices
    lines = [f"- Runs in the window: {total.runs}; {describe(total, prices)}"]
    if not spent.measured_any:
        return lines
    for key in ("phase", "outcome"):
        lines += ["", f"| {key} | runs | tokens | energy | cost |", "|---|---|---|---|---|"]
        for row in costs.by(spent, key).to_dict(orient="records"):
            lines.append(f"| {_cell(row[key])} | {row['runs']} | {tokens_text(_known(row['tokens']))} "
                         f"| {energy_text(_known(row['energy_wh']))} "
                         f"| {money_text(_known(row['cost']), prices.currency)} |")
    top = costs.most_expensive(spent, 3)
    if len(top):
        lines += ["", "Costliest tasks: " + ", ".join(
            f"{row['task_id']} ({tokens_text(_known(row['tokens']))}, {energy_text(_known(row['energy_wh']))})"
            for row in top.to_dict(orient="records"))]
    return lines


def _cell(value: Any) -> str:
    """A phase name or an outcome (text other tools may have written) as a plain table cell."""
    return re.sub(r"[^\w .:()/-]", "?", str(value))[:60]


def _known(value: Any) -> float | None:
    return None if value is None or value != value else float(value)  # NaN: not measured


def narrate(settings: Settings, facts: str) -> Narrative:
    """One paragraph from the local model, or why there is none."""
    url = settings["review.model_url"]
    if not url:
        return Narrative("off", "review.model_url is empty")
    timeout = settings["review.model_timeout_seconds"]
    deadline = time.monotonic() + timeout
    try:
        model = settings["review.model"] or _first_model(url, timeout)
        body = json.dumps({"model": model, "temperature": 0.2, "max_tokens": 300,
                           "messages": [{"role": "user", "content": NARRATIVE_PROMPT + facts[:6000]}]}).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        remaining = max(0.1, deadline - time.monotonic())
        with _DIRECT.open(request, timeout=remaining) as response:
            answer = json.loads(response.read(1_000_000))
        text = answer["choices"][0]["message"]["content"]
        if not isinstance(text, str) or not text.strip():
            raise ValueError("an empty answer")
        return Narrative("ok", text.strip()[:2000])
    except (TimeoutError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            return Narrative("timed out", f"the model at {url} did not answer within {timeout:g}s")
        return Narrative("unreachable", f"the model at {url} is unreachable ({reason})")
    except (ValueError, KeyError, IndexError, TypeError) as exc:
        return Narrative("garbage", f"the model at {url} answered something that is not a chat completion ({exc})")
    except OSError as exc:
        return Narrative("unreachable", f"the model at {url} is unreachable ({exc})")


def _first_model(url: str, timeout: float) -> str:
    models_url = url.rsplit("/chat/completions", 1)[0] + "/models"
    with _DIRECT.open(models_url, timeout=timeout) as response:
        return json.loads(response.read(1_000_000))["data"][0]["id"]


def write_report(directory: Path, markdown: str, now: int) -> Path:
    """``review-YYYYMMDDTHHMMSSZ.md``, written to a temp file and renamed."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"review-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime(now))}.md"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(markdown)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def latest(ops_db, *, limit: int = 10) -> list[dict[str, Any]]:
    """The latest reports, newest first, for the app."""
    with ops_db.read() as conn:
        rows = conn.execute(select(ops_reports).order_by(desc(ops_reports.c.id)).limit(limit)).all()
    return [dict(r._mapping) for r in rows]
