"""The warm forkserver: one imported process that forks each run's worker shim.

A shim started as ``python -m sparkops.engine.shim TASK RUN`` spends about half a
CPU second starting Python and importing SQLAlchemy before it does anything; on a
2-core box running short tasks that was most of the CPU a run cost. So the runner
keeps one forkserver (``python -m sparkops.engine.forkserver``, started with the
shims' environment and working directory) that has imported the shim and loaded the
settings once, then forks a shim per run: the child is a shim as the plain start
makes it (its own session, stdin from /dev/null, its output appended to the run's
log, a store of its own), at the cost of a ``fork``.

The protocol, one JSON object a line (ids are data, never split out of a line):

* runner -> forkserver, stdin: a hand-over record
  (:func:`sparkops.engine.dispatch.handover_record`: task, run, log path);
* forkserver -> runner, stdout: ``{"run_id": R, "pid": P}`` once the shim of run R
  is forked, ``{"error": ...}`` for a record that is not one (nothing is started),
  and ``{"pid": P, "exit": CODE}`` when shim P ends (CODE as ``Popen.returncode``:
  negative for a signal). It also sends its parent ``SIGCHLD``, so a runner that
  wakes on its children's exits wakes for these too.

End of input (the runner stopped or died) ends the forkserver; the shims it forked
run on in their own sessions, as shims always did. The runner side is
:class:`Forkserver` and :class:`ForkedShim` (which stands where a ``Popen`` of a
shim stood); a forked shim whose exit the forkserver can no longer tell (it died)
is seen gone by its recorded identity, with :data:`EXIT_UNKNOWN`.
"""

from __future__ import annotations

import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from sparkops.config import Settings, load_settings
from sparkops.core import procs
from sparkops.core.errors import InvalidInput, SparkOpsError
from sparkops.engine import shim
from sparkops.storage.db import retrying
from sparkops.storage.store import open_store

log = logging.getLogger(__name__)

#: The exit of a forked shim whose forkserver died before it could say.
EXIT_UNKNOWN = -255
#: How long the runner waits for the forkserver to say it forked a shim.
FORK_REPLY_SECONDS = 10.0
#: How long the runner waits for the forkserver to tell the exit of a shim that ended.
EXIT_TELL_SECONDS = 2.0


# -- the forkserver process ------------------------------------------------------------


def serve(settings: Settings, *, inp: int = 0, out: int = 1) -> int:
    """Fork a shim for each hand-over record read from ``inp``; report on ``out``."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda _sig, _frame: None)  # (the wakeup fd does the work)
    pending = b""
    try:
        while True:
            ready, _, _ = select.select([inp, wake_r], [], [])
            if wake_r in ready:
                _drain(wake_r)
            _report_exits(out)
            if inp not in ready:
                continue
            data = os.read(inp, 65536)
            if not data:
                return 0  # the runner went away; the shims run on
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                _hand(settings, line.decode("utf-8", "replace"), out, close=(inp, out, wake_r, wake_w))
    finally:
        signal.set_wakeup_fd(-1)


def _hand(settings: Settings, line: str, out: int, *, close: tuple[int, ...]) -> None:
    try:
        task_id, run_id, log_path = shim.parse_assignment(line)
    except InvalidInput as bad:
        log.error("%s", bad)
        _say(out, {"error": str(bad)})
        return
    pid = os.fork()
    if pid == 0:
        _be_the_shim(settings, task_id, run_id, log_path, close)
    _say(out, {"run_id": run_id, "pid": pid})


def _be_the_shim(settings: Settings, task_id: str, run_id: int, log_path: Path, close: tuple[int, ...]) -> None:
    """In the forked child: become the run's shim, as a plain start would make it."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:
            if fd > 2:
                os.close(fd)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        shim.redirect_output(log_path)
        code = shim.run_assignment(settings, task_id, run_id)
    except BaseException:  # noqa: BLE001 - say it in the run's log, then leave with 1
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _report_exits(out: int) -> None:
    told = False
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        _say(out, {"pid": pid, "exit": os.waitstatus_to_exitcode(status)})
        told = True
    if told and os.getppid() != 1:
        os.kill(os.getppid(), signal.SIGCHLD)  # the runner wakes to fill the slot


