"""Other hosts' GPUs over a real SSH login: a fake ``nvidia-smi`` on the test
server's PATH prints a discrete GPU's and a GB10's real output formats."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import NOW, make_settings, remote_env, run_cli

from sparkops.jobs.framework import JobContext
from sparkops.meters import gpu
from sparkops.remote import gpu as remote_gpu
from sparkops.remote import ssh as remote
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
