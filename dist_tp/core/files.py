"""Atomic files and checkpoints: write to a temp file in the same folder, then rename.

A checkpoint is one plain dict of tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code. It carries a checksum of
its content (``checksum``: sha256 over every tensor's bytes, dtype and shape and every plain
value), verified on load, so a damaged file is an error, not a silently different model.
Files are created with the permissions the umask gives (like ``open``), not ``mkstemp``'s
0600. A write that fails (a full disk, a read-only folder) is one :class:`WriteError` naming
the file, and leaves no temp file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from dist_tp.config import ConfigError

TMP_SUFFIX = ".tmp"  # temp files are ".<name>.<random>.tmp" beside their target
TORCH_WRITE_FAILURES = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file


class WriteError(ConfigError):
    """A file could not be written (no space, no permission): one line naming it."""


def atomic_write(path: Path, write) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as exc:
        raise WriteError(f"{path}: cannot write: {exc.strerror or exc}") from None
    try:
        os.fchmod(fd, FILE_MODE)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise WriteError(f"{path}: cannot write: {exc.strerror or exc}") from None
        if isinstance(exc, RuntimeError) and any(m in str(exc) for m in TORCH_WRITE_FAILURES):
            # torch.save's own writer failed under it (a full disk, most often)
            raise WriteError(f"{path}: cannot write (is the disk full?): {_first(exc)}") from None
        raise


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Remove the temp files that writers killed mid-write left in ``folder`` (only files of
    :func:`atomic_write`'s pattern); returns them. Call it only where no other process is
    writing into ``folder``."""
    removed = []
    for tmp in Path(folder).glob(f".*{TMP_SUFFIX}"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _first(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def write_json(path: str | Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def content_hash(obj: Any) -> str:
    """sha256 of a checkpoint's content: tensors by dtype, shape and bytes, dicts by sorted
    key, lists in order, plain values by type and value. Independent of how it is stored."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for key in sorted(obj, key=repr):
            h.update(repr(key).encode())
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Write ``state`` (plus its ``checksum``) atomically."""
    sealed = {**state, "checksum": content_hash(state)}
    atomic_write(Path(path), lambda f: torch.save(sealed, f))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict on the CPU, its checksum verified (checkpoints written before
    checksums load as they are); a missing, unreadable or damaged file is an error naming it."""
    path = Path(path)
    if not path.is_file():
        hint = " (a run folder holds checkpoint.pt)" if path.suffix != ".pt" else ""
        raise ConfigError(f"{path}: no such checkpoint{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a file that is not a checkpoint
        reason = _first(exc)
        if "weights_only" in str(exc) or "Weights only" in str(exc):
            # never pass on torch's advice to load it unsafely
            reason = "it holds objects other than tensors and plain values"
        raise ConfigError(f"{path}: not a dist_tp checkpoint ({reason})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise ConfigError(f"{path}: not a dist_tp checkpoint (no config in it)")
    expected = state.pop("checksum", None)
    if expected is not None and content_hash(state) != expected:
        raise ConfigError(
            f"{path}: damaged: its content does not match its checksum; use an earlier copy "
            "or start the run afresh"
        )
    return state
