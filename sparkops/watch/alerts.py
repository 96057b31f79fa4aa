"""Alerts: the log, Telegram and a webhook, with a cooldown per key and a recovery notice.

:func:`notify` is the one entry point. An :class:`Alert` names what it is about
with a ``key`` (``"service:vllm"``, ``"gpu:zombies"``, ``"disk:/data"``); the
cooldown and the recovery state are kept per key in ``ops_alert_state``, so they
survive restarts of the runner.

The rules, per level:

* **error / warning**: sent unless the key was sent less than
  ``alerts.cooldown_minutes`` ago; then it is *suppressed* (recorded, no channel
  called). Sending starts the cooldown (``last_sent_at``) and marks the key
  ``active`` (a problem was alerted). The cooldown is claimed with a conditional
  update, so two processes never both send. If every configured external channel
  fails, the cooldown is handed back, so the next check tries again instead of
  staying silent for the whole cooldown.
* **recovery**: sent only while the key is active, whatever the cooldown, and it
  clears ``active``. A recovery for a key with nothing active is not sent and *not
  recorded* (the watchdog may report "healthy" on every tick; the table holds what
  happened): :func:`notify` returns a record with outcome ``suppressed``, reason
  ``"nothing to recover from"`` and ``id`` None. The recovery does not restart the
  cooldown, so a service that flaps is reported at most once per cooldown.
* **info**: always sent; no cooldown, no state.

Channels: the log always (``ERROR``/``WARNING``/``INFO`` by level); Telegram when
both secrets ``telegram_token`` and ``telegram_chat_id`` are set; a JSON webhook
when ``alerts.webhook_url`` is set. External channels run side by side, each
bounded by ``alerts.timeout_seconds``; one that errors, answers non-2xx or hangs is
recorded as ``"failed: <reason>"`` and never raises or holds up the others.

Every call that is not a no-op recovery writes one ``ops_alerts`` row; its
``outcome`` is ``sent`` (an external channel took it), ``failed`` (external
channels are configured and all failed), ``logged`` (there is only the log) or
``suppressed``; ``channels`` is JSON: channel -> ``"sent"`` | ``"failed: ..."`` |
``"off"``.

The Telegram token is part of the Bot API URL. It never appears in logs, records
or exception text: URLs are shown as ``.../bot***/sendMessage`` and every failure
reason is scrubbed of it.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sparkops import __version__
from sparkops.config import mask_web_url
from sparkops.core.clock import epoch
from sparkops.core.errors import InvalidInput
from sparkops.storage.db import Database
from sparkops.storage.schema import ops_alert_state, ops_alerts

if TYPE_CHECKING:
    from sparkops.jobs.framework import JobContext

log = logging.getLogger(__name__)

#: Telegram rejects longer messages (counted in UTF-16 code units).
TELEGRAM_MAX_CHARS = 4096
#: A failure reason longer than this is cut (it lands in the UI and the log).
MAX_REASON_CHARS = 300
#: How much of an error response is read to explain a failure.
MAX_ERROR_BODY = 4096
NOTHING_TO_RECOVER = "nothing to recover from"


class Level(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    RECOVERY = "recovery"
    INFO = "info"


class Outcome(StrEnum):
    """``ops_alerts.outcome``."""

    SENT = "sent"
    FAILED = "failed"
    LOGGED = "logged"
    SUPPRESSED = "suppressed"


#: Levels that are subject to the cooldown and mark a key active.
PROBLEM_LEVELS = frozenset({Level.ERROR, Level.WARNING})

LOG_LEVELS = {Level.ERROR: logging.ERROR, Level.WARNING: logging.WARNING,
              Level.RECOVERY: logging.INFO, Level.INFO: logging.INFO}
EMOJI = {Level.ERROR: "\U0001F534", Level.WARNING: "\U0001F7E0",
         Level.RECOVERY: "\u2705", Level.INFO: "\u2139\ufe0f"}

CHANNEL_LOG = "log"
CHANNEL_TELEGRAM = "telegram"
CHANNEL_WEBHOOK = "webhook"
OFF = "off"
SENT = "sent"


@dataclass(frozen=True)
class Alert:
    """Something to tell the operator. ``key`` names what it is about."""

    key: str
    level: Level | str
    title: str
    message: str = ""

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "level", Level(self.level))
        except ValueError:
            raise InvalidInput(
                f"alert level must be one of {', '.join(lv.value for lv in Level)}, "
                f"got {self.level!r}"
            ) from None
        if not self.key or not self.key.strip():
            raise InvalidInput("an alert needs a key naming what it is about, e.g. 'service:vllm'")
        if not self.title or not self.title.strip():
            raise InvalidInput(f"alert {self.key!r} needs a title")


@dataclass(frozen=True)
class AlertRecord:
    """What :func:`notify` did; ``id`` is the ``ops_alerts`` row (None if not recorded)."""

    id: int | None
    created_at: int
    host: str
    key: str
    level: str
    title: str
    message: str
    outcome: Outcome
    channels: dict[str, str] = field(default_factory=dict)
    reason: str | None = None  # why it was suppressed


# -- the entry point ---------------------------------------------------------------


def notify(ctx: JobContext, alert: Alert, *, now: float | None = None) -> AlertRecord:
    """Tell the operator about ``alert`` through every configured channel, subject
    to the cooldown and recovery rules (see the module docstring). Never raises
    for a channel's failure; a database error does raise."""
    ts = epoch(now)
    db = ctx.store.ops
    level = Level(alert.level)
    base = {"created_at": ts, "host": ctx.host, "key": alert.key, "level": level.value,
            "title": alert.title, "message": alert.message}

    previous: int | None = None  # the cooldown before this claim, to hand back on failure
    if level is Level.RECOVERY:
        with db.write() as conn:
            claimed = conn.execute(
                update(ops_alert_state)
                .where(ops_alert_state.c.key == alert.key, ops_alert_state.c.active == 1)
                .values(active=0)).rowcount == 1
        if not claimed:
            log.debug("alert %s: recovery not sent, %s", alert.key, NOTHING_TO_RECOVER)
            return AlertRecord(id=None, outcome=Outcome.SUPPRESSED, reason=NOTHING_TO_RECOVER, **base)
    elif level in PROBLEM_LEVELS:
        cooldown = float(ctx.settings["alerts.cooldown_minutes"]) * 60.0
        with db.write() as conn:
            claimed, previous = _claim_cooldown(conn, alert.key, ts, cooldown)
            if not claimed:
                reason = _cooldown_reason(ts, previous, cooldown)
                row_id = _record(conn, base, Outcome.SUPPRESSED, {})
        if not claimed:
            log.debug("alert %s suppressed: %s", alert.key, reason)
            return AlertRecord(id=row_id, outcome=Outcome.SUPPRESSED, reason=reason, **base)

    log.log(LOG_LEVELS[level], "alert %s [%s] %s: %s", alert.key, level.value, alert.title,
            alert.message)
    timeout = float(ctx.settings["alerts.timeout_seconds"])
    channels = {CHANNEL_LOG: SENT,
                **_deliver(_channels(ctx), alert, host=ctx.host, created_at=ts, timeout=timeout)}
    external = {name: status for name, status in channels.items()
                if name != CHANNEL_LOG and status != OFF}
    if not external:
        outcome = Outcome.LOGGED
    elif any(status == SENT for status in external.values()):
        outcome = Outcome.SENT
    else:
        outcome = Outcome.FAILED

    with db.write() as conn:
        if outcome is Outcome.FAILED:
            _hand_back(conn, alert.key, level, ts, previous)
        row_id = _record(conn, base, outcome, channels)
    return AlertRecord(id=row_id, outcome=outcome, channels=channels, **base)


