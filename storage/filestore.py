"""Atomic, checksummed files whose names never come from the peer.

A file is written to a temporary name in its final directory, fsynced, renamed
into place, and the directory fsynced, so after a crash a name either holds the
whole file or does not exist. Names are random (``ab/cd/<uuid>.dcm``): a UID, a
patient name or any other peer-controlled string never reaches the file system.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TMP_SUFFIX = ".partial"


class StoreError(Exception):
    """The file could not be written; nothing was left behind."""


class StoreFull(StoreError):
    """Out of disk space (ENOSPC/EDQUOT) or below the configured free-space floor."""


@dataclass(frozen=True)
class StoredFile:
    relative_path: str
    size: int
    sha256: str


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """Files under ``root``; ``min_free_bytes`` refuses writes before the disk is full."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        # Parents of directories :meth:`write` made, until :meth:`sync_directories`
        # (which every write with ``sync_directory=True`` calls) has fsynced them.
        self._unsynced_parents: set[Path] = set()
        self._lock = threading.Lock()

    def path(self, relative_path: str) -> Path:
        resolved = (self.root / relative_path).resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise StoreError(f"path {relative_path!r} escapes the store")
        return resolved

    def _new_relative_path(self) -> str:
        name = uuid.uuid4().hex
        return f"{name[:2]}/{name[2:4]}/{name}.dcm"

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def _make_parents(self, directory: Path) -> None:
        # A directory made here is durable only once its parent is fsynced too.
        # Its parent is noted under the lock before anyone can see the directory
        # exist, so whoever writes into it next also syncs that parent.
        with self._lock:
            missing: list[Path] = []
            while not directory.is_dir():
                missing.append(directory)
                directory = directory.parent
            for new in reversed(missing):
                new.mkdir(exist_ok=True)
                self._unsynced_parents.add(new.parent)

    def write(
        self,
        chunks: Iterable[bytes],
        relative_path: str | None = None,
        *,
        sync_directory: bool = True,
    ) -> StoredFile:
        """Write ``chunks`` durably; replace ``relative_path`` if given, else pick a new name.

        With ``sync_directory=False`` the file's data is fsynced and renamed into
        place but its directory entry is not yet durable: the caller must pass the
        path to :meth:`sync_directories` before relying on it (a group commit fsyncs
        each directory once for many files).
        """
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise StoreFull(f"less than {self.min_free_bytes} bytes free under {self.root}")
        relative_path = relative_path or self._new_relative_path()
        final = self.path(relative_path)
        tmp = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")
        digest = hashlib.sha256()
        size = 0
        try:
            self._make_parents(final.parent)
            with open(tmp, "xb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
                    digest.update(chunk)
                    size += len(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(str(exc)) from exc
            raise StoreError(str(exc)) from exc
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if sync_directory:
            self.sync_directories([relative_path])
        return StoredFile(relative_path=relative_path, size=size, sha256=digest.hexdigest())

    def sync_directories(self, relative_paths: Iterable[str]) -> None:
        """Make the directory entries of files written with ``sync_directory=False`` durable.

        Raises
        ------
        StoreFull, StoreError
            As :meth:`write` would have.
        """
        directories = {self.path(relative_path).parent for relative_path in relative_paths}
        with self._lock:
            parents = set(self._unsynced_parents)
        try:
            # Deepest first, so each new directory is complete before its parent's
            # entry for it is made durable.
            for directory in sorted(directories | parents, key=lambda p: -len(p.parts)):
                _fsync_dir(directory)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(str(exc)) from exc
            raise StoreError(str(exc)) from exc
        # Dropped only once synced: a concurrent caller meanwhile syncs them again.
        with self._lock:
            self._unsynced_parents -= parents

    def read(self, relative_path: str) -> bytes:
        return self.path(relative_path).read_bytes()

    def verify(self, relative_path: str, sha256: str) -> bool:
        """True when the file exists and its checksum is the recorded one."""
        digest = hashlib.sha256()
        try:
            with open(self.path(relative_path), "rb") as fh:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(block)
        except OSError:
            return False
        return digest.hexdigest() == sha256

    def delete(self, relative_path: str) -> None:
        self.path(relative_path).unlink(missing_ok=True)

    def sweep_partials(self) -> int:
        """Remove temporary files a crash left behind; returns how many."""
        removed = 0
        for tmp in self.root.rglob(f"*{TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed += 1
        return removed
