"""Dataset registry: local lookup through DIST_TP_DATA, download into the cache, checksums."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import os
import signal
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import fsspec
import pytest
from helpers import real_file

from dist_tp.cli import main
from dist_tp.data import registry
from dist_tp.data.errors import DataError
from dist_tp.data.registry import DatasetSpec

LINES = "".join(f"{u}\t{i}\t3\t{100 + i}\n" for u in range(1, 13) for i in range(1, 13)).encode()
SHA = "sha256:" + hashlib.sha256(LINES).hexdigest()


def test_dist_tp_data_finds_compressed_local_copy(tmp_path, monkeypatch, capsys):
    path, _ = real_file("ml-100k")
    monkeypatch.setenv("DIST_TP_DATA", str(Path(path).parents[1]))
    monkeypatch.setenv("DIST_TP_CACHE", str(tmp_path / "cache"))
    assert registry.resolve_input("ml-100k") == (path, "ml-100k")
    assert main(["prepare", "ml-100k", "--output", str(tmp_path / "out")]) == 0
    assert "943" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()  # no download happened


def _spec(url: str, member: str | None = None, checksum: str | None = SHA) -> DatasetSpec:
    return DatasetSpec("tiny", "ml-100k", "u.data", url, member=member, checksum=checksum)


def test_download_from_fsspec_url_is_verified_and_cached(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/u.data", LINES)
    monkeypatch.setenv("DIST_TP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIST_TP_DATA", raising=False)
    monkeypatch.setitem(registry.DATASETS, "tiny", _spec("memory://remote/u.data"))
    path, fmt = registry.resolve_input("tiny")
    assert Path(path) == tmp_path / "cache" / "tiny" / "u.data" and fmt == "ml-100k"
    assert Path(path).read_bytes() == LINES
    fs.rm("/remote/u.data")  # second call is served from the cache
    assert registry.resolve_input("tiny")[0] == path


def test_checksum_mismatch_is_an_error_and_keeps_nothing(tmp_path, monkeypatch):
    fs = fsspec.filesystem("memory")
    fs.pipe("/remote/bad.data", LINES + b"1\t1\t1\t1\n")
    monkeypatch.setenv("DIST_TP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.DATASETS, "tiny", _spec("memory://remote/bad.data"))
    with pytest.raises(DataError, match="checksum mismatch"):
        registry.resolve_input("tiny")
    assert list((tmp_path / "cache" / "tiny").iterdir()) == []


@pytest.fixture
def http_root(tmp_path):
    root = tmp_path / "www"
    root.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(root), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_zip_over_http_then_prepare(tmp_path, monkeypatch, http_root):
    root, base = http_root
    with zipfile.ZipFile(root / "tiny.zip", "w") as z:
        z.writestr("tiny/u.data", LINES)
    monkeypatch.setenv("DIST_TP_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DIST_TP_DATA", raising=False)
    monkeypatch.setitem(registry.DATASETS, "tiny", _spec(f"{base}/tiny.zip", member="tiny/u.data"))
    out = tmp_path / "out"
    assert main(["prepare", "tiny", "--output", str(out), "--min-user-count", "5"]) == 0
    assert (out / "meta.json").is_file()
    assert sorted(p.name for p in (tmp_path / "cache" / "tiny").iterdir()) == ["u.data"]


def test_download_failure_is_a_clear_error(tmp_path, monkeypatch, http_root):
    _, base = http_root
    monkeypatch.setenv("DIST_TP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.DATASETS, "tiny", _spec(f"{base}/missing.zip"))
    with pytest.raises(DataError, match="cannot download"):
        registry.resolve_input("tiny")


def test_git_blob_checksum():
    assert (
        registry.content_checksum(b"hello\n", "git-blob")
        == "ce013625030ba8dba906f756967f9e9ca394464a"
    )


KILL_SCRIPT = """
import sys, time
import pyarrow.parquet as pq
from dist_tp.data import prepare as p
real = pq.write_table
def slow(*a, **k):
    real(*a, **k)
    print("WROTE", flush=True)
    time.sleep(60)
p.pq.write_table = slow
p.prepare(input_path=sys.argv[1], fmt="ml-100k", output=sys.argv[2])
"""


def test_prepare_killed_midway_leaves_no_output(tmp_path):
    src = tmp_path / "u.data.gz"
    src.write_bytes(gzip.compress(LINES * 1))
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(src), str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    try:
        assert proc.stdout.readline().strip() == "WROTE"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    assert not out.exists()
    # the next run cleans the killed run's staging folder and succeeds
    from dist_tp.data.prepare import prepare
    from dist_tp.data.protocol import ProtocolOptions

    prepare(
        input_path=str(src), fmt="ml-100k", output=out, options=ProtocolOptions(min_user_count=5)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "u.data.gz"]