def send_unrecorded(ctx: JobContext, alert: Alert, *, now: float | None = None) -> dict[str, str]:
    """Log and deliver ``alert`` without the database (no cooldown, no record): for
    when the ops database cannot be written (a full disk). The caller sends it once."""
    ts = epoch(now)
    level = Level(alert.level)
    log.log(LOG_LEVELS[level], "alert %s [%s] %s: %s (not recorded: the ops database cannot be written)",
            alert.key, level.value, alert.title, alert.message)
    return {CHANNEL_LOG: SENT, **_deliver(_channels(ctx), alert, host=ctx.host, created_at=ts,
                                          timeout=float(ctx.settings["alerts.timeout_seconds"]))}


# -- reading, for the UI and the CLI ------------------------------------------------


def recent(ops_db: Database, *, since: float | None = None, limit: int | None = 100,
           key: str | None = None) -> list[dict[str, Any]]:
    """Alerts, newest first, with ``channels`` decoded from JSON."""
    query = select(ops_alerts)
    if since is not None:
        query = query.where(ops_alerts.c.created_at >= epoch(since))
    if key is not None:
        query = query.where(ops_alerts.c.key == key)
    query = query.order_by(ops_alerts.c.created_at.desc(), ops_alerts.c.id.desc())
    if limit:
        query = query.limit(limit)
    with ops_db.read() as conn:
        rows = [dict(r._mapping) for r in conn.execute(query)]
    for row in rows:
        try:
            row["channels"] = json.loads(row["channels"]) if row["channels"] else {}
        except ValueError:
            pass  # leave text that is not JSON as it is
    return rows


