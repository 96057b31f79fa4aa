"""Alerts against real HTTP servers on 127.0.0.1: a Telegram Bot API stand-in and a
webhook stand-in that record what they get, and ones that answer 500, refuse
connections or hang. The cooldown lives in a real ops database (SQLite, and
PostgreSQL where one answers); time is passed as ``now=``.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import NOW, make_settings
from sqlalchemy import select

from sparkops.config import Secrets, Settings
from sparkops.core.errors import InvalidInput
from sparkops.jobs.framework import JobContext
from sparkops.storage.schema import ops_alert_state, ops_alerts
from sparkops.storage.store import Store, open_store
from sparkops.watch import alerts
from sparkops.watch.alerts import Alert, Outcome, notify, recent, state

TOKEN = "987654321:SPARKOPS-TEST-TOKEN-do-not-leak-Zq81"
CHAT_ID = "-100424242"
MIN = 60


# -- real HTTP stand-ins ----------------------------------------------------------------


@dataclass
class Received:
    path: str
    body: dict[str, Any]
    headers: dict[str, str]


@dataclass
class StandIn:
    """A real HTTP server on 127.0.0.1 that records each POST and answers ``status``
    with ``body`` after ``delay`` seconds (a hang ends early when the test ends)."""

    status: int = 200
    body: bytes = b'{"ok": true, "result": {}}'
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    received: list[Received] = field(default_factory=list)

    def start(self) -> StandIn:
        stand_in = self
        self.release = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                stand_in.received.append(Received(self.path, json.loads(raw), dict(self.headers)))
                if stand_in.delay:
                    stand_in.release.wait(stand_in.delay)
                try:
                    self.send_response(stand_in.status)
                    for name, value in stand_in.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(stand_in.body)))
                    self.end_headers()
                    self.wfile.write(stand_in.body)
                except OSError:
                    pass  # the client gave up (the hang test)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,),
                                       daemon=True)
        self.thread.start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., StandIn]]:
    started: list[StandIn] = []

    def start(**kwargs: Any) -> StandIn:
        started.append(StandIn(**kwargs).start())
        return started[-1]

    yield start
    for stand_in in started:
        stand_in.stop()


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """urllib honours *_proxy variables; these requests go to loopback only."""
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# -- contexts on a real ops database ------------------------------------------------------


@pytest.fixture
def make_ctx(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., JobContext]]:
    """``make_ctx(telegram=URL, webhook=URL, timeout=S, backend=..., secrets=...)``: a job
    context with a freshly opened store on the ops database of this test (the same
    database for every call, so a second call is a restart)."""
    stores: list[Store] = []
    urls: dict[str, str] = {}

    def make(*, telegram: str | None = None, webhook: str | None = None, timeout: float = 2.0,
             backend: str = "sqlite", secrets: Secrets | None = None, cooldown: float = 30) -> JobContext:
        if backend == "postgresql" and not urls:
            pg = request.getfixturevalue("pg_url")
            urls.update(board_url=pg, ops_url=pg)
        env = {"SPARKOPS_ALERTS_TIMEOUT_SECONDS": str(timeout),
               "SPARKOPS_ALERTS_COOLDOWN_MINUTES": str(cooldown),
               "SPARKOPS_HOST_NAME": "gb10-test"}
        if webhook:
            env["SPARKOPS_ALERTS_WEBHOOK_URL"] = webhook + "/hook/s3cret-path"
        if telegram:
            env["SPARKOPS_ALERTS_TELEGRAM_API_URL"] = telegram
        settings: Settings = make_settings(tmp_path, **urls, **env)
        store = open_store(settings, create=True, now=NOW)
        stores.append(store)
        if secrets is None:
            secrets = Secrets(telegram_token=TOKEN, telegram_chat_id=CHAT_ID) if telegram else Secrets()
        return JobContext.create(settings, store, secrets=secrets)

    yield make
    for store in stores:
        store.dispose()


def vllm_down(level: str = "error", key: str = "service:vllm") -> Alert:
    return Alert(key, level, "vLLM is down", "GET /health: connection refused")


def rows(ctx: JobContext) -> list[dict[str, Any]]:
    with ctx.store.ops.read() as conn:
        return [dict(r._mapping) for r in conn.execute(select(ops_alerts).order_by(ops_alerts.c.id))]


# -- the channels ---------------------------------------------------------------------------


def test_telegram_gets_the_alert_at_the_bot_api_path(make_ctx, serve) -> None:
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url)

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.outcome == Outcome.SENT
    assert record.channels == {"log": "sent", "telegram": "sent", "webhook": "off"}
    [got] = telegram.received
    assert got.path == f"/bot{TOKEN}/sendMessage"
    assert got.headers["Content-Type"] == "application/json"
    assert got.body["chat_id"] == CHAT_ID
    assert got.body["disable_web_page_preview"] is True
    text = got.body["text"]
    assert text.startswith("\U0001F534 vLLM is down\n")
    assert "GET /health: connection refused" in text and "gb10-test" in text
    [row] = recent(ctx.store.ops)
    assert (row["id"], row["outcome"], row["channels"]) == (record.id, "sent", record.channels)
    assert (row["created_at"], row["host"], row["key"], row["level"]) == (
        NOW, "gb10-test", "service:vllm", "error")


def test_webhook_gets_the_alert_as_json(make_ctx, serve) -> None:
    hook = serve(status=204, body=b"")
    ctx = make_ctx(webhook=hook.url)

    record = notify(ctx, vllm_down("warning", "disk:/data"), now=NOW)

    assert record.outcome == Outcome.SENT
    assert record.channels == {"log": "sent", "telegram": "off", "webhook": "sent"}
    [got] = hook.received
    assert got.path == "/hook/s3cret-path"
    assert got.body == {"key": "disk:/data", "level": "warning", "title": "vLLM is down",
                        "message": "GET /health: connection refused", "host": "gb10-test",
                        "created_at": NOW}


def test_both_channels_get_every_alert(make_ctx, serve) -> None:
    telegram, hook = serve(), serve()
    ctx = make_ctx(telegram=telegram.url, webhook=hook.url)

    record = notify(ctx, Alert("gpu:zombies", "info", "Killed 1 zombie", "pid 4242, 110 GB"), now=NOW)

    assert record.channels == {"log": "sent", "telegram": "sent", "webhook": "sent"}
    assert telegram.received[0].body["text"].startswith("\u2139\ufe0f Killed 1 zombie")
    assert hook.received[0].body["level"] == "info"


def test_telegram_text_is_trimmed_to_4096_utf16_units(make_ctx, serve) -> None:
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url)

    notify(ctx, Alert("service:vllm", "error", "Traceback", "\U0001F525" * 3000), now=NOW)

    text = telegram.received[0].body["text"]
    assert len(text.encode("utf-16-le")) // 2 <= alerts.TELEGRAM_MAX_CHARS
    assert text.endswith("\u2026") and text.startswith("\U0001F534 Traceback")
    short = alerts.telegram_text(Alert("k", "recovery", "vLLM is back", "ok"), "h")
    assert short == "\u2705 vLLM is back\nok\n\u2014 h"


def test_no_channel_configured_is_logged(make_ctx, caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="sparkops.watch.alerts")
    ctx = make_ctx(secrets=Secrets(telegram_token=TOKEN))  # a token without a chat id: no Telegram

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.outcome == Outcome.LOGGED
    assert record.channels == {"log": "sent", "telegram": "off", "webhook": "off"}
    [logged] = [r for r in caplog.records if r.name == "sparkops.watch.alerts"]
    assert logged.levelno == logging.ERROR
    assert "service:vllm" in logged.getMessage() and "vLLM is down" in logged.getMessage()
    assert rows(ctx)[0]["outcome"] == "logged"


@pytest.mark.parametrize(("level", "logged_at"), [
    ("warning", logging.WARNING), ("info", logging.INFO), ("recovery", logging.INFO)])
def test_log_level_follows_the_alert_level(make_ctx, caplog, level, logged_at) -> None:
    caplog.set_level(logging.DEBUG, logger="sparkops.watch.alerts")
    ctx = make_ctx(cooldown=0)
    notify(ctx, vllm_down(), now=NOW)  # something to recover from
    caplog.clear()

    notify(ctx, vllm_down(level), now=NOW + MIN)

    assert [r.levelno for r in caplog.records if r.name == "sparkops.watch.alerts"] == [logged_at]


# -- the cooldown ----------------------------------------------------------------------------


def test_a_repeat_inside_the_cooldown_is_suppressed_and_recorded(make_ctx, serve, backend) -> None:
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url, backend=backend)

    first = notify(ctx, vllm_down(), now=NOW)
    repeat = notify(ctx, vllm_down(), now=NOW + 29 * MIN)
    after = notify(ctx, vllm_down(), now=NOW + 31 * MIN)

    assert [first.outcome, repeat.outcome, after.outcome] == ["sent", "suppressed", "sent"]
    assert repeat.channels == {} and repeat.reason == "cooldown: sent 29 min ago, 1 min 0 s left"
    assert len(telegram.received) == 2
    assert [(r["created_at"], r["outcome"]) for r in recent(ctx.store.ops)] == [
        (NOW + 31 * MIN, "sent"), (NOW + 29 * MIN, "suppressed"), (NOW, "sent")]
    assert state(ctx.store.ops, "service:vllm") == {
        "key": "service:vllm", "last_sent_at": NOW + 31 * MIN, "active": True}


def test_the_cooldown_survives_a_restart(make_ctx, serve, backend) -> None:
    telegram = serve()
    before = make_ctx(telegram=telegram.url, backend=backend)
    assert notify(before, vllm_down(), now=NOW).outcome == Outcome.SENT
    before.store.dispose()

    after = make_ctx(telegram=telegram.url, backend=backend)  # a new store on the same database
    assert after.store is not before.store

    assert notify(after, vllm_down(), now=NOW + 10 * MIN).outcome == Outcome.SUPPRESSED
    assert notify(after, vllm_down(), now=NOW + 30 * MIN).outcome == Outcome.SENT
    assert len(telegram.received) == 2


def test_the_cooldown_is_per_key_and_warnings_share_it(make_ctx) -> None:
    ctx = make_ctx()

    assert notify(ctx, vllm_down(), now=NOW).outcome == Outcome.LOGGED
    assert notify(ctx, vllm_down(key="service:redis"), now=NOW + 1).outcome == Outcome.LOGGED
    assert notify(ctx, vllm_down("warning"), now=NOW + 2).outcome == Outcome.SUPPRESSED
    # info is never held back and leaves the state alone
    assert notify(ctx, vllm_down("info"), now=NOW + 3).outcome == Outcome.LOGGED
    assert notify(ctx, vllm_down("info"), now=NOW + 4).outcome == Outcome.LOGGED
    assert state(ctx.store.ops, "service:vllm")["last_sent_at"] == NOW
    assert state(ctx.store.ops, "never") is None


def test_a_zero_cooldown_sends_every_time(make_ctx) -> None:
    ctx = make_ctx(cooldown=0)
    assert [notify(ctx, vllm_down(), now=NOW).outcome for _ in range(3)] == ["logged"] * 3


# -- recovery ------------------------------------------------------------------------------------


def test_recovery_is_sent_once_after_an_error(make_ctx, serve) -> None:
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url)
    back = Alert("service:vllm", "recovery", "vLLM is back", "healthy again")

    assert notify(ctx, vllm_down(), now=NOW).outcome == Outcome.SENT
    recovered = notify(ctx, back, now=NOW + MIN)  # inside the error's cooldown
    again = notify(ctx, back, now=NOW + 2 * MIN)

    assert recovered.outcome == Outcome.SENT
    assert telegram.received[-1].body["text"].startswith("\u2705 vLLM is back")
    assert (again.outcome, again.reason, again.id) == ("suppressed", "nothing to recover from", None)
    assert len(telegram.received) == 2
    assert [r["level"] for r in recent(ctx.store.ops)] == ["recovery", "error"]
    assert state(ctx.store.ops, "service:vllm") == {
        "key": "service:vllm", "last_sent_at": NOW, "active": False}
    # a recovery does not restart the cooldown: a flapping service is told once per cooldown
    assert notify(ctx, vllm_down(), now=NOW + 3 * MIN).outcome == Outcome.SUPPRESSED
    assert notify(ctx, back, now=NOW + 4 * MIN).outcome == Outcome.SUPPRESSED


def test_recovery_without_an_error_is_neither_sent_nor_recorded(make_ctx, serve) -> None:
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url)

    record = notify(ctx, Alert("service:vllm", "recovery", "vLLM is back"), now=NOW)

    assert (record.outcome, record.reason, record.id, record.channels) == (
        "suppressed", "nothing to recover from", None, {})
    assert telegram.received == [] and rows(ctx) == []
    assert state(ctx.store.ops, "service:vllm") is None


# -- failing channels ----------------------------------------------------------------------------


def test_a_channel_answering_500_fails_and_the_other_still_gets_it(make_ctx, serve) -> None:
    telegram, hook = serve(status=500, body=b"boom"), serve()
    ctx = make_ctx(telegram=telegram.url, webhook=hook.url)

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.outcome == Outcome.SENT
    assert record.channels == {"log": "sent", "telegram": "failed: HTTP 500", "webhook": "sent"}
    assert len(telegram.received) == 1 and len(hook.received) == 1
    assert rows(ctx)[0]["channels"] == json.dumps(record.channels, sort_keys=True)


def test_telegram_refusals_carry_telegrams_description(make_ctx, serve) -> None:
    telegram = serve(status=400, body=b'{"ok": false, "error_code": 400, '
                                      b'"description": "Bad Request: chat not found"}')
    ctx = make_ctx(telegram=telegram.url)

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.outcome == Outcome.FAILED
    assert record.channels["telegram"] == "failed: HTTP 400: Bad Request: chat not found"


def test_a_refused_connection_fails_and_the_other_still_gets_it(make_ctx, serve) -> None:
    hook = serve()
    ctx = make_ctx(telegram=closed_port_url(), webhook=hook.url)

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.outcome == Outcome.SENT
    assert record.channels["telegram"] == "failed: Connection refused"
    assert record.channels["webhook"] == "sent" and len(hook.received) == 1


@pytest.mark.parametrize("hanging", ["telegram", "webhook"])
def test_a_hanging_channel_is_cut_off_and_the_other_still_gets_it(make_ctx, serve, hanging) -> None:
    slow, fast = serve(delay=10), serve()
    urls = {"telegram": slow.url, "webhook": fast.url} if hanging == "telegram" else {
        "telegram": fast.url, "webhook": slow.url}
    ctx = make_ctx(timeout=0.5, **urls)

    started = time.monotonic()
    record = notify(ctx, vllm_down(), now=NOW)
    elapsed = time.monotonic() - started

    assert elapsed < 1.5
    other = "webhook" if hanging == "telegram" else "telegram"
    assert record.channels[hanging] == "failed: timed out"
    assert record.channels[other] == "sent" and len(fast.received) == 1
    assert record.outcome == Outcome.SENT


def test_every_channel_hanging_still_returns_within_the_timeout(make_ctx, serve) -> None:
    ctx = make_ctx(timeout=0.5, telegram=serve(delay=10).url, webhook=serve(delay=10).url)

    started = time.monotonic()
    record = notify(ctx, vllm_down(), now=NOW)

    assert time.monotonic() - started < 1.5  # side by side, not one after the other
    assert record.outcome == Outcome.FAILED


def test_a_redirect_is_a_failure_not_a_silent_get(make_ctx, serve) -> None:
    target = serve()
    hook = serve(status=302, body=b"", headers={"Location": target.url + "/elsewhere"})
    ctx = make_ctx(webhook=hook.url)

    record = notify(ctx, vllm_down(), now=NOW)

    assert record.channels["webhook"] == "failed: HTTP 302" and target.received == []


def test_when_every_channel_fails_the_next_check_tries_again(make_ctx, serve) -> None:
    telegram = serve(status=502)
    ctx = make_ctx(telegram=telegram.url)

    assert notify(ctx, vllm_down(), now=NOW).outcome == Outcome.FAILED
    assert state(ctx.store.ops, "service:vllm") == {
        "key": "service:vllm", "last_sent_at": None, "active": True}

    telegram.status = 200
    assert notify(ctx, vllm_down(), now=NOW + 5 * MIN).outcome == Outcome.SENT
    assert notify(ctx, vllm_down(), now=NOW + 10 * MIN).outcome == Outcome.SUPPRESSED
    telegram.status = 502
    # a recovery that reaches nobody stays owed
    back = Alert("service:vllm", "recovery", "vLLM is back")
    assert notify(ctx, back, now=NOW + 11 * MIN).outcome == Outcome.FAILED
    telegram.status = 200
    assert notify(ctx, back, now=NOW + 12 * MIN).outcome == Outcome.SENT
    assert notify(ctx, back, now=NOW + 13 * MIN).outcome == Outcome.SUPPRESSED
    assert [r["outcome"] for r in recent(ctx.store.ops)] == [
        "sent", "failed", "suppressed", "sent", "failed"]


# -- the token ---------------------------------------------------------------------------------------


def test_the_token_never_leaks(make_ctx, serve, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    echo = json.dumps({"ok": False, "description": f"Unauthorized: bad token {TOKEN}"}).encode()
    records = []
    for telegram_url, timeout in [
        (serve().url, 2.0),                            # works
        (serve(status=500).url, 2.0),                  # answers 500
        (serve(status=401, body=echo).url, 2.0),       # answers 401 and echoes the token
        (closed_port_url(), 2.0),                      # refuses
        (serve(delay=10).url, 0.3),                    # hangs
    ]:
        ctx = make_ctx(telegram=telegram_url, timeout=timeout)
        records.append(notify(ctx, vllm_down("info"), now=NOW))
        records.append(notify(ctx, vllm_down(key=telegram_url), now=NOW))

    assert records[5].channels["telegram"] == "failed: HTTP 401: Unauthorized: bad token ***"
    assert "/bot***/sendMessage" in caplog.text
    with ctx.store.ops.read() as conn:
        stored = [tuple(r) for table in (ops_alerts, ops_alert_state)
                  for r in conn.execute(select(table))]
    assert len(stored) == 15
    for where, text in [("log", caplog.text), ("ops tables", repr(stored)),
                        ("records", repr(records)), ("recent()", repr(recent(ctx.store.ops))),
                        ("context", repr(ctx))]:
        assert TOKEN not in text, where
        assert "do-not-leak" not in text, where


def test_the_webhook_path_is_not_logged(make_ctx, serve, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    ctx = make_ctx(webhook=serve(status=500).url)

    notify(ctx, vllm_down(), now=NOW)

    assert "webhook (http://127.0.0.1:" in caplog.text and "/...) failed: HTTP 500" in caplog.text
    assert "s3cret-path" not in caplog.text


# -- the rest of the API ----------------------------------------------------------------------------


def test_recent_filters_by_time_key_and_limit(make_ctx) -> None:
    ctx = make_ctx(cooldown=0)
    for i, key in enumerate(["service:vllm", "disk:/data", "service:vllm", "gpu:zombies"]):
        notify(ctx, vllm_down(key=key), now=NOW + i * MIN)
    db = ctx.store.ops

    assert [r["created_at"] for r in recent(db)] == [NOW + 3 * MIN, NOW + 2 * MIN, NOW + MIN, NOW]
    assert [r["created_at"] for r in recent(db, since=NOW + 2 * MIN)] == [NOW + 3 * MIN, NOW + 2 * MIN]
    assert [r["created_at"] for r in recent(db, key="service:vllm")] == [NOW + 2 * MIN, NOW]
    assert len(recent(db, limit=1)) == 1
    assert recent(db)[0]["channels"] == {"log": "sent", "telegram": "off", "webhook": "off"}


@pytest.mark.parametrize(("args", "says"), [
    (("k", "fatal", "t"), "alert level must be one of error, warning, recovery, info, got 'fatal'"),
    (("", "error", "t"), "needs a key"),
    (("k", "error", " "), "needs a title"),
])
def test_an_alert_says_what_is_wrong_with_it(args, says) -> None:
    with pytest.raises(InvalidInput, match=says):
        Alert(*args)


def test_two_callers_at_once_send_once(make_ctx, serve, backend) -> None:
    """The cooldown is claimed with a conditional update: of eight simultaneous
    callers (a new key, then an expired one) exactly one sends."""
    telegram = serve()
    ctx = make_ctx(telegram=telegram.url, backend=backend)

    def race(now: int) -> list[str]:
        barrier = threading.Barrier(8)
        outcomes: list[str] = []

        def call() -> None:
            barrier.wait()
            outcomes.append(notify(ctx, vllm_down(), now=now).outcome)

        threads = [threading.Thread(target=call) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        return sorted(outcomes)

    assert race(NOW) == ["sent"] + ["suppressed"] * 7
    assert race(NOW + 31 * MIN) == ["sent"] + ["suppressed"] * 7
    assert len(telegram.received) == 2
