"""The package as an install gets it: built from the checkout's own files (offline,
with the setuptools of the test lock), installed into a directory of its own, and
used from an empty directory with no checkout on the path: the CLI works and
``sparkops up`` serves the app that ships inside the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import http_status

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """``pip install --no-deps`` of a copy of the checkout (so the build leaves
    nothing in it) into a target directory; the dependencies are the test venv's."""
    base = tmp_path_factory.mktemp("install")
    source = base / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "sparkops", source / "sparkops", ignore=shutil.ignore_patterns("__pycache__"))
    target = base / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", "--disable-pip-version-check", "--target", str(target), str(source)],
                   check=True, capture_output=True, timeout=240)
    return target


def env_for(target: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARKOPS_")}
    env["PYTHONPATH"] = str(target)  # the install, not the checkout
    return env


def sparkops(target: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparkops", *args], cwd=cwd, env=env_for(target),
                          capture_output=True, text=True, timeout=120)


def test_the_install_holds_every_package_and_the_app(installed: Path):
    package = installed / "sparkops"
    for sub in ("core", "storage", "board", "jobs", "engine", "watch", "sprint", "remote", "runner",
                "control", "demo", "ui", "app"):
        assert (package / sub / "__init__.py").is_file(), sub
    assert (package / "app" / "Home.py").is_file()
    pages = sorted(p.name for p in (package / "app" / "pages").glob("*.py"))
    assert pages == sorted(p.name for p in (ROOT / "sparkops" / "app" / "pages").glob("*.py")) and len(pages) == 8
    assert (installed / "bin" / "sparkops").is_file()  # the console script
    assert not (installed / "tests").exists()


def test_the_cli_works_from_an_empty_directory(installed: Path, tmp_path: Path):
    where = sparkops(installed, tmp_path, "--version")
    assert where.returncode == 0 and where.stdout.startswith("sparkops ")
    located = subprocess.run([sys.executable, "-c", "import sparkops; print(sparkops.__file__)"], cwd=tmp_path,
                             env=env_for(installed), capture_output=True, text=True, check=True)
    assert Path(located.stdout.strip()).is_relative_to(installed)

    assert sparkops(installed, tmp_path, "init").returncode == 0
    created = sparkops(installed, tmp_path, "task", "create", "Installed anywhere")
    assert created.returncode == 0, created.stderr
    listed = sparkops(installed, tmp_path, "task", "list")
    assert "Installed anywhere" in listed.stdout
    ran = sparkops(installed, tmp_path, "job", "run", "promote")
    assert ran.returncode == 0 and "promote: ok" in ran.stdout, ran.stdout + ran.stderr
    assert (tmp_path / "data" / "kanban.db").is_file()  # the data lives where it was run


def test_up_serves_the_packaged_app_from_an_empty_directory(installed: Path, tmp_path: Path):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = open(tmp_path / "up.out", "wb")
    up = subprocess.Popen([sys.executable, "-m", "sparkops", "up", "--port", str(port)], cwd=tmp_path,
                          env=env_for(installed), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while http_status(f"http://127.0.0.1:{port}/_stcore/health") != 200:
            assert up.poll() is None, (tmp_path / "up.out").read_text()
            assert time.monotonic() < deadline, (tmp_path / "up.out").read_text()
            time.sleep(0.2)
        assert http_status(f"http://127.0.0.1:{port}/Board") == 200
        import psutil

        commands = [" ".join(child.cmdline()) for child in psutil.Process(up.pid).children()]
        assert any(c.endswith("-m sparkops.runner") for c in commands), commands
        assert any(f"streamlit run {installed / 'sparkops' / 'app' / 'Home.py'}" in c for c in commands), commands
    finally:
        up.terminate()
        try:
            assert up.wait(timeout=30) == 0
        finally:
            if up.poll() is None:
                os.killpg(up.pid, 9)
            out.close()
    assert "Stopped." in (tmp_path / "up.out").read_text()