def state(ops_db: Database, key: str) -> dict[str, Any] | None:
    """The cooldown and recovery state of ``key``: ``last_sent_at`` (start of the
    cooldown, None if never sent) and ``active`` (a problem was alerted and has not
    recovered); None for a key never alerted."""
    with ops_db.read() as conn:
        row = conn.execute(select(ops_alert_state)
                           .where(ops_alert_state.c.key == key)).mappings().first()
    if row is None:
        return None
    return {"key": row["key"], "last_sent_at": row["last_sent_at"], "active": bool(row["active"])}


# -- the state ------------------------------------------------------------------------


def _claim_cooldown(conn: Connection, key: str, ts: int, cooldown: float) -> tuple[bool, int | None]:
    """Start the cooldown of ``key`` at ``ts`` unless it is running. Returns whether
    this call won, and ``last_sent_at`` as it was before."""
    previous = conn.execute(select(ops_alert_state.c.last_sent_at)
                            .where(ops_alert_state.c.key == key)).first()
    cutoff = math.floor(ts - cooldown)  # sent at or before this: the cooldown is over
    won = conn.execute(
        update(ops_alert_state)
        .where(ops_alert_state.c.key == key,
               (ops_alert_state.c.last_sent_at.is_(None)) | (ops_alert_state.c.last_sent_at <= cutoff))
        .values(last_sent_at=ts, active=1)).rowcount == 1
    if won or previous is not None:
        return won, previous[0] if previous is not None else None
    try:
        with conn.begin_nested():
            conn.execute(insert(ops_alert_state).values(key=key, last_sent_at=ts, active=1))
    except IntegrityError:
        # Another process claimed this new key a moment ago (PostgreSQL; SQLite
        # writers are serialized by BEGIN IMMEDIATE).
        return False, None
    return True, None


def _hand_back(conn: Connection, key: str, level: Level, ts: int, previous: int | None) -> None:
    """Nothing external got the alert: undo the claim so the next check retries."""
    if level in PROBLEM_LEVELS:
        conn.execute(update(ops_alert_state)
                     .where(ops_alert_state.c.key == key, ops_alert_state.c.last_sent_at == ts)
                     .values(last_sent_at=previous))
    elif level is Level.RECOVERY:
        conn.execute(update(ops_alert_state)
                     .where(ops_alert_state.c.key == key, ops_alert_state.c.active == 0)
                     .values(active=1))


def _cooldown_reason(ts: int, last: int | None, cooldown: float) -> str:
    if last is None:  # lost a race for a new key
        return "another process sent this alert a moment ago"
    left = max(0, math.ceil(last + cooldown - ts))
    return f"cooldown: sent {max(0, ts - last) // 60} min ago, {left // 60} min {left % 60} s left"


def _record(conn: Connection, base: dict[str, Any], outcome: Outcome,
            channels: dict[str, str]) -> int:
    result = conn.execute(insert(ops_alerts).values(
        **base, outcome=outcome.value, channels=json.dumps(channels, sort_keys=True)))
    return int(result.inserted_primary_key[0])


# -- the channels -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Channel:
    """One external channel: where to POST, what, and how to show the URL."""

    name: str
    url: str | None  # None: not configured ("off")
    display_url: str = ""
    body: Callable[[Alert, str, int], dict[str, Any]] | None = None
    secret: str | None = None  # scrubbed from every failure reason


def _channels(ctx: JobContext) -> list[_Channel]:
    settings, secrets = ctx.settings, ctx.secrets
    token = (secrets.telegram_token or "").strip()
    chat_id = (secrets.telegram_chat_id or "").strip()
    api = str(settings["alerts.telegram_api_url"]).rstrip("/")
    telegram = _Channel(CHANNEL_TELEGRAM, None)
    if token and chat_id:
        telegram = _Channel(
            CHANNEL_TELEGRAM, f"{api}/bot{quote(token, safe=':')}/sendMessage",
            display_url=f"{api}/bot***/sendMessage",
            body=lambda alert, host, ts: {"chat_id": chat_id, "text": telegram_text(alert, host),
                                          "disable_web_page_preview": True},
            secret=token)
    webhook_url = str(settings["alerts.webhook_url"] or "").strip()
    webhook = _Channel(CHANNEL_WEBHOOK, None)
    if webhook_url:
        webhook = _Channel(
            CHANNEL_WEBHOOK, webhook_url, display_url=mask_web_url(webhook_url), secret=webhook_url,
            body=lambda alert, host, ts: {"key": alert.key, "level": Level(alert.level).value,
                                          "title": alert.title, "message": alert.message,
                                          "host": host, "created_at": ts})
    return [telegram, webhook]


