"""Push: the latest export to a remote directory over SFTP (the seed's "Push to VPS").

The ``push`` job copies the files of the latest export (:data:`sparkops.sprint.export.FILES`
in ``export.dir``) to ``remote.push_dir`` on ``remote.push_host``:

* **a consistent set**: the files are hard-linked into a private staging folder
  under the export's own lock, so an export that runs meanwhile cannot mix two
  exports in one push;
* **never a partial file there**: each file is written to ``.NAME.sparkops-tmp-*``
  in the remote directory, its size checked, its mtime set, and then renamed over
  the old one with OpenSSH's atomic ``posix-rename``; the CSVs go first and
  ``board.json`` last, as the export renames them. A push that breaks (the server
  dies, the network goes) leaves every remote file as it was; the next push
  removes the temporaries a broken one left;
* **only what changed**: a file is skipped when its SHA-256 equals the one last
  pushed and the remote file still has the size and mtime it was given then (the
  manifest is kept in ``ops_remote``, kind ``push``);
* **bounded**: connecting waits at most ``remote.connect_timeout_seconds``, each
  SFTP read or write at most ``remote.io_timeout_seconds``.

:func:`push` is the one-step entry point (the CLI's ``remote push`` and the job);
``progress`` gets ``(file, bytes sent, bytes in all)`` as a file goes.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import paramiko

from sparkops.jobs.framework import JobLock, JobReport
from sparkops.net import ssh as remote
from sparkops.sprint import export

if TYPE_CHECKING:
    from sparkops.jobs.framework import JobContext

log = logging.getLogger(__name__)

KIND = "push"
TEMP_MARK = ".sparkops-tmp-"
Progress = Callable[[str, int, int], None]


class PushError(remote.RemoteError):
    """A push that did not finish; the files already renamed are in ``sent``."""

    def __init__(self, host: str, message: str, sent: list[str]):
        self.sent = sent
        super().__init__(host, message)


@dataclass(frozen=True)
class LocalFile:
    name: str
    path: Path
    size: int
    mtime: int
    sha256: str


@dataclass
class PushResult:
    host: str
    directory: str
    sent: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    bytes_sent: int = 0
    stale_removed: int = 0

    def summary(self) -> str:
        where = f"{self.host}:{self.directory}"
        if not self.sent:
            return f"nothing changed: {len(self.unchanged)} file(s) already on {where}"
        return (f"sent {len(self.sent)} file(s) ({_size(self.bytes_sent)}) to {where}: "
                f"{', '.join(self.sent)}; {len(self.unchanged)} unchanged")

    def as_dict(self) -> dict[str, Any]:
        return {"host": self.host, "directory": self.directory, "sent": self.sent,
                "unchanged": self.unchanged, "bytes_sent": self.bytes_sent,
                "stale_removed": self.stale_removed}


def run(ctx: JobContext, *, now: float | None = None, progress: Progress | None = None) -> JobReport:
    """The ``push`` job (off while ``remote.push_host`` is empty). It runs under the
    job's lock (:func:`sparkops.jobs.framework.run_job`), so one push at a time per host."""
    host = ctx.settings["remote.push_host"]
    if not host:
        return JobReport("off (remote.push_host is not set)", acted=False)
    if not latest_files(ctx.settings["export.dir"]):
        return JobReport(f"no export in {ctx.settings['export.dir']} yet; nothing to push", acted=False)
    result = push(ctx, now=now, progress=progress)
    return JobReport(result.summary(), acted=bool(result.sent), details=result.as_dict())


def latest_files(directory: Path) -> list[str]:
    """The export's files present in ``directory``, in the order they are pushed."""
    return [name for name in export.FILES if (Path(directory) / name).is_file()]


def push(ctx: JobContext, *, now: float | None = None, progress: Progress | None = None) -> PushResult:
    """Copy the latest export to the push host (see the module docstring). Raises
    :class:`PushError` (or another RemoteError) when it could not finish; the
    remote files it had not renamed yet are untouched."""
    settings = ctx.settings
    host = settings["remote.push_host"]
    if not host:
        raise remote.RemoteError("", "no push host: set remote.push_host to a [remotes.NAME] host")
    directory = settings["remote.push_dir"]
    source = Path(settings["export.dir"])
    if not latest_files(source):
        raise remote.RemoteError(host, f"no export in {source} to push; run `python -m sparkops job run "
                                       "export` first")
    state = remote.load_state(ctx.store.ops, ctx.host, KIND, host)
    manifest: dict[str, dict[str, Any]] = dict((state.data.get("files") or {}) if state else {})
    result = PushResult(host, directory)
    with _Staged(source) as files:
        try:
            with remote.connect(settings, host) as conn:
                sftp = conn.client.open_sftp()
                sftp.get_channel().settimeout(settings["remote.io_timeout_seconds"])
                try:
                    _send_all(sftp, directory, files, manifest, result, progress)
                finally:
                    sftp.close()
        except (OSError, EOFError, paramiko.SSHException) as exc:
            message = (f"the push to {host}:{directory} broke after {len(result.sent)} of {len(files)} "
                       f"file(s): {_why(exc)}; the remote files not yet replaced are as they were")
            _record(ctx, host, "error", message, manifest, result, now)
            raise PushError(host, message, result.sent) from None
        except remote.RemoteError as exc:
            _record(ctx, host, "error", str(exc), manifest, result, now)
            raise
    _record(ctx, host, "ok", result.summary(), manifest, result, now)
    return result


