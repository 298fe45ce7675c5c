"""Exclusive lock files: one writer at a time for an output (``prepare``'s dataset folder, a
training's run folder).

:class:`LockFile` holds an ``fcntl.flock`` on a small file that holds the holder's pid, and
removes the file on release, so nothing is left in or beside the output. The kernel lets go of
the lock when the process ends, however it ends: a file left by a killed holder is taken over
by the next. A second holder is refused at once (:class:`Busy`, with the first one's pid).
Where ``fcntl`` is missing (Windows) nothing is locked.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None


class Busy(Exception):
    """Another process holds the lock; ``holder`` is its pid as its lock file says."""

    def __init__(self, holder: str) -> None:
        super().__init__(holder)
        self.holder = holder


class LockFile:
    """An exclusive lock on ``path``: :meth:`acquire` (raises :class:`Busy`, or ``OSError``
    where the file cannot be made), :meth:`release` (idempotent)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.fd: int | None = None

    @classmethod
    def beside(cls, output: Path) -> LockFile:
        """The lock of ``output``: ``.<name>.lock`` in its parent folder."""
        return cls(output.parent / f".{output.name}.lock")

    def acquire(self) -> LockFile:
        if fcntl is None:
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise Busy(holder) from None
            try:  # the file may have been removed by the holder we waited for: lock anew
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still holding the lock: see acquire
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None
