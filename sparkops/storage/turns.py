"""SparkOps' writers of one SQLite file take turns before asking SQLite for its lock.

SQLite has one writer at a time; a writer that finds the lock taken sleeps in
SQLite's busy handler, whose sleeps grow to 100 ms. With several dispatchers and
shims writing at once on two cores, a waiter kept missing the moment the lock came
free and one claim in a hundred waited half a second (docs/benchmarks.md, "Claims
with concurrent dispatchers"). So SparkOps' own writers first take a turn: an
exclusive ``flock`` on ``<database>.writers`` next to the file, held from before
the write transaction asks for SQLite's lock until after its commit. A writer that finds the turn taken
blocks in the kernel, which wakes it the moment the turn is given back (asking
again every so often was no better than SQLite's own sleeps: the one giving the
turn back, already running, took it again). Only the writer whose turn it is ever
waits on SQLite's lock, and only for another program (Hermes, an operator's
``sqlite3``).

A turn never makes a writer wait longer than it would have: past ``timeout`` it
goes on without its turn (SQLite's busy timeout then decides, as before), and a
file that cannot be made (a read-only directory, a full disk) means no turns. The
lock is the kernel's: a writer that dies gives its turn back at once.
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
            held = self._take(fd, deadline) if fd is not None else None
            try:
                yield
            finally:
                if held is not None:
                    fcntl.flock(held, fcntl.LOCK_UN)
                    if held != fd:
                        os.close(held)
        finally:
            self._threads.release()

    def _take(self, fd: int, deadline: float) -> int | None:
        """Take the turn; the descriptor that holds it, or None past the deadline."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            pass
        except OSError:
            return None
        # Wait in the kernel, on a thread, so that the wait can end at the deadline.
        # The waiter locks a descriptor of its own: if it gets the turn after we
        # gave up, it gives it back without touching a later turn of ours.
        try:
            own = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        waiter = _Waiter(own)
        threading.Thread(target=waiter.wait, name="sqlite-turn", daemon=True).start()
        return own if waiter.got(deadline - time.monotonic()) else None

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


class _Waiter:
    """A blocking ``flock`` that can be given up on."""

    def __init__(self, fd: int):
        self.fd = fd
        self._got = threading.Event()
        self._guard = threading.Lock()
        self._abandoned = False

    def wait(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        except OSError:
            os.close(self.fd)
            with self._guard:
                self._abandoned = True  # no turn: the writer goes on without one
            self._got.set()
            return
        with self._guard:
            if self._abandoned:  # too late: give the turn back
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                return
            self._got.set()

    def got(self, timeout: float) -> bool:
        self._got.wait(max(0.0, timeout))
        with self._guard:
            if self._got.is_set() and not self._abandoned:
                return True
            self._abandoned = True
            return False
