"""Shared fixtures: where the real datasets live, and prepared folders made once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from helpers import real_file

REPO = Path(__file__).resolve().parents[1]


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
