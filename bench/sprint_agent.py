"""The benchmarks' agent: works for a seeded random time, then completes, crashes
or hangs, and appends precise start/end times to a JSON-lines file.

    sprint_agent.py TIMINGS_FILE MIN_SECONDS MAX_SECONDS CRASH_RATE HANG_RATE

It completes through the library (``board.complete`` with its run id, the same
fenced call the CLI makes) so its own bookkeeping costs milliseconds, not a CLI
start-up. Reads SPARKOPS_TASK_ID / SPARKOPS_RUN_ID / SPARKOPS_STORAGE_BOARD_URL
like any worker.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import time


def main() -> int:
    timings, low, high, crash_rate, hang_rate = sys.argv[1], *map(float, sys.argv[2:6])
    start = time.time()
    task, run = os.environ["SPARKOPS_TASK_ID"], int(os.environ["SPARKOPS_RUN_ID"])
    seed = int.from_bytes(hashlib.sha256(f"{task}:{run}".encode()).digest()[:8], "big")
    rng = random.Random(seed)
    draw, duration = rng.random(), rng.uniform(low, high)
    outcome = "crash" if draw < crash_rate else "hang" if draw < crash_rate + hang_rate else "complete"

    def record(result: str) -> None:
        with open(timings, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"task": task, "run": run, "start": start, "end": time.time(),
                                 "planned": outcome, "result": result}) + "\n")

    def on_term(_sig, _frame):
        record("terminated")
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)
    if outcome == "hang":
        while True:
            time.sleep(3600)
    if outcome == "crash":
        time.sleep(duration * rng.uniform(0.2, 0.8))
        record("crashed")
        print("sprint agent: simulated crash", file=sys.stderr)
        return 1
    time.sleep(duration)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from sparkops.board import transitions as board
    from sparkops.storage.db import Database

    db = Database(os.environ["SPARKOPS_STORAGE_BOARD_URL"], role="board")
    board.complete(db, task, run_id=run, result=f"worked {duration:.1f}s")
    db.dispose()
    record("completed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
