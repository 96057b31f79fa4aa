"""Another host's GPUs from nvidia-smi output (``sparkops.meters.gpu_smi``), and the fake
``nvidia-smi`` in ``tests/fixtures/nvidia_smi`` that the SSH tests put on a test
server's PATH.

The parser is fed the fixture profiles (two H100s; one GB10 with unified memory
and its /proc/meminfo) and broken output; the fake script is run for real with
``sh``, with the exact argv SparkOps sends.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sparkops.meters import gpu, gpu_smi

FIXTURES = Path(__file__).parent / "fixtures" / "nvidia_smi"
FAKE = FIXTURES / "nvidia-smi"
NOW = 1_760_000_000.0

H100_0 = "GPU-3f8c2a71-5e0b-9d44-1c6e-8a2f7b90d135"
H100_1 = "GPU-b71e04d9-22c8-6a13-f5d0-4c9e81a3e6f2"
GB10 = "GPU-a9d1c4e2-7b3f-58e0-96c2-1d4f0e8b72a5"
DRIVER_FAILURE = ("NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. "
                  "Make sure that the latest NVIDIA driver is installed and running.")
MEM_TOTAL_KB, MEM_AVAILABLE_KB = 128452652, 14880936


def profile(name: str, file: str) -> str:
    return (FIXTURES / name / file).read_text()


def parse_profile(name: str, meminfo: str | None = None, **kwargs: object) -> gpu.GpuSnapshot:
    return gpu_smi.parse(profile(name, "gpu.csv"), profile(name, "apps.csv"), meminfo,
                         taken_at=NOW, **kwargs)


def gpu_line(index: str = "0", name: str = "NVIDIA H100 80GB HBM3", uuid: str = H100_0,
             memory: str = "81559, 75520, 5510", power: str = "512.47") -> str:
    return f"{index}, {name}, {uuid}, 87, 61, {power}, {memory}, 550.54.15\n"


# -- the command lines ------------------------------------------------------------------


def test_argv_asks_for_the_fields_in_order() -> None:
    assert gpu_smi.gpu_argv() == [
        "nvidia-smi",
        ("--query-gpu=index,name,uuid,utilization.gpu,temperature.gpu,power.draw,"
         "memory.total,memory.used,memory.free,driver_version"),
        "--format=csv,noheader,nounits"]
    assert gpu_smi.apps_argv("/opt/bin/nvidia-smi") == [
        "/opt/bin/nvidia-smi", "--query-compute-apps=gpu_uuid,pid,process_name,used_memory",
        "--format=csv,noheader,nounits"]


# -- discrete GPUs ----------------------------------------------------------------------


def test_discrete_profile() -> None:
    snap = parse_profile("discrete", host="gpu-box-7")
    assert snap.available and snap.reason == "2 GPU(s)"
    assert snap.driver_version == "550.54.15" and snap.taken_at == NOW
    first, second = snap.devices
    assert (first.index, first.name, first.uuid) == (0, "NVIDIA H100 80GB HBM3", H100_0)
    assert (first.utilization_pct, first.temperature_c, first.power_w) == (87.0, 61.0, 512.47)
    assert (first.memory_total_mb, first.memory_used_mb, first.memory_free_mb) == (81559.0, 75520.0, 5510.0)
    assert not first.unified and first.notes == []
    assert (second.index, second.uuid, second.power_w) == (1, H100_1, 71.23)
    assert (second.memory_total_mb, second.memory_used_mb, second.memory_free_mb) == (81559.0, 4.0, 81026.0)
    assert all(isinstance(v, float) for v in (first.memory_total_mb, first.utilization_pct))

    on_first = {p.pid: p for p in snap.processes_on(0)}
    assert set(on_first) == {48213, 51002}
    vllm = on_first[48213]
    assert (vllm.used_memory_mb, vllm.command_line, vllm.name) == (74880.0, "/usr/bin/python3", "python3")
    assert vllm.start_time is None
    assert (on_first[51002].name, on_first[51002].used_memory_mb) == ("ollama", 612.0)
    [unknown_memory] = snap.processes_on(1)
    assert (unknown_memory.pid, unknown_memory.used_memory_mb) == (48377, None)
    assert unknown_memory.command_line == "/opt/conda/bin/python"
    assert len(snap.processes) == 3


def test_discrete_needs_no_meminfo() -> None:
    snap = parse_profile("discrete", meminfo=None)
    assert snap.devices[0].memory_total_mb == 81559.0
    assert snap.devices[0].notes == [] and snap.reason == "2 GPU(s)"


def test_error_values_are_none_with_a_note() -> None:
    line = gpu_line(power="[Not Supported]", memory="[Insufficient Permissions], [N/A], ")
    snap = gpu_smi.parse(line.replace(", 87,", ", [Unknown Error],"), "", None, taken_at=NOW)
    [device] = snap.devices
    assert device.power_w is None and device.utilization_pct is None
    assert device.memory_total_mb is None and device.memory_used_mb is None
    assert device.memory_free_mb is None
    assert not device.unified  # unreadable is not the same as "has no own memory"
    assert "utilization.gpu: [Unknown Error]" in device.notes
    assert "memory.total: [Insufficient Permissions]" in device.notes
    assert not any("power" in n for n in device.notes)  # [Not Supported] is just "none"


def test_unknown_names_are_none() -> None:
    snap = gpu_smi.parse(gpu_line(name="[N/A]"), f"{H100_0}, 99, [Insufficient Permissions], [N/A]\n",
                         None, taken_at=NOW)
    assert snap.devices[0].name is None and snap.devices[0].uuid == H100_0
    [proc] = snap.processes
    assert (proc.pid, proc.command_line, proc.name, proc.used_memory_mb) == (99, None, None, None)


def test_a_name_with_a_comma_is_joined_back() -> None:
    snap = gpu_smi.parse(gpu_line(name="Tesla, revised"),
                         f"{H100_0}, 12, /srv/a, b/python, 100\n", None, taken_at=NOW)
    assert snap.available
    assert snap.devices[0].name == "Tesla, revised"
    assert snap.devices[0].memory_total_mb == 81559.0
    [proc] = snap.processes
    assert (proc.command_line, proc.name, proc.used_memory_mb) == ("/srv/a, b/python", "python", 100.0)


def test_blank_lines_and_a_quote_in_a_name_are_fine() -> None:
    snap = gpu_smi.parse("\n" + gpu_line() + "\n\n", f'\n{H100_0}, 7, "weird" name, 10\n\n', None,
                         taken_at=NOW)
    assert snap.reason == "1 GPU(s)"
    assert [(p.pid, p.command_line) for p in snap.processes] == [(7, '"weird" name')]


# -- GB10: unified memory ---------------------------------------------------------------


def test_gb10_profile_takes_totals_from_the_remote_meminfo() -> None:
    snap = parse_profile("gb10", profile("gb10", "meminfo"), host="spark-1")
    assert snap.available and snap.reason == "1 GPU(s)"
    assert snap.driver_version == "580.126.09"
    [device] = snap.devices
    assert (device.name, device.uuid, device.power_w) == ("NVIDIA GB10", GB10, 4.12)
    assert device.unified
    assert device.memory_total_mb == MEM_TOTAL_KB / 1024
    assert device.memory_free_mb == MEM_AVAILABLE_KB / 1024
    assert device.memory_used_mb == 106448.0 + 1934.0  # the processes' memory, not MemTotal - MemAvailable
    assert device.notes == [gpu.UNIFIED_NOTE]
    procs = {p.pid: p for p in snap.processes_on(0)}
    assert procs[203114].name == "VLLM::EngineCore" and procs[203114].used_memory_mb == 106448.0
    assert procs[198772].name == "python3"
    assert procs[198772].command_line == "/home/spark/.venv/bin/python3"


def test_gb10_without_process_memory_uses_memtotal_minus_memavailable() -> None:
    apps = profile("gb10", "apps.csv").replace("106448", "[N/A]").replace("1934", "[N/A]")
    snap = gpu_smi.parse(profile("gb10", "gpu.csv"), apps, profile("gb10", "meminfo"), taken_at=NOW)
    [device] = snap.devices
    assert device.memory_used_mb == (MEM_TOTAL_KB - MEM_AVAILABLE_KB) / 1024
    assert "no per-process GPU memory known: used = MemTotal - MemAvailable" in device.notes
    assert all(p.used_memory_mb is None for p in snap.processes)


def test_gb10_without_meminfo_says_why_totals_are_missing() -> None:
    snap = parse_profile("gb10", None, host="spark-1")
    [device] = snap.devices
    assert device.unified and device.memory_total_mb is None and device.memory_free_mb is None
    assert device.memory_used_mb == 106448.0 + 1934.0
    assert any("/proc/meminfo of spark-1 could not be read" in n for n in device.notes)


def test_gb10_with_unparsable_meminfo() -> None:
    snap = parse_profile("gb10", "bash: /proc/meminfo: Permission denied\n")
    [device] = snap.devices
    assert device.unified and device.memory_total_mb is None and device.memory_free_mb is None
    [note] = [n for n in device.notes if "/proc/meminfo" in n and n != gpu.UNIFIED_NOTE]
    assert "no MemTotal or MemAvailable" in note and "Permission denied" in note


def test_zero_memory_total_is_unified_too() -> None:
    snap = gpu_smi.parse(gpu_line(memory="0, 0, 0"), "", "MemTotal: 2048 kB\nMemAvailable: 1024 kB\n",
                         taken_at=NOW)
    [device] = snap.devices
    assert device.unified and (device.memory_total_mb, device.memory_free_mb) == (2.0, 1.0)
    assert device.memory_used_mb == 1.0


def test_parse_meminfo_keeps_kb_sizes_in_mib() -> None:
    info = gpu_smi.parse_meminfo(profile("gb10", "meminfo"))
    assert info["MemTotal"] == MEM_TOTAL_KB / 1024
    assert info["Hugepagesize"] == 2.0
    assert "HugePages_Total" not in info  # a count, not a size
    assert gpu_smi.parse_meminfo("garbage\nMemTotal: lots kB\n\n") == {}


# -- processes that do not fit ----------------------------------------------------------


def test_process_on_an_unknown_gpu_is_skipped_with_a_note() -> None:
    apps = f"{H100_0}, 10, /usr/bin/python3, 500\nGPU-00000000-dead, 11, /usr/bin/python3, 700\n"
    snap = gpu_smi.parse(gpu_line(), apps, None, taken_at=NOW, host="box")
    assert snap.available
    assert [p.pid for p in snap.processes] == [10]
    assert snap.reason.startswith("1 GPU(s); ")
    assert "skipped 1 GPU process(es)" in snap.reason and "GPU-00000000-dead" in snap.reason
    assert all(p.device_index == 0 for p in snap.processes)


def test_garbage_process_output_keeps_the_devices() -> None:
    snap = gpu_smi.parse(gpu_line(), "Unable to determine the device handle for GPU0000:01:00.0\n",
                         None, taken_at=NOW)
    assert snap.available and len(snap.devices) == 1 and snap.processes == []
    assert "GPU processes unknown" in snap.reason and "Unable to determine" in snap.reason


def test_no_running_processes() -> None:
    snap = gpu_smi.parse(gpu_line(), "No running processes found\n", None, taken_at=NOW)
    assert snap.available and snap.processes == [] and snap.reason == "1 GPU(s)"


# -- broken or empty output -------------------------------------------------------------


def test_driver_failure_is_not_available_and_quotes_it() -> None:
    snap = gpu_smi.parse(DRIVER_FAILURE + "\n\n", "", None, taken_at=NOW, host="box-3")
    assert not snap.available and snap.devices == [] and snap.taken_at == NOW
    assert snap.reason.startswith('nvidia-smi on box-3 printed "NVIDIA-SMI has failed because')
    assert "expected 10 comma-separated values per line" in snap.reason
    assert "index, name, uuid" in snap.reason


def test_wrong_field_count_is_not_available() -> None:
    snap = gpu_smi.parse("0, NVIDIA H100 80GB HBM3, GPU-x, 87\n", "", None, taken_at=NOW)
    assert not snap.available
    assert "'0, NVIDIA H100 80GB HBM3, GPU-x, 87'" in snap.reason and "expected 10" in snap.reason


def test_bad_second_line_fails_the_snapshot() -> None:
    snap = gpu_smi.parse(gpu_line() + "oops\n", "", None, taken_at=NOW)
    assert not snap.available and "'oops'" in snap.reason


def test_non_integer_index_is_garbage() -> None:
    snap = gpu_smi.parse(gpu_line(index="Error"), "", None, taken_at=NOW)
    assert not snap.available and "GPU index" in snap.reason


def test_long_garbage_is_shortened() -> None:
    snap = gpu_smi.parse("x" * 1000 + "\nsecond line\n", "", None, taken_at=NOW)
    assert not snap.available
    assert "x" * 197 + "..." in snap.reason and "x" * 198 not in snap.reason
    assert "second line" not in snap.reason


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_empty_output_means_no_gpu(text: str) -> None:
    snap = gpu_smi.parse(text, "", None, taken_at=NOW)
    assert snap.available and snap.devices == [] and snap.processes == []
    assert snap.reason == "nvidia-smi lists no GPU" and snap.driver_version is None


def test_failed() -> None:
    snap = gpu_smi.failed("ssh: connect to host x port 22: Connection refused", NOW)
    assert (snap.available, snap.reason, snap.taken_at) == (
        False, "ssh: connect to host x port 22: Connection refused", NOW)


# -- the fake nvidia-smi ----------------------------------------------------------------


def fake_bin(tmp_path: Path, name: str) -> Path:
    """A bin directory with the fake nvidia-smi and one profile's files, as the SSH
    tests make it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shutil.copy2(FAKE, bin_dir / "nvidia-smi")
    for file in (FIXTURES / name).iterdir():
        shutil.copy2(file, bin_dir / file.name)
    return bin_dir


