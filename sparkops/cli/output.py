"""How the command line prints: one line per thing, ``--json`` for scripts, times and
durations for people, status marks.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from sparkops.core.formatting import duration, when

STATUS_MARK = {
    "triage": "?", "todo": "·", "scheduled": "⏲", "ready": "▶", "running": "●",
    "blocked": "■", "review": "◆", "done": "✓", "archived": "x",
}


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False, default=str))


def emit(args: argparse.Namespace, value: Any, text: Callable[[], None]) -> None:
    if getattr(args, "json", False):
        print_json(value)
    else:
        text()


def print_gpus(snap, indent: str = "") -> None:
    if not snap.available:
        print(f"{indent}No GPU information: {snap.reason}")
        return
    print(f"{indent}NVIDIA driver {snap.driver_version or '?'}")
    for d in snap.devices:
        memory = (f"{(d.memory_used_mb or 0) / 1024:.1f} / {(d.memory_total_mb or 0) / 1024:.1f} GiB"
                  + (" (unified memory)" if d.unified else ""))
        print(f"{indent}  GPU {d.index}: {d.name}  util {d.utilization_pct if d.utilization_pct is not None else '?'}%"
              f"  {d.temperature_c if d.temperature_c is not None else '?'} C"
              f"  {d.power_w if d.power_w is not None else '?'} W  {memory}")
    for p in snap.processes:
        used = f"{p.used_memory_mb / 1024:.1f} GiB" if p.used_memory_mb is not None else "? GiB"
        print(f"{indent}    pid {p.pid:<8} GPU {p.device_index}  {used:>10}  {(p.command_line or '?')[:100]}")


def print_runs(runs: list[dict]) -> None:
    now = int(time.time())
    for r in runs:
        ended = r["ended_at"]
        elapsed = (ended or now) - r["started_at"]
        print(f"  #{r['id']:<4} {r['outcome'] or r['status']:<18} {r['task_id']}  "
              f"@{r['profile'] or '-':<12} {duration(elapsed):>7}  {when(r['started_at'], seconds=False)}")
        detail = r["summary"] or r["error"]
        if detail:
            print(f"        → {detail.strip().splitlines()[0][:200]}")
