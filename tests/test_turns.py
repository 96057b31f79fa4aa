"""SparkOps' SQLite writers take turns (``sparkops/storage/turns.py``), across real
processes: a waiter gets the turn the moment it is given back, a turn held too long
is passed over at the timeout (and given back by the late waiter), and a writer that
dies gives its turn back at once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ROOT

from sparkops.storage.turns import Turns

#: A process that holds a turn of DB for SECONDS (or until killed), saying when it has it.
HOLDER = """
import sys, time
from pathlib import Path
sys.path.insert(0, {root!r})
from sparkops.storage.turns import Turns
with Turns(Path({db!r}), timeout=60).turn():
    print("held", flush=True)
    time.sleep({seconds})
"""


def hold(db: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER.format(root=str(ROOT), db=str(db), seconds=seconds)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_waiter_gets_the_turn_when_it_is_given_back(tmp_path: Path):
    db = tmp_path / "kanban.db"
    holder = hold(db, 0.5)
    started = time.monotonic()
    with Turns(db, timeout=30).turn():
        waited = time.monotonic() - started
    holder.wait()
    assert 0.3 < waited < 3  # the holder's half second, not a polling interval or the timeout
    assert (tmp_path / "kanban.db.writers").exists()


def test_a_turn_held_too_long_is_passed_over_and_given_back_late(tmp_path: Path):
    db = tmp_path / "kanban.db"
    holder = hold(db, 2.0)
    turns = Turns(db, timeout=0.3)
    started = time.monotonic()
    with turns.turn():  # goes on without its turn at the timeout
        assert 0.25 < time.monotonic() - started < 1.5
    holder.wait()
    # the abandoned waiter got the turn after the holder and gave it back at once
    started = time.monotonic()
    with Turns(db, timeout=30).turn():
        assert time.monotonic() - started < 1.0
    with turns.turn():  # and the same Turns takes turns as before
        pass


def test_a_writer_that_dies_gives_its_turn_back_at_once(tmp_path: Path):
    db = tmp_path / "kanban.db"
    holder = hold(db, 60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with Turns(db, timeout=30).turn():
        assert time.monotonic() - started < 1.0


def test_threads_of_one_process_take_turns_too(tmp_path: Path):
    import threading

    turns, inside, most = Turns(tmp_path / "kanban.db", timeout=30), [0], [0]

    def write() -> None:
        for _ in range(20):
            with turns.turn():
                inside[0] += 1
                most[0] = max(most[0], inside[0])
                time.sleep(0.001)
                inside[0] -= 1

    workers = [threading.Thread(target=write) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert most[0] == 1
