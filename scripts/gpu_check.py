"""Check SparkOps' GPU adapter (sparkops/meters/gpu.py) on a machine with a real NVIDIA GPU.

    python scripts/gpu_check.py [--mb 256]

Needs only nvidia-ml-py and psutil (no torch, no database). It

1. prints the adapter's snapshot as JSON (devices and processes);
2. starts a tiny CUDA process in its own session (``python -c`` with ctypes:
   cuInit, cuMemAlloc of 256 MiB from libcuda.so.1) and prints the snapshot again,
   which should list that process and its memory;
3. prints the zombie rule's dry run (``explain``) with a tiny threshold and a kill
   pattern that matches only the helper. Nothing is ever signalled: the helper
   frees its memory and exits when this script closes its stdin;
4. waits through the adapter until NVML no longer lists the helper;
5. meters a small workload as a run's shim does (issue 17): samples the GPUs'
   energy counter and utilization (``sparkops.meters.sample``) every
   ``--every`` seconds through an idle stretch, a stretch of bf16 matrix products
   (PyTorch, in a helper process) and another idle stretch, and shares the
   counter's increase out to the three stretches as to three runs
   (``sparkops.meters.usage``). The energy per stretch is checked against NVML's
   instantaneous power read at the same samples.

It always exits 0 and ends with what it could and could not do.
"""

from __future__ import annotations

