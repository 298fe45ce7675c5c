"""Input files of ``prepare``: a file, a folder or a glob, local or any fsspec URL.

``list_inputs`` expands the input into its files, in a fixed (sorted) order: the order in which
their rows count as "input order" (the tie-break of equal timestamps). ``files_fingerprint`` is
the cheap identity of such an input: per file its path, size and modification time (or the
object store's ETag), hashed, so a 60 GB input is never read just to be recognised.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import fsspec

from dist_tp.data.errors import DataError

GLOB_CHARS = "*?["
DATA_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".txt", ".dat", ".data", ".json", ".jsonl")
COMPRESSED = (".gz", ".bz2", ".xz", ".zip", ".zst")


@dataclass(frozen=True)
class InputFile:
    url: str
    """What readers open: the path as given for a local file, else ``protocol://path``."""
    size: int
    stamp: str
    """Modification time or ETag: with the size, what the fingerprint covers."""


PARQUET_SUFFIXES = (".parquet", ".pq")


def _is_data_file(name: str, suffixes: tuple[str, ...] = DATA_SUFFIXES) -> bool:
    base = os.path.basename(name)
    if base.startswith((".", "_")):  # hidden files, _SUCCESS, _metadata
        return False
    for suffix in COMPRESSED:
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base.endswith(suffixes) or (suffixes is DATA_SUFFIXES and "." not in base)


def _stamp(info: dict) -> str:
    for key in ("ETag", "etag", "md5Hash", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            value = info[key]
            return str(value.isoformat() if hasattr(value, "isoformat") else value)
    return ""


def list_inputs(path: str, parquet: bool = False) -> list[InputFile]:
    """The files of ``path`` (a file, a folder searched recursively for data files, or a glob),
    sorted; a DataError names ``path`` when nothing matches. ``parquet``: a folder's data files
    are its ``.parquet``/``.pq`` files (not a ``synth.json`` or ``README`` beside them)."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        return _list(fs, root, path, PARQUET_SUFFIXES if parquet else DATA_SUFFIXES)
    except DataError:
        raise
    except (OSError, ValueError, ImportError) as exc:
        raise DataError(f"{path}: cannot list the input: {exc}") from exc


def _list(fs, root: str, path: str, suffixes: tuple[str, ...]) -> list[InputFile]:
    if _has_glob(path):
        names = [n for n in fs.glob(root) if not fs.isdir(n)]
        if not names:
            raise DataError(f"{path}: no file matches")
    elif fs.isdir(root):
        names = [n for n in fs.find(root) if _is_data_file(n, suffixes)]
        if not names:
            raise DataError(f"{path}: a folder with no data file in it")
    elif fs.exists(root):
        info = fs.info(root)  # a single file: named as the user wrote it
        return [InputFile(path, int(info.get("size") or 0), _stamp(info))]
    else:
        raise DataError(f"{path}: file not found")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    out = []
    for name in sorted(names):
        info = fs.info(name)
        url = name if protocol in ("file", "local") else fs.unstrip_protocol(name)
        out.append(InputFile(url, int(info.get("size") or 0), _stamp(info)))
    return out


def _has_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def files_fingerprint(files: list[InputFile]) -> str:
    """sha256 over each file's name, size and stamp: what identifies a large input cheaply."""
    rows = [[os.path.basename(f.url), f.size, f.stamp] for f in files]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def total_size(files: list[InputFile]) -> int:
    return sum(f.size for f in files)


def parse_size(text: str | int, what: str = "--memory-limit") -> int:
    """'2GB', '512MB', '4GiB', '1500000000' → bytes (GB = 10^9, GiB = 2^30)."""
    if isinstance(text, int):
        return text
    units = {
        "": 1,
        "b": 1,
        "kb": 10**3,
        "mb": 10**6,
        "gb": 10**9,
        "tb": 10**12,
        "kib": 2**10,
        "mib": 2**20,
        "gib": 2**30,
        "tib": 2**40,
    }
    raw = str(text).strip().lower().replace(" ", "")
    number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = raw[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or value <= 0:
        raise DataError(f"{what}: {text!r} is not a size such as 2GB, 512MB or 4GiB")
    return int(value * units[unit])
