"""Service checks against real processes on loopback, and the restart / give-up
decisions with the clock passed in."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import NOW, gone, wait_for

from sparkops.config import Secrets, load_settings
from sparkops.watch import services
from sparkops.watch.services import CheckResult, ServiceState

FAKE_VLLM = Path(__file__).parent / "fixtures" / "fake_vllm.py"
REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spec_for(tmp_path, name: str, **fields):
    settings = load_settings(env={"SPARKOPS_SERVICES": json.dumps({name: fields})}, cwd=tmp_path)
    return next(s for s in settings.services if s.name == name)


@pytest.fixture
def fake_vllm(tmp_path):
    """A real HTTP server playing vLLM; write a mode to ``mode_file`` to change it."""
    port = free_port()
    mode_file = tmp_path / "mode"
    mode_file.write_text("healthy")
    proc = subprocess.Popen([sys.executable, str(FAKE_VLLM), str(port), str(mode_file)])
    spec = spec_for(tmp_path, "vllm", check="vllm", url=f"http://127.0.0.1:{port}", timeout_seconds=2)
    wait_for(lambda: services.check(spec).ok, "the fake vLLM to answer", proc=proc)
    yield spec, mode_file, proc
    proc.kill()
    proc.wait()


def test_vllm_healthy_dead_hung_and_gone(fake_vllm):
    spec, mode_file, proc = fake_vllm
    first = services.check(spec, memory={}, now=NOW)
    assert first.ok and first.data["health"] == "ok" and first.data["models"] == ["Qwen3-VL-30B"]

    mode_file.write_text("busy-stuck")  # requests running, generation tokens no longer move
    hung = services.check(spec, memory=first.data, now=NOW + 60)
    assert not hung.ok and "hung" in hung.detail and "2 running" in hung.detail
    still = services.check(spec, memory=hung.data, now=NOW + 120)
    assert not still.ok and still.data["tokens_stuck_since"] == hung.data["tokens_stuck_since"]

    mode_file.write_text("healthy")  # idle again: no requests, so no hang whatever the tokens do
    assert services.check(spec, memory=still.data, now=NOW + 150).ok
    two = still

    mode_file.write_text("dead")
    dead = services.check(spec, memory=two.data, now=NOW + 180)
    assert not dead.ok and "503" in dead.detail and dead.data["health"] == "engine dead"

    proc.kill()
    proc.wait()
    gone_ = services.check(spec, memory={}, now=NOW + 240)
    assert not gone_.ok and "does not answer" in gone_.detail


def test_vllm_old_metric_names_and_a_model_list_behind_a_key(fake_vllm):
    spec, mode_file, _ = fake_vllm
    mode_file.write_text("old-metrics")
    first = services.check(spec, memory={}, now=NOW)
    assert first.ok and first.data["generation_tokens"] is not None and first.data["running"] == 0

    mode_file.write_text("auth")
    locked = services.check(spec, memory={}, now=NOW)
    assert locked.ok and locked.data["models"] is None and "API key" in locked.data["models_note"]
    with_key = services.check(spec, secrets=Secrets(vllm_api_key="sk-test"), memory={}, now=NOW)
    assert with_key.data["models"] == ["Qwen3-VL-30B"]


def test_parse_prometheus_sums_label_sets():
    text = ('# HELP x\nvllm:num_requests_running{model="a"} 1\nvllm:num_requests_running{model="b"} 2\n'
            'plain_metric 3.5\nbroken{a="b"}\n')
    assert services.parse_prometheus(text) == {"vllm:num_requests_running": 3.0, "plain_metric": 3.5}


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
def test_redis_ping_against_a_real_redis(tmp_path):
    port = free_port()
    proc = subprocess.Popen([REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)
    spec = spec_for(tmp_path, "redis", check="redis", port=port)
    try:
        assert wait_for(lambda: services.check(spec).ok, "redis to answer", proc=proc)
    finally:
        proc.kill()
        proc.wait()
    result = services.check(spec)
    assert not result.ok and "redis check failed" in result.detail


def test_http_tcp_and_process_checks(tmp_path, fake_vllm):
    vllm, _, proc = fake_vllm
    port = int(vllm.url.rsplit(":", 1)[1])
    assert services.check(spec_for(tmp_path, "web", check="http", url=f"{vllm.url}/health")).ok
    wrong = services.check(spec_for(tmp_path, "web", check="http", url=f"{vllm.url}/nope"))
    assert not wrong.ok and "HTTP 404" in wrong.detail and "expected 200" in wrong.detail
    assert services.check(spec_for(tmp_path, "gw", check="tcp", port=port)).ok
    assert not services.check(spec_for(tmp_path, "gw", check="tcp", port=free_port())).ok
    found = services.check(spec_for(tmp_path, "p", check="process", pattern=r"fake_vllm\.py"))
    assert found.ok and str(proc.pid) in found.detail
    assert not services.check(spec_for(tmp_path, "p", check="process", pattern=r"no-such-thing-\d+")).ok


# -- decisions -------------------------------------------------------------------------


def spec_with_restart(tmp_path, **fields):
    return spec_for(tmp_path, "svc", check="tcp", port=1, restart_argv=[sys.executable, "-c", "pass"],
                    failures_before_restart=2, restart_limit=2, restart_window_minutes=30,
                    start_grace_seconds=60, **fields)


DOWN = CheckResult(False, "connection refused")
UP = CheckResult(True, "accepts connections")


def test_restart_after_consecutive_failures_then_grace_then_give_up(tmp_path):
    spec = spec_with_restart(tmp_path)
    state = ServiceState("svc", status="up", since=NOW, stored=True)
    d = services.assess(spec, DOWN, state, now=NOW)
    assert (d.state.status, d.state.consecutive_failures, d.restart, d.alert) == ("down", 1, False, None)
    d = services.assess(spec, DOWN, d.state, now=NOW + 60)
    assert d.restart and d.state.status == "restarting" and d.alert[0] == "error"
    assert "restart 1 of 2" in d.alert[2]
    d = services.assess(spec, DOWN, d.state, now=NOW + 90)  # inside the start grace: not counted
    assert (d.state.status, d.state.consecutive_failures, d.restart) == ("restarting", 0, False)
    d = services.assess(spec, DOWN, d.state, now=NOW + 130)
    d = services.assess(spec, DOWN, d.state, now=NOW + 160)
    assert d.restart and len(d.state.restarts) == 2
    d = services.assess(spec, DOWN, d.state, now=NOW + 230)
    d = services.assess(spec, DOWN, d.state, now=NOW + 260)
    assert d.gave_up and not d.restart and d.state.status == "gave_up"
    assert "gave up" in d.alert[1]
    for later in (NOW + 300, NOW + 400, NOW + 3000):  # no more restarts, no more alerts
        d = services.assess(spec, DOWN, d.state, now=later)
        assert not d.restart and d.alert is None and d.state.status == "gave_up"
    d = services.assess(spec, UP, d.state, now=NOW + 3100)
    assert d.state.status == "up" and d.alert[0] == "recovery" and d.state.gave_up_at is None


def test_restarts_outside_the_window_do_not_count(tmp_path):
    spec = spec_with_restart(tmp_path)
    state = ServiceState("svc", status="down", since=NOW, stored=True, consecutive_failures=1,
                         restarts=[NOW - 3600, NOW - 1900], last_restart_at=NOW - 1900)
    d = services.assess(spec, DOWN, state, now=NOW)
    assert d.restart and d.state.restarts == [NOW]


def test_without_restart_argv_only_alerts(tmp_path):
    spec = replace(spec_with_restart(tmp_path), restart_argv=())
    d = services.assess(spec, DOWN, ServiceState("svc", consecutive_failures=1, stored=True), now=NOW)
    assert not d.restart and "no restart_argv configured" in d.alert[2]


def test_first_sight_of_a_service_is_no_recovery(tmp_path):
    spec = spec_with_restart(tmp_path)
    d = services.assess(spec, UP, ServiceState("svc", since=NOW), now=NOW)
    assert d.state.status == "up" and d.alert is None


def test_a_default_service_not_found_here_is_not_configured_until_it_is_seen_up(tmp_path):
    """A default of the seed's stack that never answered on this host is "not
    configured": no failure counted, no alert, no restart. From its first success it
    is watched like any other; a declared service is down from its first failure."""
    settings = load_settings(env={}, cwd=tmp_path)
    gateway = next(s for s in settings.services if s.name == "gateway")
    assert not gateway.declared and "declare `[services.gateway]`" in gateway.toggle_hint()
    gateway = replace(gateway, restart_argv=(sys.executable, "-c", "pass"), failures_before_restart=1)

    d = services.assess(gateway, DOWN, ServiceState("gateway", since=NOW), now=NOW)
    assert (d.state.status, d.state.consecutive_failures, d.alert, d.restart) == ("not_configured", 0, None, False)
    assert d.state.detail == "not found on this host (connection refused)"
    d = services.assess(gateway, DOWN, d.state, now=NOW + 60)
    assert (d.state.status, d.state.since, d.alert, d.restart) == ("not_configured", NOW, None, False)

    d = services.assess(gateway, UP, d.state, now=NOW + 120)
    assert d.state.status == "up" and d.state.memory[services.SEEN_UP] and d.alert is None
    d = services.assess(gateway, DOWN, d.state, now=NOW + 180)
    assert d.state.status == "restarting" and d.restart and d.alert[0] == "error"  # watched now

    declared = spec_for(tmp_path, "gateway", check="tcp", port=1)
    assert declared.declared and declared.toggle_hint() == (
        "to stop watching it: `[services.gateway] enabled = false` in sparkops.toml")
    d = services.assess(declared, DOWN, ServiceState("gateway", since=NOW), now=NOW)
    assert (d.state.status, d.state.consecutive_failures) == ("down", 1)


def test_status_words_say_not_checked_and_not_configured():
    assert services.status_words("unknown") == "not checked yet"
    assert services.status_words("not_configured") == "not configured"
    assert services.status_words("gave_up") == "gave up"
    assert services.serving_healthy(None) and services.serving_healthy(ServiceState("v", status="not_configured"))
    assert not services.serving_healthy(ServiceState("v", status="down"))


def test_state_round_trips_through_the_ops_database(sqlite_store):
    state = ServiceState("vllm", status="down", since=NOW, checked_at=NOW + 5, consecutive_failures=2,
                         restarts=[NOW], last_restart_at=NOW, detail="503",
                         memory={"generation_tokens": 10.0})
    services.save_state(sqlite_store.ops, "gb10", state)
    services.save_state(sqlite_store.ops, "gb10", replace(state, consecutive_failures=3))
    loaded = services.load_states(sqlite_store.ops, "gb10")["vllm"]
    assert (loaded.status, loaded.consecutive_failures, loaded.restarts, loaded.memory) == (
        "down", 3, [NOW], {"generation_tokens": 10.0})
    assert services.load_states(sqlite_store.ops, "other-host") == {}


def test_restart_runs_the_argv_without_a_shell(tmp_path):
    marker = tmp_path / "restarted; touch pwned"
    settings = load_settings(env={"SPARKOPS_SERVICES": json.dumps({"svc": {
        "check": "tcp", "port": 1,
        "restart_argv": [sys.executable, "-c", "import sys; open(sys.argv[1], 'w').write('x')", str(marker)]}})},
        cwd=tmp_path)
    spec = next(s for s in settings.services if s.name == "svc")
    proc = services.restart(spec, settings)
    assert proc.wait(timeout=30) == 0
    assert marker.exists() and not (tmp_path / "pwned").exists()
    assert "restart:" in (tmp_path / "data" / "logs" / "services" / "svc.log").read_text()
    assert gone(proc.pid)
