"""A set of files replaced together, so readers never see half of one export and
half of the next: each file is written beside its target (``.NAME.tmp-<random>``),
fsynced, and all are renamed into place in a given order; should a rename fail,
the ones done are undone from hard links of the previous files."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Self

log = logging.getLogger(__name__)


class Staged:
    """One file being written next to its target as ``.NAME.tmp-<random>``."""

    def __init__(self, directory: Path, name: str):
        self.name = name
        self.target = directory / name
        self.path = directory / f".{name}.tmp-{secrets.token_hex(6)}"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.bytes = 0
        self.rows = 0
        self.replaced = False

    def write(self, text: str) -> None:
        data = text.encode("utf-8")
        self.sha.update(data)
        self.file.write(data)
        self.bytes += len(data)

    def finish(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        try:
            self.file.close()
        except OSError:
            pass
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the temporary export file %s: %s", self.path, exc)


class FileSet:
    """Files written first, then renamed into place together, in the order of
    ``names`` (so the last one named can list the others)."""

    def __init__(self, directory: Path, names: Sequence[str]):
        self.directory = directory
        self.names = tuple(names)
        self.files: dict[str, Staged] = {}

    def __enter__(self) -> Self:
        try:
            for name in self.names:
                self.files[name] = Staged(self.directory, name)
        except BaseException:
            self._discard()
            raise
        return self

    def __getitem__(self, name: str) -> Staged:
        return self.files[name]

    def commit(self) -> None:
        """fsync every file, then rename them all into place (board.json last: it
        names the CSVs it belongs with). Should a rename fail, the ones already
        done are undone from hard links of the previous files, so the previous
        set stays whole."""
        for staged in self.files.values():
            staged.finish()
        backups: dict[str, Path | None | object] = {}
        try:
            for name, staged in self.files.items():
                backups[name] = _link_previous(staged.target)
            for name in self.names:
                staged = self.files[name]
                os.replace(staged.path, staged.target)
                staged.replaced = True
        except BaseException:
            self._roll_back(backups)
            raise
        finally:
            for backup in backups.values():
                if isinstance(backup, Path):
                    with suppress(OSError):
                        backup.unlink(missing_ok=True)
        _fsync_directory(self.directory)

    def _roll_back(self, backups: dict[str, Path | None | object]) -> None:
        for name in reversed(self.names):
            staged = self.files[name]
            if not staged.replaced:
                continue
            backup = backups.get(name, _NO_BACKUP)
            try:
                if isinstance(backup, Path):
                    os.replace(backup, staged.target)
                elif backup is None:  # there was no previous file
                    staged.target.unlink(missing_ok=True)
                else:
                    log.error("cannot restore the previous %s (no hard link of it could be made); "
                              "it now holds the new export", staged.target)
                    continue
                staged.replaced = False
            except OSError as exc:
                log.error("could not restore the previous %s: %s", staged.target, exc)
        with suppress(OSError):
            _fsync_directory(self.directory)


    def _discard(self) -> None:
        for staged in self.files.values():
            if not staged.replaced:
                staged.discard()

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._discard()


_NO_BACKUP = object()  # the previous file exists but could not be linked


def _link_previous(target: Path) -> Path | None | object:
    """A hard link to ``target`` (the previous export's file) so that it can be put
    back; None when there is no previous file."""
    backup = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}")
    try:
        os.link(target, backup)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a file system without hard links
        log.warning("cannot link %s to %s (%s); a failed rename could not be undone", target, backup, exc)
        return _NO_BACKUP
    return backup


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temporaries(directory: Path, names: Sequence[str]) -> int:
    """Temporary files and links a killed export left behind (we hold the
    directory's lock, so none of them is in use)."""
    removed = 0
    for name in names:
        for path in [*directory.glob(f".{name}.tmp-*"), *directory.glob(f".{name}.old-*")]:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
    if removed:
        log.info("removed %d temporary file(s) of an interrupted export in %s", removed, directory)
    return removed
