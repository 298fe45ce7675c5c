"""Known datasets: where the official file lives, its checksum, and how to read it.

``resolve_input(name)`` finds a dataset's raw file without network first — ``DIST_TP_DATA``
(``$DIST_TP_DATA/<name>/<file>``, compressed or not), then the download cache — and only then
downloads it into the cache (``DIST_TP_CACHE``, default ``~/.cache/dist_tp``), verifying the
checksum of the file's content before it is used.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import urllib.request
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

import fsspec

from dist_tp.data.errors import DataError
from dist_tp.data.readers import read_bytes

log = logging.getLogger(__name__)
COMPRESSED_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zip")


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: str
    file: str
    """The raw file's name (under ``$DIST_TP_DATA/<name>/`` and in the cache)."""
    url: str
    member: str | None = None
    """Path of ``file`` inside the downloaded zip archive, if the URL is one."""
    checksum: str | None = None
    """``sha256:<hex>`` or ``git-blob:<hex>`` of the uncompressed file content."""


DATASETS: dict[str, DatasetSpec] = {
    "ml-100k": DatasetSpec(
        "ml-100k",
        "ml-100k",
        "u.data",
        "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        member="ml-100k/u.data",
        checksum="sha256:06416e597f82b7342361e41163890c81036900f418ad91315590814211dca490",
    ),
    "ml-1m": DatasetSpec(
        "ml-1m",
        "ml-1m",
        "ratings.dat",
        "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        member="ml-1m/ratings.dat",
        checksum="git-blob:77a7c4b150f588c23bb9e1f068aa996c0b413695",
    ),
    "movietweetings": DatasetSpec(
        "movietweetings",
        "movietweetings",
        "ratings.dat",
        # The 'latest' snapshot grows over time, so no checksum can be pinned for it.
        "https://raw.githubusercontent.com/sidooms/MovieTweetings/master/latest/ratings.dat",
    ),
    "amazon-music": DatasetSpec(
        "amazon-music",
        "seq-txt",
        "Music.txt",
        "https://raw.githubusercontent.com/rlqja1107/MELT/"
        "dd7542f652695097d624a3e131796908485f4004/dataset/Music.txt",
        checksum="sha256:ff4e7c170eb6030b61586402e2e31923fddbff4761f1c33cc7b66d44f95d9322",
    ),
    "amazon-games": DatasetSpec(
        "amazon-games",
        "seq-txt",
        "Video.txt",
        "https://raw.githubusercontent.com/kang205/SASRec/"
        "e3738967fddab206d6eeb4fda433e7a7034dd8b1/data/Video.txt",
        checksum="sha256:b7376fe24430743f411dc7f567285657b2adb3f74361cc7ba0aee94f3024b651",
    ),
}


def get_spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    return DATASETS[name]


def content_checksum(data: bytes, kind: str) -> str:
    if kind == "sha256":
        return hashlib.sha256(data).hexdigest()
    if kind == "git-blob":
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
    raise ValueError(f"unknown checksum kind {kind!r}")


def verify(path: str, checksum: str | None) -> None:
    """Raise DataError when the (decompressed) content of ``path`` does not match."""
    if checksum is None:
        log.warning("%s: no checksum is pinned for this dataset; using it unverified", path)
        return
    kind, expected = checksum.split(":", 1)
    actual = content_checksum(read_bytes(path), kind)
    if actual != expected:
        raise DataError(f"{path}: {kind} checksum mismatch (expected {expected}, got {actual})")


def cache_dir() -> Path:
    return Path(os.environ.get("DIST_TP_CACHE", Path.home() / ".cache" / "dist_tp"))


def find_local(spec: DatasetSpec) -> str | None:
    """``$DIST_TP_DATA/<name>/<file>[.gz|.bz2|.xz|.zip]`` if such a file exists."""
    root = os.environ.get("DIST_TP_DATA")
    if not root:
        return None
    for suffix in COMPRESSED_SUFFIXES:
        candidate = Path(root) / spec.name / f"{spec.file}{suffix}"
        if candidate.is_file():
            return str(candidate)
    return None


def _fetch(url: str, dest: Path) -> None:
    """Copy ``url`` (http(s) or any fsspec URL) to ``dest`` through a temp file + rename."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        if url.startswith(("http://", "https://")):
            with urllib.request.urlopen(url, timeout=60) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            with fsspec.open(url, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        os.replace(tmp, dest)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, ValueError)):
            raise DataError(f"cannot download {url}: {exc}") from exc
        raise


def download(spec: DatasetSpec) -> str:
    """Download ``spec`` into the cache (once) and return the verified raw file's path."""
    folder = cache_dir() / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / spec.file
    if target.is_file():
        verify(str(target), spec.checksum)
        return str(target)
    log.info("downloading %s from %s", spec.name, spec.url)
    fetched = folder / Path(spec.url.split("?")[0]).name
    _fetch(spec.url, fetched)
    if spec.member is not None:
        try:
            with zipfile.ZipFile(fetched) as archive, archive.open(spec.member) as src:
                tmp = target.with_name(f".{target.name}.part")
                with open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as exc:
            raise DataError(f"{fetched}: no {spec.member} in the archive: {exc}") from exc
        fetched.unlink()
    else:
        tmp = fetched
    try:
        verify(str(tmp), spec.checksum)
    except DataError:
        Path(tmp).unlink(missing_ok=True)
        raise
    os.replace(tmp, target)
    return str(target)


def resolve_input(name: str) -> tuple[str, str]:
    """(path, format) of dataset ``name``: ``DIST_TP_DATA`` first, then cache or download."""
    spec = get_spec(name)
    local = find_local(spec)
    if local is not None:
        verify(local, spec.checksum)
        return local, spec.format
    return download(spec), spec.format
