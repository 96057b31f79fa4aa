"""Other hosts' GPUs over a real SSH login: a fake ``nvidia-smi`` on the test
server's PATH prints a discrete GPU's and a GB10's real output formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import NOW, make_settings, remote_env, run_cli

from sparkops.core.errors import ConfigError
from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu, ledger
from sparkops.meters.sample import Meter
from sparkops.net import ssh as remote
from sparkops.remote import gpu as remote_gpu
from sparkops.runner.registry import run_job
from sparkops.storage.store import open_store

FAKE = Path(__file__).parent / "fixtures" / "nvidia_smi"


def install_fake(server, profile: str) -> None:
    """Put the fake nvidia-smi and one profile's output on the server's PATH."""
    shutil.copy2(FAKE / "nvidia-smi", server.bin / "nvidia-smi")
    for name in ("gpu.csv", "apps.csv"):
        shutil.copy2(FAKE / profile / name, server.bin / name)


@pytest.fixture
def ctx(ssh_server, tmp_path):
    settings = make_settings(tmp_path, SPARKOPS_REMOTE_GPU_HOSTS='["spark1"]',
                             **remote_env(ssh_server, tmp_path, name="spark1"))
    store = open_store(settings, create=True, now=NOW)
    yield JobContext.create(settings, store)
    store.dispose()


def test_a_discrete_gpu_host_is_read_into_the_nvml_shape(ctx, ssh_server):
    install_fake(ssh_server, "discrete")
    snap = remote_gpu.read(ctx.settings, "spark1", now=NOW)
    assert snap.available and snap.reason == "2 GPU(s)" and snap.driver_version == "550.54.15"
    assert [d.name for d in snap.devices] == ["NVIDIA H100 80GB HBM3"] * 2
    first = snap.devices[0]
    assert (first.memory_total_mb, first.unified) == (81559.0, False)
    assert first.memory_used_mb is not None and first.utilization_pct is not None
    vllm = [p for p in snap.processes if p.used_memory_mb == 74880.0]
    assert len(vllm) == 1 and vllm[0].command_line == "/usr/bin/python3" and vllm[0].device_index == 0
    assert any(p.used_memory_mb is None for p in snap.processes)  # [N/A] is unknown, not 0
    assert all(p.start_time is None for p in snap.processes)  # no identity for a remote process


def test_a_gb10_host_takes_its_memory_from_its_own_meminfo(ctx, ssh_server):
    install_fake(ssh_server, "gb10")
    snap = remote_gpu.read(ctx.settings, "spark1", now=NOW)
    [device] = snap.devices
    assert device.name == "NVIDIA GB10" and device.unified and gpu.UNIFIED_NOTE in device.notes
    # the "remote" host is this machine: its /proc/meminfo was read over SSH
    assert device.memory_total_mb == gpu.read_meminfo()["MemTotal"]
    assert device.memory_used_mb == 106448.0 + 1934.0  # the sum of its processes' memory
    assert [p.name for p in snap.processes] == ["VLLM::EngineCore", "python3"]


def test_the_job_records_each_host_and_its_samples(ctx, ssh_server):
    install_fake(ssh_server, "gb10")
    result = run_job(ctx, "remote-gpu", now=NOW, trigger="schedule")
    assert result.ok and "spark1: 1 GPU(s)" in result.summary and not result.acted
    [(state, snap)] = remote_gpu.snapshots(ctx.store.ops, ctx.host).values()
    assert state.status == "ok" and state.remote == "spark1" and snap.devices[0].unified
    history = gpu.history(ctx.store.ops, since=NOW - 1, host="spark1")
    assert [(h["host"], h["name"], h["unified"]) for h in history] == [("spark1", "NVIDIA GB10", 1)]

    (ssh_server.bin / "fail").write_text("")  # the driver is gone there
    failed = run_job(ctx, "remote-gpu", now=NOW + 60)
    assert failed.outcome == "error" and "NVIDIA-SMI has failed" in failed.error
    state = remote.load_state(ctx.store.ops, ctx.host, remote_gpu.KIND, "spark1")
    assert state.status == "error" and "exited 9" in state.detail


def test_a_host_without_nvidia_smi_says_so(ctx, ssh_server):
    snap = remote_gpu.read(ctx.settings, "spark1", now=NOW)  # nothing installed on the server
    assert not snap.available and "exited 127" in snap.reason and "remotes.spark1.nvidia_smi" in snap.reason


def test_remote_check_prints_the_gpus(ctx, ssh_server, tmp_path):
    install_fake(ssh_server, "discrete")
    env = {"SPARKOPS_REMOTE_GPU_HOSTS": '["spark1"]', **remote_env(ssh_server, tmp_path, name="spark1")}
    done = run_cli("remote", "check", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "spark1: ok:" in done.stdout and "[gpu]" in done.stdout
    assert done.stdout.count("NVIDIA H100 80GB HBM3") == 2 and "/usr/bin/python3" in done.stdout
    as_json = json.loads(run_cli("remote", "check", "--json", cwd=tmp_path, env=env).stdout)
    assert as_json[0]["gpu"]["driver_version"] == "550.54.15"


# -- a run's energy from another host's GPUs (usage.gpu_remote) --------------------------------------


def test_a_runs_energy_is_read_from_the_remote_gpu_that_serves_it(ssh_server, tmp_path):
    """vLLM on another box: each sample reads that box's energy counters over a real
    SSH login (host key verified); a run's energy is their increase, exactly."""
    install_fake(ssh_server, "discrete")
    settings = make_settings(tmp_path, SPARKOPS_USAGE_GPU_REMOTE="spark1",
                             SPARKOPS_SERVICES=json.dumps({"vllm": {"enabled": False}}),
                             **remote_env(ssh_server, tmp_path, name="spark1"))
    meter = Meter.of(settings)
    energy = ssh_server.bin / "energy.csv"
    energy.write_text("0, 1000000, 40\n1, 2000000, 60\n")  # two GPUs' counters, mJ
    first = meter.read(now=100.0)
    assert first.sources["gpu"] == "ok" and first.energy_j == 3000.0 and first.gpu_util_pct == 50.0
    store = open_store(settings, create=True)
    try:
        ledger.record(store.ops, run_id=1, task_id="t_a", host="here", sample=first)
        energy.write_text("0, 1400000, 90\n1, 2200000, 70\n")
        used = ledger.record(store.ops, run_id=1, task_id="t_a", host="here", sample=meter.read(now=160.0),
                             ended=True)
    finally:
        store.dispose()
    assert used.energy_j == 600.0 and not used.estimated  # (1400 - 1000) + (2200 - 2000) J
    assert used.gpu_seconds == pytest.approx((50 + 80) / 200 * 60)

    energy.write_text("0, [N/A], 40\n")  # a GPU that does not count its energy
    assert meter.read().sources["gpu"] == "no energy counter"
    (ssh_server.bin / "fail").write_text("")  # the driver is gone there
    failed = meter.read()
    assert failed.energy_j is None and failed.sources["gpu"].startswith("nvidia-smi on spark1 exited 9")


def test_an_untrusted_or_unknown_gpu_remote_is_said(ssh_server, tmp_path):
    install_fake(ssh_server, "discrete")
    (ssh_server.bin / "energy.csv").write_text("0, 1000000, 40\n")
    untrusted = make_settings(tmp_path, SPARKOPS_USAGE_GPU_REMOTE="spark1",
                              **remote_env(ssh_server, tmp_path / "elsewhere", name="spark1", trusted=False))
    said = Meter.of(untrusted).read()
    assert said.energy_j is None and said.sources["gpu"].startswith("cannot read spark1's GPUs over SSH")
    with pytest.raises(ConfigError, match=r"usage.gpu_remote names 'nowhere', which is no \[remotes.NAME\]"):
        make_settings(tmp_path, SPARKOPS_USAGE_GPU_REMOTE="nowhere", **remote_env(ssh_server, tmp_path, name="spark1"))