def _say(out: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    while data:
        data = data[os.write(out, data):]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def main() -> int:
    shim.configure_logging()
    try:
        settings = load_settings()
        # a broken configuration or board says so now, not in every run
        retrying(lambda: open_store(settings), seconds=settings["storage.retry_seconds"],
                 what="forkserver: opening the store").dispose()
    except SparkOpsError as err:
        log.error("%s", err)
        return 1
    return serve(settings)


# -- the runner's side -----------------------------------------------------------------------


class Forkserver:
    """The runner's handle on its forkserver process."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.pid = proc.pid
        os.set_blocking(proc.stdout.fileno(), False)
        self._pending = b""
        self._exits: dict[int, int] = {}
        self._forked: dict[int, int] = {}  # run id -> pid
        self._refused = 0  # records the forkserver refused

    @classmethod
    def start(cls, *, cwd: Path, env: dict[str, str]) -> Forkserver:
        proc = subprocess.Popen([sys.executable, "-m", "sparkops.engine.forkserver"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=cwd, env=env,
                                start_new_session=True, close_fds=True)
        return cls(proc)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def hand(self, record: bytes, run_id: int) -> ForkedShim | None:
        """Have the forkserver fork the shim of ``run_id``; None if it did not."""
        refused = self._refused
        try:
            self.proc.stdin.write(record)
            self.proc.stdin.flush()
        except OSError:
            return None
        deadline = time.monotonic() + FORK_REPLY_SECONDS
        while run_id not in self._forked and self._refused == refused:
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(timeout=left):
                return None
        if run_id not in self._forked:
            return None
        pid = self._forked.pop(run_id)
        return ForkedShim(self, pid, procs.describe(pid))

    def exit_of(self, pid: int, *, wait: float = 0.0) -> int | None:
        """The exit of forked shim ``pid`` if told (waiting up to ``wait`` seconds)."""
        deadline = time.monotonic() + wait
        self._read(timeout=0)
        while pid not in self._exits and time.monotonic() < deadline:
            if not self._read(timeout=deadline - time.monotonic()):
                break
        return self._exits.pop(pid, None)

    def stop(self) -> None:
        """End the forkserver (end of input); the shims it forked run on."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        while self._read(timeout=0):  # the exits it told before it ended
            pass
        self.proc.stdout.close()

    def _read(self, *, timeout: float) -> bool:
        """Take what the forkserver said; False when it is gone or said nothing in time."""
        if self.proc.stdout.closed:
            return False
        fd = self.proc.stdout.fileno()
        if timeout > 0 and not select.select([fd], [], [], timeout)[0]:
            return False
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            return False
        if not data:
            return False
        self._pending += data
        while b"\n" in self._pending:
            line, self._pending = self._pending.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if "exit" in message:
                self._exits[int(message["pid"])] = int(message["exit"])
            elif "run_id" in message:
                self._forked[int(message["run_id"])] = int(message["pid"])
            elif "error" in message:
                self._refused += 1
                log.warning("the forkserver refused a hand-over: %s", message["error"])
        return True


class ForkedShim:
    """A shim the forkserver forked: where a ``Popen`` of a shim stood (``pid``,
    ``poll()``, ``returncode``)."""

    def __init__(self, server: Forkserver, pid: int, recorded: procs.Proc | None):
        self.server = server
        self.pid = pid
        self.recorded = recorded
        self.returncode: int | None = None

    def kill(self) -> None:
        """SIGKILL, to this very process only (checked by its recorded identity)."""
        if self.poll() is None and procs.is_alive(self.recorded):
            os.kill(self.pid, signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"shim {self.pid}", timeout)
            time.sleep(0.02)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is None:
            code = self.server.exit_of(self.pid)
            if code is None and not procs.is_alive(self.recorded):
                # it ended: its forkserver tells its exit at once (as waitpid would), or
                # died and never will
                code = self.server.exit_of(self.pid, wait=EXIT_TELL_SECONDS) if self.server.alive() else None
                if code is None:
                    code = EXIT_UNKNOWN
            self.returncode = code
        return self.returncode


if __name__ == "__main__":
    sys.exit(main())