def _send_all(sftp: paramiko.SFTPClient, directory: str, files: list[LocalFile],
              manifest: dict[str, dict[str, Any]], result: PushResult, progress: Progress | None) -> None:
    _makedirs(sftp, directory)
    result.stale_removed = _remove_stale(sftp, directory)
    for local in files:
        target = str(PurePosixPath(directory) / local.name)
        if _unchanged(sftp, target, local, manifest.get(local.name)):
            result.unchanged.append(local.name)
            continue
        temp = str(PurePosixPath(directory) / f".{local.name}{TEMP_MARK}{secrets.token_hex(4)}")
        callback = (lambda sent, total, name=local.name: progress(name, sent, total)) if progress else None
        try:
            sftp.put(str(local.path), temp, callback=callback, confirm=True)
            sftp.utime(temp, (local.mtime, local.mtime))
            sftp.posix_rename(temp, target)
        except BaseException:
            _try_remove(sftp, temp)
            raise
        manifest[local.name] = {"sha256": local.sha256, "size": local.size, "mtime": local.mtime}
        result.sent.append(local.name)
        result.bytes_sent += local.size


def _unchanged(sftp: paramiko.SFTPClient, target: str, local: LocalFile, pushed: dict | None) -> bool:
    if not pushed or pushed.get("sha256") != local.sha256:
        return False
    try:
        there = sftp.stat(target)
    except FileNotFoundError:
        return False
    return there.st_size == pushed.get("size") and int(there.st_mtime or 0) == pushed.get("mtime")


def _makedirs(sftp: paramiko.SFTPClient, directory: str) -> None:
    path = PurePosixPath(directory)
    for part in [*reversed(path.parents), path]:
        if str(part) in ("", ".", "/"):
            continue
        try:
            if not stat.S_ISDIR(sftp.stat(str(part)).st_mode or 0):
                raise NotADirectoryError(errno.ENOTDIR, f"{part} on the remote host is not a directory")
        except FileNotFoundError:
            sftp.mkdir(str(part))


def _remove_stale(sftp: paramiko.SFTPClient, directory: str) -> int:
    """Remove the temporaries a broken push left (only ours: ``.NAME.sparkops-tmp-*``)."""
    removed = 0
    for entry in sftp.listdir(directory):
        if entry.startswith(".") and TEMP_MARK in entry:
            _try_remove(sftp, str(PurePosixPath(directory) / entry))
            removed += 1
    return removed


def _try_remove(sftp: paramiko.SFTPClient, path: str) -> None:
    try:
        sftp.remove(path)
    except (OSError, EOFError, paramiko.SSHException) as exc:  # the next push tries again
        log.debug("could not remove %s: %s", path, exc)


class _Staged:
    """The export's files hard-linked (or copied) into a private folder under the
    export's lock: one consistent set to push, whatever the export does meanwhile."""

    def __init__(self, source: Path):
        self.source = source
        self.folder: Path | None = None

    def __enter__(self) -> list[LocalFile]:
        for left in self.source.glob(".push-*"):  # a killed push's (we hold the push job's lock)
            shutil.rmtree(left, ignore_errors=True)
        self.folder = Path(tempfile.mkdtemp(prefix=".push-", dir=self.source))
        files = []
        with JobLock(self.source / export.LOCK_NAME):
            for name in latest_files(self.source):
                staged = self.folder / name
                try:
                    os.link(self.source / name, staged)
                except OSError:
                    shutil.copy2(self.source / name, staged)
                files.append(staged)
        return [_describe(path) for path in files]

    def __exit__(self, *_exc: object) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


def _describe(path: Path) -> LocalFile:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    info = path.stat()
    return LocalFile(path.name, path, info.st_size, int(info.st_mtime), digest.hexdigest())


def _record(ctx: JobContext, host: str, status: str, detail: str, manifest: dict, result: PushResult,
            now: float | None) -> None:
    remote.save_state(ctx.store.ops, ctx.host, KIND, host, status, detail,
                      {"files": manifest, **result.as_dict()}, now=now)


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out (remote.io_timeout_seconds)"
    return remote.why(exc)


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"
