"""Atomic files and checkpoints: write to a temp file in the same folder, then rename.

A checkpoint is one plain dict of tensors and plain Python values, so it loads with
``torch.load(..., weights_only=True)``: nothing in it can run code.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: Path, write) -> None:
    """Call ``write(f)`` on a temp file beside ``path``, fsync, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode()
    atomic_write(Path(path), lambda f: f.write(data))


def write_text(path: str | Path, text: str) -> None:
    atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: str | Path, state: dict) -> None:
    atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict on the CPU; a missing or unreadable file is an error naming it."""
    from dist_tp.config import ConfigError

    path = Path(path)
    if not path.is_file():
        hint = " (a run folder holds checkpoint.pt)" if path.suffix != ".pt" else ""
        raise ConfigError(f"{path}: no such checkpoint{hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several kinds for a file that is not a checkpoint
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not a dist_tp checkpoint ({first})") from None
    if not isinstance(state, dict) or "config" not in state:
        raise ConfigError(f"{path}: not a dist_tp checkpoint (no config in it)")
    return state
