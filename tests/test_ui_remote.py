"""The remote roles on the pages (AppTest over real SQLite files): the tunnel's and the
push's state on Home and Jobs, other hosts' GPUs on the GPU page. The states are what
the jobs record (their SSH side is tested in test_push, test_tunnel, test_remote_gpu);
rendering a page never logs in anywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import NOW, make_settings, run_page

from sparkops.meters import gpu_smi
from sparkops.net import ssh as remote
from sparkops.remote import gpu as remote_gpu
from sparkops.storage.store import open_store

HOST = "gb10-test"
FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"
REMOTES = {"vps": {"address": "127.0.0.1", "port": 1}, "spark1": {"address": "127.0.0.1", "port": 1}}
ENV = {
    "SPARKOPS_HOST_NAME": HOST,
    "SPARKOPS_SERVICES": json.dumps({name: {"enabled": False} for name in ("vllm", "gateway", "redis", "ui")}),
    "SPARKOPS_REMOTES": json.dumps(REMOTES),
    "SPARKOPS_REMOTE_TUNNEL_HOST": "vps",
    "SPARKOPS_REMOTE_PUSH_HOST": "vps",
    "SPARKOPS_REMOTE_GPU_HOSTS": '["spark1"]',
    "SPARKOPS_DISK_THRESHOLD_PERCENT": "100",
}


@pytest.fixture
def app_env(app_env, monkeypatch):
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    return app_env


def record(tmp_path: Path, kind: str, name: str, status: str, detail: str, data: dict | None = None) -> None:
    settings = make_settings(tmp_path, **ENV)
    store = open_store(settings, create=True)
    try:
        remote.save_state(store.ops, HOST, kind, name, status, detail, data, now=NOW)
    finally:
        store.dispose()


def test_home_and_jobs_show_the_tunnel_down_in_red_and_the_push(app_env):
    record(app_env, "tunnel", "vps", "down", "cannot open vps: Connection refused; next attempt in 4s")
    record(app_env, "push", "vps", "ok", "sent 5 file(s) (12.0 KB) to vps:sparkops-export")

    home = run_page("Home.py")
    assert not home.exception
    red = " ".join(e.value for e in home.error)
    assert "the tunnel to vps is down: cannot open vps: Connection refused" in red
    assert "the push to vps" not in red  # ok is not red
    remote_line = next(m.value for m in home.markdown if m.value.startswith("**Remote**"))
    assert "🔴 the tunnel to vps down" in remote_line and "🟢 the push to vps ok" in remote_line
    assert "the GPUs of spark1 not run yet" in remote_line

    jobs_page = run_page("pages/5_Jobs.py")
    assert not jobs_page.exception
    assert "Remote hosts" in [h.value for h in jobs_page.subheader]
    frame = jobs_page.dataframe[0].value
    assert list(zip(frame["role"], frame["host"], frame["state"])) == [
        ("tunnel", "vps", "down"), ("push", "vps", "ok"), ("gpu", "spark1", "not run yet")]
    assert frame["detail"][0].startswith("cannot open vps")
    assert [b.label for b in jobs_page.button if b.key in ("jobs.run.push", "jobs.run.tunnel",
                                                           "jobs.run.remote-gpu")] == ["Run now"] * 3


def test_the_gpu_page_shows_another_hosts_gb10(app_env):
    profile = FIXTURES / "gb10"
    snap = gpu_smi.parse((profile / "gpu.csv").read_text(), (profile / "apps.csv").read_text(),
                         (profile / "meminfo").read_text(), taken_at=NOW, host="spark1")
    record(app_env, remote_gpu.KIND, "spark1", "ok", snap.reason, snap.as_dict())

    page = run_page("pages/3_GPU.py")
    assert not page.exception
    assert "Other hosts" in [h.value for h in page.subheader]
    texts = [m.value for m in page.markdown]
    assert "GPU 0 · NVIDIA GB10 · unified memory" in texts
    assert any(m.value.startswith("**spark1**") for m in page.markdown)
    processes = page.dataframe[0].value
    assert list(processes["name"]) == ["VLLM::EngineCore", "python3"]
    host = page.selectbox(key="gpu_history_host")
    assert host.options == [HOST, "spark1"]


def test_an_unreadable_gpu_host_is_a_warning_with_the_reason(app_env):
    record(app_env, remote_gpu.KIND, "spark1", "error", "cannot reach spark1 at 127.0.0.1:1: Connection refused")
    page = run_page("pages/3_GPU.py")
    assert not page.exception
    assert any("Connection refused" in w.value for w in page.warning)
