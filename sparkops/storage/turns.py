"""SparkOps' writers of one SQLite file take turns before asking SQLite for its lock.

SQLite has one writer at a time; a writer that finds the lock taken sleeps in
SQLite's busy handler, whose sleeps grow to 100 ms. With several dispatchers and
shims writing at once on two cores, a waiter kept missing the moment the lock came
free and one claim in a hundred waited half a second (docs/benchmarks.md, "Claims
with concurrent dispatchers"). So SparkOps' own writers first take a turn: an
exclusive ``flock`` on ``<database>.writers`` next to the file, asked for again
every millisecond or so, held from before ``BEGIN IMMEDIATE`` until after the
commit. Only one of them then ever waits on SQLite's lock, and only for another
program (Hermes, an operator's ``sqlite3``).

A turn never makes a writer wait longer than it would have: past ``timeout`` it
goes on without its turn (SQLite's busy timeout then decides, as before), and a
file that cannot be made (a read-only directory, a full disk) means no turns. The
lock is the kernel's: a writer that dies loses its turn at once.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

#: The longest sleep between two asks for a turn.
POLL_MAX = 0.002


class Turns:
    """Turns at writing one SQLite file, for the threads and processes of SparkOps."""

    def __init__(self, database: Path, *, timeout: float):
        self.path = database.with_name(database.name + ".writers")
        self.timeout = timeout
        self._threads = threading.Lock()  # flock is per open file: threads queue here first
        self._fd: int | None = None
        self._pid = 0

    @contextmanager
    def turn(self) -> Iterator[None]:
        deadline = time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=self.timeout):
            yield
            return
        try:
            fd = self._file()
            held = fd is not None and self._take(fd, deadline)
            try:
                yield
            finally:
                if held:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            self._threads.release()

    def _take(self, fd: int, deadline: float) -> bool:
        wait = 0.0001
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(wait)
                wait = min(wait * 2, POLL_MAX)
            except OSError:
                return False

    def _file(self) -> int | None:
        if self._fd is not None and self._pid == os.getpid():
            return self._fd
        # (a forked child opens its own: a lock on the parent's open file would be shared)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            self._pid = os.getpid()
        except OSError as exc:
            if self._pid != -1:
                log.info("writers of %s go without turns: cannot open %s: %s", self.path.with_suffix(""),
                         self.path, exc.strerror or exc)
            self._fd, self._pid = None, -1
            return None
        return self._fd

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd, self._pid = None, 0
