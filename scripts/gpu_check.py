"""Check SparkOps' GPU adapter (sparkops/watch/gpu.py) on a machine with a real NVIDIA GPU.

    python scripts/gpu_check.py [--mb 256]

Needs only nvidia-ml-py and psutil (no torch, no database). It

1. prints the adapter's snapshot as JSON (devices and processes);
2. starts a tiny CUDA process in its own session (``python -c`` with ctypes:
   cuInit, cuMemAlloc of 256 MiB from libcuda.so.1) and prints the snapshot again,
   which should list that process and its memory;
3. prints the zombie rule's dry run (``explain``) with a tiny threshold and a kill
   pattern that matches only the helper. Nothing is ever signalled: the helper
   frees its memory and exits when this script closes its stdin;
4. waits through the adapter until NVML no longer lists the helper.

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

from sparkops.watch import gpu, zombie_rule

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


def main(argv: list[str] | None = None, *, nvml: Any = None, holder_code: str = CUDA_HOLDER,
         out: Callable[[str], None] = print) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="MiB the helper allocates (default 256)")
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for the helper's allocation (default 60)")
    parser.add_argument("--list-timeout", type=float, default=15.0,
                        help="seconds to wait for NVML to list the helper (default 15)")
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