def run_fake(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", *argv], capture_output=True, text=True, timeout=30, check=False)


def test_fake_is_executable_posix_sh() -> None:
    assert FAKE.read_text().startswith("#!/bin/sh\n")
    assert FAKE.stat().st_mode & 0o111


@pytest.mark.parametrize("name", ["discrete", "gb10"])
def test_fake_prints_the_profile_for_the_exact_argv(tmp_path: Path, name: str) -> None:
    fake = str(fake_bin(tmp_path, name) / "nvidia-smi")
    gpus = subprocess.run(gpu_smi.gpu_argv(fake), capture_output=True, text=True, timeout=30,
                          check=False)  # executed directly: the shebang is used
    apps = run_fake(gpu_smi.apps_argv(fake))
    assert (gpus.returncode, gpus.stderr) == (0, "")
    assert gpus.stdout == profile(name, "gpu.csv")
    assert (apps.returncode, apps.stdout) == (0, profile(name, "apps.csv"))
    snap = gpu_smi.parse(gpus.stdout, apps.stdout, profile("gb10", "meminfo"), taken_at=NOW)
    assert snap.available and len(snap.processes) == {"discrete": 3, "gb10": 2}[name]


def test_fake_found_through_path(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "gb10")
    done = subprocess.run(["sh", "-c", " ".join(gpu_smi.gpu_argv())], capture_output=True, text=True,
                          timeout=30, check=False, env={"PATH": f"{bin_dir}:/usr/bin:/bin"},
                          cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, profile("gb10", "gpu.csv"))


@pytest.mark.parametrize(("argv_tail", "message"), [
    (["--query-gpu=index,bogus,name", "--format=csv,noheader,nounits"],
     'Field "bogus" is not a valid field to query.'),
    ([("--query-gpu=name,index,uuid,utilization.gpu,temperature.gpu,power.draw,memory.total,"
       "memory.used,memory.free,driver_version"), "--format=csv,noheader,nounits"], "not the list"),
    (["--query-compute-apps=gpu_uuid,pid,process_name", "--format=csv,noheader,nounits"], "not the list"),
    ([gpu_smi.gpu_argv()[1], "--format=csv"], "csv,noheader,nounits"),
    ([gpu_smi.gpu_argv()[1]], "--format"),
    ([], "Usage"),
    (["-L"], "Usage"),
])
def test_fake_refuses_other_queries(tmp_path: Path, argv_tail: list[str], message: str) -> None:
    done = run_fake([str(fake_bin(tmp_path, "discrete") / "nvidia-smi"), *argv_tail])
    assert done.returncode == 2
    assert done.stdout == ""
    assert message in done.stderr


def test_fake_fail_file_is_the_driver_failure(tmp_path: Path) -> None:
    bin_dir = fake_bin(tmp_path, "gb10")
    (bin_dir / "fail").touch()
    done = run_fake(gpu_smi.gpu_argv(str(bin_dir / "nvidia-smi")))
    assert done.returncode == 9
    assert done.stdout.splitlines()[0] == DRIVER_FAILURE
    snap = gpu_smi.parse(done.stdout, "", None, taken_at=NOW)
    assert not snap.available and DRIVER_FAILURE[:60] in snap.reason


def test_the_energy_query_reads_each_gpus_counter_in_joules():
    assert gpu_smi.energy_argv("/opt/nvidia-smi") == [
        "/opt/nvidia-smi", "--query-gpu=index,total_energy_consumption,utilization.gpu",
        "--format=csv,noheader,nounits"]
    snap = gpu_smi.parse_energy("0, 123456789, 87\n1, [N/A], 3\n", taken_at=NOW, host="box")
    assert snap.available and [(d.index, d.energy_j, d.utilization_pct) for d in snap.devices] == [
        (0, 123456.789, 87.0), (1, None, 3.0)]
    garbage = gpu_smi.parse_energy(DRIVER_FAILURE, taken_at=NOW, host="box")
    assert not garbage.available and garbage.reason.startswith("nvidia-smi on box printed")
    assert gpu_smi.parse_energy("", taken_at=NOW).reason == gpu_smi.NO_GPU
