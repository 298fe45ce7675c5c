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
    return torch.load(Path(path), map_location="cpu", weights_only=True)
