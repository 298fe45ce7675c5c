"""The bad-input suite of ``dist-tp prepare`` (and of what reads its output): one table of
cases, format x defect -> exit status and where the one-line message points.

To add a case, add a ``Case`` to ``CASES``: the input's bytes (or a function writing the
input), the format and extra arguments, and what must come out: the exit status, the place
the message names (``{input}``, ``{output}`` are filled in; ``{input}:3`` is line 3) and a
fragment of the message. A case with exit status 0 may also ``check`` the prepared folder.
Each runs ``dist_tp.cli.main([...])`` in-process; what needs real processes (two concurrent
runs, the exit status of the process itself) is tested below the table.
"""

from __future__ import annotations

import errno
import fcntl
import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_tp.cli import main

REPO = Path(__file__).resolve().parents[1]
LOOSE = ("--min-item-count", "1", "--min-user-count", "1")


def grid(user, item, users: int = 3, items: int = 4, sep: str = ",", ts: bool = True) -> bytes:
    """Every user with every item (nothing is filtered with LOOSE thresholds)."""
    rows = []
    for u in range(users):
        for i in range(items):
            fields = [user(u), item(i)] + ([str(100 + 10 * i + u)] if ts else [])
            rows.append(sep.join(fields))
    return ("\n".join(rows) + "\n").encode()


def csv_grid(user, item, header: str = "uid,iid,ts", **kw) -> bytes:
    return header.encode() + b"\n" + grid(user, item, **kw)


def parquet(table: pa.Table) -> Callable[[Path], None]:
    return lambda path: pq.write_table(table, path)


def items_of(out: Path) -> list:
    return pq.read_table(out / "items.parquet").column("original_id").to_pylist()


@dataclass
class Case:
    id: str
    fmt: str
    content: bytes | Callable[[Path], None] | None
    """The input: bytes, a function writing it, or None for no input file at all."""
    status: int
    where: str = ""
    """What the message starts with after ``error: ``: ``{input}:2``, ``{output}``, ..."""
    fragment: str = ""
    args: tuple[str, ...] = ()
    name: str = "input.txt"
    setup: Callable | None = None
    """``setup(tmp_path, output, monkeypatch)`` before the run."""
    check: Callable | None = None
    """``check(output, tmp_path)`` after it (exit 0: the prepared folder)."""
    command: tuple[str, ...] = field(default=("prepare",))
    output: str = ""
    """``--output`` as given (default: ``out`` in the test's folder)."""
    data: str = ""
    """``train`` cases: a shared dataset to prepare and train on (``data.path``) instead of
    the input file."""


def _not_prepared_folder(tmp, out, mp):
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")


def _a_file(tmp, out, mp):
    out.write_text("a file")