def _deliver(channels: list[_Channel], alert: Alert, *, host: str, created_at: int,
             timeout: float) -> dict[str, str]:
    """POST ``alert`` to every configured channel at once; wait at most about
    ``timeout`` seconds for all of them. Returns channel -> status."""
    results: dict[str, str] = {c.name: OFF for c in channels if c.url is None}
    live = [c for c in channels if c.url is not None]
    lock = threading.Lock()

    def send(channel: _Channel) -> None:
        status = _post(channel, alert, host, created_at, timeout)
        with lock:
            results.setdefault(channel.name, status)

    threads = [threading.Thread(target=send, args=(c,), name=f"alert-{c.name}", daemon=True)
               for c in live]
    for thread in threads:
        thread.start()
    # The socket timeout bounds each connect and read; the deadline bounds a
    # server that trickles bytes. A thread past it is left behind (daemon).
    deadline = time.monotonic() + timeout + 0.25
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    with lock:
        for channel in live:
            results.setdefault(channel.name, f"failed: no answer within {timeout:g} s")
        statuses = dict(results)
    for channel in live:
        if statuses[channel.name] != SENT:
            log.warning("alert %s: channel %s (%s) %s", alert.key, channel.name,
                        channel.display_url, statuses[channel.name])
    return {c.name: statuses[c.name] for c in channels}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would turn the POST into a GET without the alert: report it."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _post(channel: _Channel, alert: Alert, host: str, created_at: int, timeout: float) -> str:
    """One POST; "sent" or "failed: <reason>" (scrubbed). Never raises."""
    assert channel.url is not None and channel.body is not None
    try:
        data = json.dumps(channel.body(alert, host, created_at)).encode()
        request = urllib.request.Request(
            channel.url, data=data, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": f"sparkops/{__version__}"})
        opener = urllib.request.build_opener(_NoRedirect)
        with opener.open(request, timeout=timeout) as response:
            payload = response.read(MAX_ERROR_BODY)
        problem = _telegram_refusal(payload) if channel.name == CHANNEL_TELEGRAM else None
        status = f"failed: {problem}" if problem else SENT
    except urllib.error.HTTPError as exc:
        try:
            detail = _telegram_refusal(exc.read(MAX_ERROR_BODY)) or ""
        except OSError:  # the status code is reason enough
            detail = ""
        status = f"failed: HTTP {exc.code}" + (f": {detail}" if detail else "")
    except urllib.error.URLError as exc:
        status = f"failed: {_reason(exc.reason)}"
    except Exception as exc:  # noqa: BLE001 - a channel never stops the others
        status = f"failed: {_reason(exc)}"
    return _scrub(status, channel.secret)


def _telegram_refusal(payload: bytes) -> str | None:
    """Telegram answers ``{"ok": false, "description": ...}`` when it refuses."""
    try:
        answer = json.loads(payload.decode("utf-8", "replace"))
    except ValueError:
        return None
    if isinstance(answer, dict) and answer.get("ok") is False:
        return str(answer.get("description") or "refused")
    return None


def _reason(exc: object) -> str:
    """A short reason: "timed out", "Connection refused", "ValueError: ..."."""
    if isinstance(exc, str):
        return exc
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _scrub(text: str, secret: str | None) -> str:
    """``text`` without ``secret`` (a token, or a whole webhook URL with its path and
    query, in any of its quoted forms)."""
    if secret:
        parts = [secret]
        if "://" in secret:  # a URL: its tail alone is a secret too
            tail = secret.split("://", 1)[1].partition("/")[2]
            parts += [tail, "/" + tail] if len(tail) >= 4 else []
        for part in sorted(parts, key=len, reverse=True):
            for form in {part, quote(part, safe=""), quote(part, safe=":"), quote(part, safe="/:")}:
                text = text.replace(form, "***")
    if len(text) > MAX_REASON_CHARS:
        text = text[: MAX_REASON_CHARS - 1] + "\u2026"
    return text


def telegram_text(alert: Alert, host: str) -> str:
    """The message as Telegram shows it, trimmed to Telegram's limit."""
    level = Level(alert.level)
    text = f"{EMOJI[level]} {alert.title}\n{alert.message}".rstrip() + f"\n\u2014 {host}"
    return _trim_utf16(text, TELEGRAM_MAX_CHARS)


def _trim_utf16(text: str, limit: int) -> str:
    if len(text.encode("utf-16-le")) // 2 <= limit:
        return text
    out, used = [], 1  # room for the ellipsis
    for char in text:
        units = len(char.encode("utf-16-le")) // 2
        if used + units > limit:
            break
        out.append(char)
        used += units
    return "".join(out) + "\u2026"
