"""One training per run folder at a time.

Two trainings writing one folder would interleave their checkpoints, and the second's start
removes the temp files the first is writing. The training that writes a folder (rank 0) holds
:class:`~dist_tp.core.locks.LockFile` ``.<name>.lock`` beside it until it ends (removed then;
a killed run's is taken over by the next), so the folder itself holds only the run's files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from dist_tp.config import ConfigError
from dist_tp.core.locks import Busy, LockFile


def hold_run_folder(out: str | Path, hint: str = "choose another --output") -> LockFile:
    """Lock run folder ``out`` for this process (its parent is created if missing), or raise
    :class:`ConfigError` naming the folder and the pid of the training that holds it (and
    ``hint``, the way out besides waiting or stopping it)."""
    out = Path(out)
    where = out.resolve()  # "." has a name once resolved
    lock = LockFile.beside(where)
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        return lock.acquire()
    except Busy as busy:
        raise ConfigError(
            f"{out} is in use by another training (pid {busy.holder}): wait for it to end, "
            f"stop it, or {hint}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write beside it: {exc.strerror or exc}") from None


@contextlib.contextmanager
def run_folder_held(out: str | Path, hint: str = "choose another --output") -> Iterator[None]:
    """:func:`hold_run_folder` for the length of a ``with`` block: the training that writes
    the folder, and what writes a finished run's files from outside it (``dist-tp finish``,
    ``dist-tp evaluate``, with their own ``hint``), so none writes while another does."""
    lock = hold_run_folder(out, hint)
    try:
        yield
    finally:
        lock.release()