def _read_only_parent(tmp, out, mp):
    """The output's folder cannot be written (as root, chmod does not stop us: fake it)."""
    parent = out.parent
    if os.geteuid() != 0:
        parent.chmod(0o555)
        return
    import dist_tp.data.prepare as prep

    real = prep.os.open

    def denied(path, *args, **kwargs):
        if str(path).startswith(str(parent) + os.sep) and str(path).endswith(".lock"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real(path, *args, **kwargs)

    mp.setattr(prep.os, "open", denied)


def _disk_full(tmp, out, mp):
    import dist_tp.data.prepare as prep

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    mp.setattr(prep.pq, "write_table", full)


def _locked(tmp, out, mp):
    """Another prepare holds the output's lock (the lock file is ``.<name>.lock``)."""
    fd = os.open(out.parent / f".{out.name}.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    mp.setattr(sys.modules[__name__], "_held", fd, raising=False)


def _nothing_beside(out, tmp):
    left = sorted(p.name for p in tmp.iterdir() if p.name not in ("input.txt", "input.parquet"))
    assert left in ([], ["out"]), left
    if (out).exists():
        assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"]


def _has_items(expected: list) -> Callable:
    def check(out, tmp):
        assert items_of(out) == expected

    return check


ML1M = b"".join(f"{u}::{i}::5::{100 + i}\n".encode() for u in range(3) for i in range(4))
BIG = 10**20  # a 21-digit id: beyond 64 bits
U63 = 2**63  # beyond int64, within uint64

CASES = [
    # -- existing behaviour: a bad line names the file and line ----------------------------
    Case("ml-1m/one-colon", "ml-1m", b"1::2::3::4\n1:2::3::4\n", 2, "{input}:2", "'::'"),
    Case("ml-1m/tab", "ml-1m", b"1::2::3::4\n1\t2\t3\t4\n", 2, "{input}:2", "separated by '::'"),
    Case("ml-100k/3-fields", "ml-100k", b"1\t2\t3\t4\n1\t2\t3\n", 2, "{input}:2", "4 fields"),
    Case("ml-100k/item-not-int", "ml-100k", b"1\t2\t3\t4\n1\tx\t3\t4\n", 2, "{input}:2", "'x'"),
    Case("ml-100k/ts-float", "ml-100k", b"1\t2\t3\t4\n1\t2\t3\t4.5\n", 2, "{input}:2", "'4.5'"),
    Case("seq-txt/4-fields", "seq-txt", b"1 2 3\n1 2 3 4\n", 2, "{input}:2", "3 fields"),
    Case(
        "amazon-json/missing-key",
        "amazon-json",
        b'{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a"}\n',
        2,
        "{input}:2",
        "missing key 'asin'",
    ),
    Case("amazon-json/not-json", "amazon-json", b"not json\n", 2, "{input}:1"),
    Case("amazon-csv/ts", "amazon-csv", b"a,b,5,1\na,b,5,x\n", 2, "{input}:2", "'x'"),
    Case(
        "csv/short-row",
        "csv",
        b"uid,iid,when\n1,2,3\n1,x\n",
        2,
        "{input}:3",
        "expected 3 fields",
        ("--columns", "user=uid,item=iid"),
    ),
    Case(
        "csv/empty-int-id",
        "csv",
        b"uid,iid\n1,2\n,3\n",
        2,
        "{input}:3",
        "empty user id",
        ("--columns", "user=uid,item=iid"),
    ),
    Case(
        "csv/no-column",
        "csv",
        b"uid,iid\n1,2\n",
        2,
        "{input}",
        "no column 'nope'",
        ("--columns", "user=nope,item=iid"),
    ),
    Case("ml-1m/empty", "ml-1m", b"", 2, "{input}", "empty"),
    Case("ml-1m/missing", "ml-1m", None, 2, "{input}", "file not found"),
    Case("ml-1m/too-few", "ml-1m", b"1::2::3::4\n", 2, "{input}", "nothing left"),
    Case(
        "parquet/not-parquet",
        "parquet",
        b"not parquet",
        2,
        "{input}",
        "not a readable parquet file",
        ("--columns", "user=u,item=i"),
        name="input.parquet",
    ),
    Case(
        "parquet/no-column",
        "parquet",
        parquet(pa.table({"u": [1], "i": [2]})),
        2,
        "{input}",
        "no column 'x'",
        ("--columns", "user=x,item=i"),
        name="input.parquet",
    ),
    Case(
        "parquet/null-id",
        "parquet",
        parquet(pa.table({"u": [1, None], "i": [2, 3]})),
        2,
        "{input}: row 2",
        "empty user id",
        ("--columns", "user=u,item=i"),
        name="input.parquet",
    ),
    # -- 1: ids are opaque keys, kept exactly (never through floats, never wrapped) ---------
    Case(
        "csv/21-digit-ids",
        "csv",
        csv_grid(str, lambda i: str(BIG + i), items=40),
        0,
        args=("--columns", "user=uid,item=iid,timestamp=ts", *LOOSE),
        check=_has_items([str(BIG + i) for i in range(40)]),
    ),
    Case(
        "csv/uint64-ids",
        "csv",
        csv_grid(str, lambda i: str(U63 + i), items=5),
        0,
        args=("--columns", "user=uid,item=iid,timestamp=ts", *LOOSE),
        check=_has_items([U63 + i for i in range(5)]),
    ),
    Case(
        "csv/ids-are-not-numbers",
        "csv",
        b"uid,iid\n1,5\n1,+5\n1,05\n",
        0,
        args=("--columns", "user=uid,item=iid", *LOOSE),
        check=_has_items(["+5", "05", "5"]),
    ),
    Case(
        "parquet/uint64-ids",
        "parquet",
        parquet(
            pa.table(
                {
                    "u": pa.array([u for u in range(3) for _ in range(4)]),
                    "i": pa.array([U63 + i for _ in range(3) for i in range(4)], pa.uint64()),
                }
            )
        ),
        0,
        args=("--columns", "user=u,item=i", *LOOSE),
        name="input.parquet",
        check=_has_items([U63 + i for i in range(4)]),
    ),
    Case(
        "seq-txt/21-digit-ids",
        "seq-txt",
        grid(str, lambda i: str(BIG - 2 + i), sep=" "),  # 99..98, 99..99, 10..00, 10..01
        0,
        args=LOOSE,
        check=_has_items([str(BIG - 2 + i) for i in range(4)]),  # integer order
    ),
    Case(
        "ml-100k/uint64-users",
        "ml-100k",
        b"".join(f"{U63 + u}\t{i}\t5\t{100 + i}\n".encode() for u in range(3) for i in range(4)),
        0,
        args=LOOSE,
        check=_has_items([0, 1, 2, 3]),
    ),
    # -- 5: text that is not UTF-8: one line naming it; --encoding reads it ------------------
    Case(
        "csv/latin-1",
        "csv",
        b"uid,iid\nu1,caf\xe9\n",
        2,
        "{input}:2",
        "--encoding",
        ("--columns", "user=uid,item=iid"),
    ),
    Case(
        "csv/latin-1-encoding",
        "csv",
        csv_grid(str, lambda i: f"caf\xe9{i}", header="uid,iid,ts").decode().encode("latin-1"),
        0,
        args=("--columns", "user=uid,item=iid,timestamp=ts", "--encoding", "latin-1", *LOOSE),
        check=_has_items([f"caf\xe9{i}" for i in range(4)]),
    ),
    Case("amazon-csv/latin-1", "amazon-csv", b"a,b,5,1\ncaf\xe9,b,5,2\n", 2, "{input}:2", "UTF-8"),
    Case(
        "amazon-json/latin-1",
        "amazon-json",
        b'{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n'
        b'{"reviewerID": "caf\xe9", "asin": "b", "unixReviewTime": 1}\n',
        2,
        "{input}:2",
        "--encoding",
    ),
    Case(
        "seq-txt/latin-1-encoding",
        "seq-txt",
        b"1 2\n",
        0,
        args=("--encoding", "latin-1", *LOOSE),
        check=_has_items([2]),
    ),
    Case(
        "ml-1m/unknown-encoding", "ml-1m", b"1::2::3::4\n", 2, "--encoding", "", ("--encoding", "x")
    ),
    Case(
        "parquet/encoding",
        "parquet",
        parquet(pa.table({"u": [1], "i": [2]})),
        2,
        "--encoding applies",
        "",
        ("--columns", "user=u,item=i", "--encoding", "latin-1"),
        name="input.parquet",
    ),
    # -- 3: --force replaces only a prepared folder ------------------------------------------
    Case(
        "output/not-prepared-folder",
        "ml-1m",
        ML1M,
        2,
        "{output}",
        "not a prepared dataset",
        ("--force", *LOOSE),
        setup=_not_prepared_folder,
        check=_nothing_beside,
    ),
    Case(
        "output/a-file",
        "ml-1m",
        ML1M,
        2,
        "{output}",
        "a file that is not a prepared dataset",
        ("--force", *LOOSE),
        setup=_a_file,
        check=lambda out, tmp: sorted(p.name for p in tmp.iterdir()) == ["input.txt", "out"],
    ),
    Case(
        "output/dot",
        "ml-1m",
        ML1M,
        2,
        ".",
        "a folder that is not a prepared dataset",
        ("--force", *LOOSE),
        setup=lambda tmp, out, mp: mp.chdir(tmp),
        check=lambda out, tmp: sorted(p.name for p in tmp.iterdir()) == ["input.txt"],
        output=".",
    ),
    Case(
        "output/empty-folder",
        "ml-1m",
        ML1M,
        0,
        args=LOOSE,
        setup=lambda tmp, out, mp: out.mkdir(),
        check=_has_items([0, 1, 2, 3]),
    ),
    # -- 5: the output cannot be written: one line, and found before the input is read ---------
    Case(
        "output/read-only",
        "ml-1m",
        None,  # no input at all: the output is checked first
        2,
        "{parent}",
        "cannot write here",
        setup=_read_only_parent,
    ),
    Case(
        "output/disk-full",
        "ml-1m",
        ML1M,
        2,
        "{output}",
        "[Errno 28] No space left on device",
        LOOSE,
        setup=_disk_full,
        check=lambda out, tmp: sorted(p.name for p in tmp.iterdir()) == ["input.txt"],
    ),
    # -- 7: a second prepare into one output is refused ----------------------------------------
    Case(
        "output/locked",
        "ml-1m",
        ML1M,
        2,
        "{output}",
        "another 'dist-tp prepare' (pid 4242)",
        LOOSE,
        setup=_locked,
    ),
    # -- 5: data.path (or stats) pointing at a file ------------------------------------------
    Case(
        "stats/a-file",
        "",
        b"1::2::3::4\n",
        2,
        "{input}",
        "a file, not a folder written by 'dist-tp prepare'",
        command=("stats",),
    ),
    # -- issue items 4, 5, 9 on the training side: the run folder and data.path --------------
    Case(
        "train/data-path-is-a-file",
        "",
        b"1::2::3::4\n",
        2,
        "{input}",
        "a file, not a folder written by 'dist-tp prepare'",
        command=("train",),
    ),
    Case(
        "train/folder-holds-a-run",
        "",
        None,
        2,
        "{output}",
        "already holds a run (metrics.json): continue it with --resume",
        setup=lambda tmp, out, mp: _folder_with(out, {"metrics.json": b"{}"}),
        command=("train",),
    ),
    Case(
        "train/resume-changes-the-model",
        "",
        None,
        2,
        "{output}/last.pt",
        "these keys differ: model.dim 16 -> 32",
        args=("model.dim=32", "--resume"),
        setup=lambda tmp, out, mp: _saved_run(tmp, out, checksum=True),
        command=("train",),
    ),
    Case(
        "train/resume-from-a-damaged-checkpoint",
        "",
        None,
        2,
        "{output}/last.pt",
        "damaged: its content does not match its checksum",
        args=("--resume",),
        setup=lambda tmp, out, mp: _saved_run(tmp, out, checksum=False),
        command=("train",),
    ),
    Case(
        "train/disk-full",
        "",
        None,
        2,
        "{output}/checkpoint.pt",
        "cannot write: No space left on device",
        setup=lambda tmp, out, mp: mp.setattr("dist_tp.core.files.torch.save", _no_space),
        check=lambda out, tmp: not list(out.glob(".*.tmp")),
        command=("train",),
        data="ml-100k",
    ),
]


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


TINY = REPO / "configs" / "tiny.yaml"


def _folder_with(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir()
    for name, data in files.items():
        (out / name).write_bytes(data)


def _saved_run(tmp: Path, out: Path, *, checksum: bool) -> None:
    """A ``last.pt`` of the tiny config on ``data.path`` = the case's input: a right
    checksum, or a wrong one (the content changed after it was written)."""
    import torch

    from dist_tp.config import load_config, to_dict
    from dist_tp.core.files import content_hash

    state = {"config": to_dict(load_config(TINY, [f"data.path={tmp / 'input.txt'}"]))}
    out.mkdir()
    torch.save({**state, "checksum": content_hash(state if checksum else {})}, out / "last.pt")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, request):
    src = tmp_path / case.name
    if isinstance(case.content, bytes):
        src.write_bytes(case.content)
    elif case.content is not None:
        case.content(src)
    out = tmp_path / "out"
    if case.setup is not None:
        case.setup(tmp_path, out, monkeypatch)
    if case.command == ("stats",):
        argv = ["stats", str(src)]
    elif case.command == ("train",):
        path = request.getfixturevalue("prepared")(case.data) if case.data else src
        data = ["track.enabled=false", "train.epochs=1", f"data.path={path}"]
        argv = ["train", str(TINY), *data, *case.args, "--output", str(out)]
    else:
        output = case.output or str(out)
        argv = ["prepare", "--input", str(src), "--format", case.fmt, "--output", output]
    try:
        status = main(argv if case.command == ("train",) else [*argv, *case.args])
    finally:
        if out.parent.stat().st_mode & 0o200 == 0:
            out.parent.chmod(0o755)
    err = capsys.readouterr().err
    assert status == case.status, err
    if case.status:
        where = case.where.format(input=src, output=out, parent=tmp_path)
        assert err.startswith(f"error: {where}"), err
        assert case.fragment in err and err.count("\n") == 1, err
    if case.check is not None:
        assert case.check(out, tmp_path) is not False


def test_a_killed_lock_holder_does_not_block_and_no_lock_file_stays(tmp_path):
    """The lock file of a killed run is taken over; a finished run leaves no lock file."""
    src = tmp_path / "input.txt"
    src.write_bytes(ML1M)
    out = tmp_path / "out"
    (tmp_path / ".out.lock").write_text("99999\n")  # left by a kill -9: nobody holds it
    argv = ["prepare", "--input", str(src), "--format", "ml-1m", "--output", str(out), *LOOSE]
    assert main(argv) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "out"]


SLOW_PREPARE = """
import os, sys, time
import dist_tp.data.prepare as p
real, go = p.write_items, sys.argv[3]  # go: a file to wait for before writing ("-": none)
def slow(*a, **k):
    print("WRITING", flush=True)
    deadline = time.monotonic() + 120
    while go != "-" and not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.05)
    return real(*a, **k)
p.write_items = slow
sys.argv = ["dist-tp", "prepare", "--input", sys.argv[1], "--format", "ml-1m",
            "--output", sys.argv[2], "--min-item-count", "1", "--min-user-count", "1"]
from dist_tp.cli import main
sys.exit(main())
"""


def test_two_concurrent_prepares_into_one_output(tmp_path):
    """Two processes: the second is refused with one line while the first writes; the first
    finishes with its folder complete."""
    src = tmp_path / "input.txt"
    src.write_bytes(ML1M)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    go = tmp_path / "go"  # the first writes once the second has been refused, however slow
    first = subprocess.Popen(
        [sys.executable, "-c", SLOW_PREPARE, str(src), str(out), str(go)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert first.stdout.readline().strip() == "WRITING"
        second = subprocess.run(
            [sys.executable, "-c", SLOW_PREPARE, str(src), str(out), "-"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )
    finally:
        go.touch()
        first_out, first_err = first.communicate(timeout=120)
    go.unlink()
    assert second.returncode == 2, second.stderr
    assert second.stderr.strip().splitlines() == [
        f"error: {out}: another 'dist-tp prepare' (pid {first.pid}) is writing it; "
        "wait for it to finish"
    ]
    assert first.returncode == 0, first_err
    assert json.loads((out / "meta.json").read_text())["stats"]["interactions"] == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.txt", "out"]


def test_parquet_error_exit_status_is_always_2(tmp_path):
    """The dist-tp process itself, N times: after pyarrow's threads ran, an error must still
    end with status 2 and its one line (not 134 from an aborted interpreter exit)."""
    src = tmp_path / "input.parquet"
    n = 200_000
    pq.write_table(pa.table({"u": [str(i % 997) for i in range(n)], "i": [None] * n}), src)
    runs = int(os.environ.get("DIST_TP_EXIT_RUNS", "8"))
    dist_tp = Path(sys.executable).with_name("dist-tp")
    command = [str(dist_tp)] if dist_tp.exists() else [sys.executable, "-m", "dist_tp"]
    argv = ["prepare", "--input", str(src), "--format", "parquet"]
    argv += ["--columns", "user=u,item=i", "--output", str(tmp_path / "out")]
    statuses = []
    for _ in range(runs):
        done = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=120)
        statuses.append(done.returncode)
        assert done.stderr == f"error: {src}: row 1: empty item id\n", done.stderr
    assert statuses == [2] * runs


def test_gzip_input_with_huge_ids_round_trips(tmp_path):
    """Exact ids survive compression and the whole pipeline: users too (as strings)."""
    src = tmp_path / "input.txt.gz"
    src.write_bytes(gzip.compress(grid(lambda u: str(BIG + u), lambda i: str(U63 + i), sep=" ")))
    out = tmp_path / "out"
    assert (
        main(["prepare", "--input", str(src), "--format", "seq-txt", "--output", str(out), *LOOSE])
        == 0
    )
    users = pq.read_table(out / "users").column("original_id").to_pylist()
    assert sorted(users, key=int) == [str(BIG + u) for u in range(3)]
    assert items_of(out) == [U63 + i for i in range(4)]
