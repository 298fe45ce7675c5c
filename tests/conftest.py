"""Shared fixtures: where the real datasets live, and prepared folders made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("DIST_TP_SHARED_DATA", REPO.parent / "shared" / "data"))

REAL = {
    "ml-100k": ("ml-100k/u.data.gz", "ml-100k"),
    "amazon-music": ("amazon-music/Music.txt.gz", "seq-txt"),
    "amazon-games": ("amazon-games/Video.txt.gz", "seq-txt"),
    "ml-1m-part": ("ml-1m/partial/ratings.dat.gz", "ml-1m"),
}


def real_file(name: str) -> tuple[str, str]:
    """(path, format) of a shared dataset; skips (with the reason) when it is not there."""
    rel, fmt = REAL[name]
    path = SHARED_DATA / rel
    if not path.is_file():
        pytest.skip(f"shared dataset {path} not present")
    return str(path), fmt


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """Prepare a shared dataset once per test session: ``prepared("ml-100k") -> folder``."""
    from dist_tp.data.prepare import prepare

    cache: dict[str, str] = {}

    def get(name: str, **kwargs) -> str:
        key = f"{name}-{sorted(kwargs.items())}"
        if key not in cache:
            path, fmt = real_file(name)
            out = tmp_path_factory.mktemp("prepared") / name
            prepare(input_path=path, fmt=fmt, output=out, **kwargs)
            cache[key] = str(out)
        return cache[key]

    return get


@pytest.fixture(scope="session", autouse=True)
def _mlflow_store(tmp_path_factory):
    """Runs that track (``dist-tp train``) log into a store of the session's own, never into
    ``mlflow.db`` of the working folder; subprocesses inherit it."""
    old = os.environ.get("MLFLOW_TRACKING_URI")
    store = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}"
    yield
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old