import argparse
import json
import re
import select
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python scripts/gpu_check.py`
    sys.path.insert(0, str(ROOT))

from sparkops.meters import gpu, usage
from sparkops.meters.sample import Sample
from sparkops.meters.sample import read as read_sample
from sparkops.watch import zombie_rule

MARKER = "sparkops-gpu-check-holder"

#: The helper: argv is MARKER MB. Prints "ready" once the memory is allocated and
#: touched, "error: ..." when CUDA refuses; frees and exits when stdin closes.
CUDA_HOLDER = r'''
import ctypes, sys
mb = int(sys.argv[2])
try:
    cuda = ctypes.CDLL("libcuda.so.1")
except OSError as exc:
    print(f"error: cannot load libcuda.so.1: {exc}", flush=True)
    sys.exit(2)

def check(what, rc):
    if rc != 0:
        name = ctypes.c_char_p()
        cuda.cuGetErrorName(rc, ctypes.byref(name))
        print(f"error: {what} returned {rc} ({(name.value or b'?').decode()})", flush=True)
        sys.exit(3)

check("cuInit", cuda.cuInit(0))
dev = ctypes.c_int()
check("cuDeviceGet", cuda.cuDeviceGet(ctypes.byref(dev), 0))
ctx = ctypes.c_void_p()
check("cuDevicePrimaryCtxRetain", cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev))
check("cuCtxSetCurrent", cuda.cuCtxSetCurrent(ctx))
ptr = ctypes.c_uint64()
size = ctypes.c_size_t(mb << 20)
check("cuMemAlloc_v2", cuda.cuMemAlloc_v2(ctypes.byref(ptr), size))
check("cuMemsetD8_v2", cuda.cuMemsetD8_v2(ptr, ctypes.c_ubyte(1), size))
check("cuCtxSynchronize", cuda.cuCtxSynchronize())
print("ready", flush=True)
sys.stdin.read()  # until the checker closes our stdin
cuda.cuMemFree_v2(ptr)
cuda.cuDevicePrimaryCtxRelease(dev)
'''

#: The workload: argv is MARKER SECONDS. Prints "ready" once PyTorch holds two bf16
#: matrices on the GPU, waits for a line on stdin, multiplies them for SECONDS and
#: prints "done N".
WORKLOAD = r'''
import sys, time
seconds = float(sys.argv[2])
try:
    import torch
except ImportError as exc:
    print(f"error: no PyTorch: {exc}", flush=True)
    sys.exit(2)
if not torch.cuda.is_available():
    print("error: PyTorch sees no GPU", flush=True)
    sys.exit(3)
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
(a @ b).sum().item()
print("ready", flush=True)
sys.stdin.readline()
end, n = time.monotonic() + seconds, 0
while time.monotonic() < end:
    for _ in range(10):
        c = a @ b
    torch.cuda.synchronize()
    n += 10
print(f"done {n}", flush=True)
'''


def main(argv: list[str] | None = None, *, nvml: Any = None, holder_code: str = CUDA_HOLDER,
         workload_code: str = WORKLOAD, out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MiB the helper allocates (default 256)")
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for the helper's allocation (default 60)")
    parser.add_argument("--list-timeout", type=float, default=15.0,
                        help="seconds to wait for NVML to list the helper (default 15)")
    parser.add_argument("--workload-seconds", type=float, default=10.0,
                        help="seconds of matrix products to meter (default 10; 0 skips the meters)")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="seconds metered idle before and after the workload (default 5)")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples (default 0.5)")
    args = parser.parse_args(argv)
    could: list[str] = []
    could_not: list[str] = []
    holder: subprocess.Popen | None = None
    try:
        holder = _check(args, nvml, holder_code, out, could, could_not)
    except Exception as exc:  # noqa: BLE001 - report, never crash: this is a diagnostic
        out(traceback.format_exc().rstrip())
        could_not.append(f"the check itself failed: {type(exc).__name__}: {exc}")
    finally:
        if holder is not None:
            _end_holder(holder, could_not)
    if args.workload_seconds > 0:
        try:
            _meters(args, nvml, workload_code, out, could, could_not)
        except Exception as exc:  # noqa: BLE001
            out(traceback.format_exc().rstrip())
            could_not.append(f"the meters' check itself failed: {type(exc).__name__}: {exc}")
    out("")
    out("== summary ==")
    out("Nothing was killed: the zombie rule ran as a dry run only.")
    for line in could:
        out(f"COULD: {line}")
    for line in could_not:
        out(f"COULD NOT: {line}")
    return 0


def _check(args: argparse.Namespace, nvml: Any, holder_code: str, out: Callable[[str], None],
           could: list[str], could_not: list[str]) -> subprocess.Popen | None:
    out("== snapshot (before) ==")
    before = gpu.snapshot(nvml)
    out(json.dumps(before.as_dict(), indent=2))
    if not before.available:
        could_not.append(f"read the GPU: {before.reason}")
        return None
    if not before.devices:
        could_not.append(f"find a GPU: {before.reason}")
        return None
    could.append(f"read {len(before.devices)} GPU(s) through NVML, driver {before.driver_version}")
    for d in before.devices:
        could.append(f"device {d.index}: {d.name}, util {d.utilization_pct}%, {d.temperature_c} C, "
                     f"{d.power_w} W, memory {_mb(d.memory_used_mb)} used of {_mb(d.memory_total_mb)}"
                     f"{' (unified memory)' if d.unified else ''}"
                     f"{'; notes: ' + '; '.join(d.notes) if d.notes else ''}")

    out("")
    out(f"== starting a CUDA helper holding {args.mb} MiB ==")
    holder = subprocess.Popen([sys.executable, "-c", holder_code, MARKER, str(args.mb)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    line = _first_line(holder, args.ready_timeout)
    if line != "ready":
        holder.stdin.close()
        try:
            holder.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        err = (holder.stderr.read() if holder.poll() is not None else "").strip()
        could_not.append(f"start a CUDA process: {line or 'no answer'}{' / ' + err[-500:] if err else ''}")
        return holder
    out(f"helper pid {holder.pid} allocated {args.mb} MiB")
    could.append(f"start a CUDA process (pid {holder.pid}) holding {args.mb} MiB")

    deadline = time.monotonic() + args.list_timeout
    while True:
        during = gpu.snapshot(nvml)
        mine = [p for p in during.processes if p.pid == holder.pid]
        if mine or time.monotonic() > deadline or not during.available:
            break
        time.sleep(0.5)
    out("")
    out("== snapshot (with the helper) ==")
    out(json.dumps(during.as_dict(), indent=2))
    if not mine:
        could_not.append(f"see the helper (pid {holder.pid}) among NVML's GPU processes within "
                         f"{args.list_timeout:g}s (in a container NVML may report pids of another pid "
                         "namespace, or the driver may not list processes here)")
        return holder
    p = mine[0]
    could.append(f"see the helper as a GPU process: pid {p.pid} on device {p.device_index}, "
                 f"{_mb(p.used_memory_mb)}, command line {p.command_line!r}")
    if p.used_memory_mb is None:
        could_not.append("read the helper's GPU memory (NVML said not available)")

    out("")
    out("== zombie rule, dry run (threshold 0.01 GB, kill pattern matches only the helper) ==")
    rule = {"gpu.zombie_threshold_gb": 0.01, "gpu.serving_patterns": [],
            "gpu.kill_patterns": [re.escape(MARKER)], "gpu.health_failures_before_kill": 3}
    zombies = zombie_rule.find_zombies(during, rule, serving_healthy=True, health_failures=0)
    for text in zombie_rule.explain(zombies) or ["(no zombies)"]:
        out(text)
    if any(z.pid == holder.pid and z.killable for z in zombies):
        could.append("have the zombie rule name the helper as killable (dry run, nothing signalled)")
    else:
        could_not.append("have the zombie rule name the helper as killable (see the dry run above)")

    out("")
    out("== releasing: closing the helper's stdin, waiting for NVML to stop listing it ==")
    holder.stdin.close()
    released, _listed, waited, note = zombie_rule.wait_for_memory_release(
        {holder.pid: p.start_time}, nvml=nvml, timeout=30.0)
    out(note)
    if released:
        could.append(f"see the helper's GPU memory released ({waited:.1f}s)")
    else:
        could_not.append(f"see the helper's GPU memory released: {note}")
    return holder


def _meters(args: argparse.Namespace, nvml: Any, workload_code: str, out: Callable[[str], None],
            could: list[str], could_not: list[str]) -> None:
    out("")
    out(f"== meters: {args.idle_seconds:g}s idle, {args.workload_seconds:g}s of bf16 matrix products, "
        f"{args.idle_seconds:g}s idle; a sample every {args.every:g}s ==")
    first = read_sample(metrics_url=None, gpu=gpu.snapshot(nvml))
    if first.energy_j is None:
        could_not.append(f"read the GPUs' energy counter: {first.sources.get('gpu')}")
    worker = subprocess.Popen([sys.executable, "-c", workload_code, MARKER, str(args.workload_seconds)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    try:
        line = _first_line(worker, 120.0)
        if line != "ready":
            could_not.append(f"start the workload: {line or 'no answer'}")
            return
        samples: list[tuple[Sample, list[float | None], float]] = []  # sample, powers, ms to read
        # the stretches begin and end at samples, as a run's first and last sample
        _sample_for(args.idle_seconds, args.every, nvml, samples)
        marks = [samples[0][0].at, samples[-1][0].at]
        worker.stdin.write("go\n")
        worker.stdin.flush()
        done = _sample_until(worker, args.every, nvml, samples, limit=args.workload_seconds + 60)
        marks.append(samples[-1][0].at)
        _sample_for(args.idle_seconds, args.every, nvml, samples)
        marks.append(samples[-1][0].at)
    finally:
        _end_holder(worker, could_not)
    out(f"workload: {done or 'no answer'}")
    _report_meters(samples, marks, out, could, could_not)


def _take(nvml: Any, samples: list) -> None:
    started = time.perf_counter()
    snap = gpu.snapshot(nvml)
    taken = read_sample(metrics_url=None, gpu=snap)
    samples.append((taken, [d.power_w for d in snap.devices], (time.perf_counter() - started) * 1000))


def _sample_for(seconds: float, every: float, nvml: Any, samples: list) -> None:
    end = time.monotonic() + seconds
    while True:
        _take(nvml, samples)
        if time.monotonic() >= end:
            return
        time.sleep(min(every, max(0.0, end - time.monotonic())))


def _sample_until(worker: subprocess.Popen, every: float, nvml: Any, samples: list, limit: float) -> str:
    end = time.monotonic() + limit
    while time.monotonic() < end:
        _take(nvml, samples)
        ready, _, _ = select.select([worker.stdout], [], [], every)
        if ready:
            line = worker.stdout.readline().strip()
            _take(nvml, samples)
            return line
    return ""


def _report_meters(samples: list, marks: list[float], out: Callable[[str], None],
                   could: list[str], could_not: list[str]) -> None:
    out("   t(s)   energy(J)  util(%)  power(W)  read(ms)")
    t0 = samples[0][0].at
    for taken, powers, ms in samples:
        power = sum(p for p in powers if p is not None) if any(p is not None for p in powers) else None
        out(f"{taken.at - t0:7.2f} {_num(taken.energy_j, 11, 1)} {_num(taken.gpu_util_pct, 8, 0)} "
            f"{_num(power, 9, 0)} {ms:9.1f}")
    energies = [s.energy_j for s, _, _ in samples]
    if any(e is None for e in energies):
        could_not.append("meter the workload: the energy counter was not read at every sample")
        return
    if any(b < a for a, b in zip(energies, energies[1:])):
        could_not.append("see the energy counter only grow (it went down between two samples)")
    stretches = {1: (marks[0], marks[1]), 2: (marks[1], marks[2]), 3: (marks[2], marks[3])}
    shares = usage.attribute([s for s, _, _ in samples], stretches)
    names = {1: "idle before", 2: "workload", 3: "idle after"}
    out("")
    out("stretch        seconds  energy(J)  mean W from energy  mean W from power  GPU-seconds  estimated")
    mean_power: dict[int, float] = {}
    for run_id, share in shares.items():
        start, end = stretches[run_id]
        from_power = _mean_power(samples, start, end)
        from_energy = share.energy_j / share.seconds if share.energy_j is not None and share.seconds else None
        if from_energy is not None:
            mean_power[run_id] = from_energy
        out(f"{names[run_id]:<13} {share.seconds:8.2f} {_num(share.energy_j, 10, 1)} {_num(from_energy, 19, 1)} "
            f"{_num(from_power, 18, 1)} {_num(share.gpu_seconds, 12, 2)}  {share.estimated}")
        if from_energy is not None and from_power is not None and from_power > 0:
            ratio = from_energy / from_power
            (could if 0.75 <= ratio <= 1.33 else could_not).append(
                f"{names[run_id]}: mean power from the energy counter {from_energy:.1f} W against NVML's "
                f"power readings {from_power:.1f} W (ratio {ratio:.2f}; 0.75-1.33 expected: NVML averages "
                "its power readings)")
    work, idle = shares[2], shares[1]
    if 2 in mean_power and 1 in mean_power:
        (could if mean_power[2] > mean_power[1] * 1.2 else could_not).append(
            f"see the workload in the energy counter: {mean_power[2]:.1f} W against {mean_power[1]:.1f} W idle "
            f"({work.energy_j:.0f} J in {work.seconds:.1f}s = {work.energy_j / 3600:.3f} Wh)")
    if work.gpu_seconds is not None and work.seconds:
        busy = work.gpu_seconds / work.seconds
        (could if busy >= 0.5 else could_not).append(
            f"see the workload in the utilization: {work.gpu_seconds:.2f} GPU-seconds in {work.seconds:.2f}s "
            f"({busy:.0%} busy; idle before: {idle.gpu_seconds or 0:.2f})")
    reads = sorted(ms for _, _, ms in samples)
    could.append(f"take {len(samples)} samples, each a full NVML snapshot: median {reads[len(reads) // 2]:.1f} ms, "
                 f"slowest {reads[-1]:.1f} ms")


def _mean_power(samples: list, start: float, end: float) -> float | None:
    """NVML's power readings averaged over ``start``..``end`` as the energy counter
    is: each interval between two samples at the mean of its two ends."""
    points = [(s.at, sum(p for p in pw if p is not None)) for s, pw, _ in samples
              if start <= s.at <= end and any(p is not None for p in pw)]
    joules = sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:]))
    span = points[-1][0] - points[0][0] if len(points) > 1 else 0.0
    return joules / span if span > 0 else None


def _num(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:{width}.{digits}f}"


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        return f"no answer within {timeout:g}s"
    return proc.stdout.readline().strip()


def _end_holder(holder: subprocess.Popen, could_not: list[str]) -> None:
    """The helper is this script's own child; it ends when its stdin closes."""
    if holder.stdin and not holder.stdin.closed:
        holder.stdin.close()
    try:
        holder.wait(timeout=30)
    except subprocess.TimeoutExpired:
        holder.kill()  # our own helper, never anything else
        holder.wait()
        could_not.append(f"end the helper (pid {holder.pid}) by closing its stdin; it was killed")
    for stream in (holder.stdout, holder.stderr):
        if stream:
            stream.close()


def _mb(value: float | None) -> str:
    return "unknown" if value is None else f"{value:.0f} MiB"


if __name__ == "__main__":
    sys.exit(main())
