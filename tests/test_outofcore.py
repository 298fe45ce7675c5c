"""The out-of-core ``prepare`` engine: the same folder as the in-memory engine, in bounded
memory, with the same guarantees on bad input and interruption."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import REAL, assert_same_prepared, real_file, write_event_log

from dist_tp.cli import main
from dist_tp.data import outofcore
from dist_tp.data.errors import DataError
from dist_tp.data.prepare import prepare
from dist_tp.data.protocol import ProtocolOptions
from dist_tp.data.readers import YambdaOptions

LOOSE = ProtocolOptions(min_item_count=2, min_user_count=3, new_user_fraction=0.3)


@pytest.fixture
def small_buckets(monkeypatch):
    """Many buckets on small inputs: a user's rows and the merge cross bucket boundaries."""
    monkeypatch.setattr(outofcore, "MIN_ROWS_PER_BUCKET", 3_000)


def _both(tmp_path: Path, name: str, **kw) -> tuple[Path, Path]:
    a, b = tmp_path / f"{name}-memory", tmp_path / f"{name}-ooc"
    prepare(output=a, engine="memory", **kw)
    meta = prepare(output=b, engine="out-of-core", memory_limit="256MB", workers=2, **kw)
    assert meta["engine"] == "out-of-core"
    return a, b


@pytest.mark.parametrize("name", sorted(REAL))
def test_engines_agree_on_the_shared_datasets(tmp_path, small_buckets, name):
    path, fmt = real_file(name)
    a, b = _both(tmp_path, name, input_path=path, fmt=fmt, row_group_size=100, num_shards=3)
    assert_same_prepared(a, b)


def test_engines_agree_on_the_parquet_ml1m_with_text_ids(tmp_path, small_buckets):
    path = Path(real_file("ml-1m-part")[0]).parent / "ratings.parquet.gz"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    a, b = _both(
        tmp_path,
        "pq",
        input_path=str(path),
        fmt="parquet",
        columns={"user": "userID", "item": "movieID"},
    )
    assert_same_prepared(a, b)


@pytest.mark.parametrize(
    "variant",
    [{}, {"text_ids": True}, {"timestamps": False}],
    ids=["int-ids", "text-ids", "no-timestamps"],
)
def test_engines_agree_on_generated_logs(tmp_path, small_buckets, variant):
    """Duplicates, timestamp ties across files, a folder of files: input order decides."""
    write_event_log(tmp_path / "log", events=60_000, users=1_500, items=3_000, **variant)
    columns = {"user": "u", "item": "i"} | (
        {} if variant.get("timestamps") is False else {"timestamp": "t"}
    )
    a, b = _both(
        tmp_path,
        "gen",
        input_path=str(tmp_path / "log"),
        fmt="parquet",
        columns=columns,
        options=LOOSE,
        num_shards=5,
        row_group_size=64,
    )
    assert_same_prepared(a, b)
    meta = json.loads((b / "meta.json").read_text())
    assert meta["source"]["files"] == 3 and meta["source"]["raw_rows"] == 60_000


def test_a_glob_and_an_fsspec_url_give_the_same_folder(tmp_path, small_buckets):
    write_event_log(tmp_path / "log", events=20_000, users=500, items=800)
    cols = {"user": "u", "item": "i", "timestamp": "t"}
    a = tmp_path / "a"
    prepare(input_path=str(tmp_path / "log"), fmt="parquet", columns=cols, output=a, options=LOOSE)
    b = tmp_path / "b"
    url = f"file://{tmp_path}/log/events-*.parquet"
    prepare(
        input_path=url, fmt="parquet", columns=cols, output=b, options=LOOSE, engine="out-of-core"
    )
    assert_same_prepared(a, b)


def test_auto_engine_follows_the_input_size(tmp_path):
    """``auto``: out of core once the input's bytes x 16 exceed the memory limit; a small
    input prepared with ``auto`` stays in memory; an explicit engine is kept."""
    from dist_tp.data.prepare import choose_engine
    from dist_tp.data.sources import InputFile

    files = [InputFile("a", 60 * 10**6, ""), InputFile("b", 70 * 10**6, "")]  # 130 MB
    assert choose_engine("auto", files, 2 * 10**9) == "out-of-core"  # 2.08 GB > 2 GB
    assert choose_engine("auto", files[:1], 2 * 10**9) == "memory"  # 0.96 GB
    assert choose_engine("memory", files, 2 * 10**9) == "memory"
    assert choose_engine("out-of-core", files[:1], 2 * 10**9) == "out-of-core"
    write_event_log(tmp_path / "log", events=20_000, users=500, items=800, files=1)
    cols = {"user": "u", "item": "i", "timestamp": "t"}
    small = prepare(
        input_path=str(tmp_path / "log"),
        fmt="parquet",
        columns=cols,
        output=tmp_path / "a",
        options=LOOSE,
    )
    assert small["engine"] == "memory"


def test_rerun_is_a_noop_recognised_without_reading_the_input(tmp_path):
    """The fingerprint is each file's name, size and modification time: a re-run with the
    same files and options returns at once, whichever engine made the folder."""
    paths = write_event_log(tmp_path / "log", events=20_000, users=500, items=800)
    cols = {"user": "u", "item": "i", "timestamp": "t"}
    kw = dict(
        input_path=str(tmp_path / "log"),
        fmt="parquet",
        columns=cols,
        output=tmp_path / "o",
        options=LOOSE,
    )
    first = prepare(engine="out-of-core", **kw)
    assert prepare(engine="memory", **kw) == first
    stat = paths[1].stat()
    paths[1].write_bytes(b"x" * stat.st_size)  # not Parquet any more, same size and time
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert prepare(engine="out-of-core", **kw) == first
    os.utime(paths[1], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: read again
    with pytest.raises(DataError, match="events-001.parquet: not a readable parquet file"):
        prepare(engine="out-of-core", force=True, **kw)
    assert json.loads((tmp_path / "o" / "meta.json").read_text()) == first  # kept as it was


# --- bad input ------------------------------------------------------------------------------


def _cols():
    return {"user": "u", "item": "i", "timestamp": "t"}


def test_a_bad_row_deep_in_one_file_of_a_glob_is_named(tmp_path, small_buckets, capsys):
    write_event_log(tmp_path / "log", events=30_000, users=500, items=800, files=6)
    bad = tmp_path / "log" / "events-004.parquet"
    table = pq.read_table(bad)
    users = table.column("u").to_pylist()
    users[3_210] = None
    pq.write_table(table.set_column(0, "u", pa.array(users, pa.int64())), bad, row_group_size=1000)
    out = tmp_path / "out"
    argv = [
        "prepare",
        "--input",
        str(tmp_path / "log" / "*.parquet"),
        "--format",
        "parquet",
        "--columns",
        "user=u,item=i,timestamp=t",
        "--output",
        str(out),
        "--engine",
        "out-of-core",
    ]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {bad}: row 3211: empty user id\n"
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["log"]  # no staging, no spill left


def test_bad_lines_of_a_text_glob_are_named_or_skipped_and_counted(tmp_path, small_buckets):
    rows = [f"{u}::{i}::5::{1000 + u * 31 + i}" for u in range(1, 40) for i in range(1, 12)]
    (tmp_path / "a.dat").write_text("\n".join(rows[:200]) + "\n")
    (tmp_path / "b.dat").write_text("\n".join(rows[200:300] + ["7::oops"] + rows[300:]) + "\n")
    kw = dict(input_path=str(tmp_path / "*.dat"), fmt="ml-1m", options=LOOSE)
    with pytest.raises(DataError, match=r"b.dat:101: "):
        prepare(output=tmp_path / "o", engine="out-of-core", **kw)
    a, b = _both(tmp_path, "skip", on_bad_lines="skip", **kw)
    assert_same_prepared(a, b)
    source = json.loads((b / "meta.json").read_text())["source"]
    assert source["skipped_rows"] == 1 and source["raw_rows"] == len(rows) + 1


def test_a_glob_matching_nothing_and_files_of_different_schemas(tmp_path):
    with pytest.raises(DataError, match=r"nothing-\*\.parquet: no file matches"):
        prepare(
            input_path=str(tmp_path / "nothing-*.parquet"),
            fmt="parquet",
            columns=_cols(),
            output=tmp_path / "o",
            engine="out-of-core",
        )
    write_event_log(tmp_path / "log", events=3_000, users=100, items=100, files=2)
    pq.write_table(
        pa.table({"u": ["a"], "i": [1], "t": [1]}), tmp_path / "log" / "events-009.parquet"
    )
    with pytest.raises(
        DataError,
        match=r"events-009.parquet: its schema differs from .*events-000.parquet's: column 'u'",
    ):
        prepare(
            input_path=str(tmp_path / "log"),
            fmt="parquet",
            columns=_cols(),
            output=tmp_path / "o",
            engine="out-of-core",
        )
    assert not (tmp_path / "o").exists()


def test_an_unwritable_output_is_refused_before_reading(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    write_event_log(tmp_path / "log", events=3_000, users=100, items=100, files=1)
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(DataError, match="cannot write here"):
        prepare(
            input_path=str(tmp_path / "log"),
            fmt="parquet",
            columns=_cols(),
            output=ro / "o",
            engine="out-of-core",
        )


def test_a_full_disk_is_one_error_and_leaves_no_staging_or_spill(tmp_path, monkeypatch):
    import errno

    write_event_log(tmp_path / "log", events=20_000, users=500, items=800)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outofcore.pq, "write_table", full)  # workers=1: in this process
    with pytest.raises(DataError) as err:
        prepare(
            input_path=str(tmp_path / "log"),
            fmt="parquet",
            columns=_cols(),
            output=tmp_path / "out",
            options=LOOSE,
            engine="out-of-core",
            workers=1,
        )
    assert str(err.value) == (
        f"{tmp_path / 'out'}: cannot write the prepared folder or its spill: "
        "[Errno 28] No space left on device"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log"]


KILLABLE = """
import sys, time
from dist_tp.data import outofcore
real = outofcore._lists_bucket
def slow(task):
    print("LISTS", flush=True)
    time.sleep(60)
outofcore.run.__globals__["_lists_bucket"] = slow
outofcore.MIN_ROWS_PER_BUCKET = 3000
from dist_tp.data.prepare import prepare
from dist_tp.data.protocol import ProtocolOptions
prepare(input_path=sys.argv[1], fmt="parquet", columns={"user": "u", "item": "i", "timestamp": "t"},
        output=sys.argv[2], engine="out-of-core", workers=1,
        options=ProtocolOptions(min_item_count=2, min_user_count=3))
"""


def test_killed_mid_run_leaves_nothing_and_the_next_run_starts_clean(tmp_path):
    write_event_log(tmp_path / "log", events=20_000, users=500, items=800)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLABLE, str(tmp_path / "log"), str(out)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "LISTS"  # spill and staging exist now
    leftovers = sorted(p.name.split("-")[0] for p in tmp_path.iterdir() if p.name.startswith("."))
    assert leftovers == [".out.lock", ".out.spill", ".out.staging"]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    prepare(
        input_path=str(tmp_path / "log"),
        fmt="parquet",
        columns=_cols(),
        output=out,
        options=ProtocolOptions(min_item_count=2, min_user_count=3),
        engine="out-of-core",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log", "out"]


# --- bounded memory -------------------------------------------------------------------------

PEAK = """
import resource, sys
from dist_tp.data.prepare import prepare
prepare(input_path=sys.argv[1], fmt="parquet", columns={"user": "u", "item": "i", "timestamp": "t"},
        output=sys.argv[2], engine=sys.argv[3], memory_limit="256MB", workers=2)
# VmHWM: this process's own peak (ru_maxrss would carry over the launching process's peak
# through exec); the workers' peaks: RUSAGE_CHILDREN (forked from here, never exec'd).
own = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(max(own, workers) // 1024)
"""


@pytest.mark.slow
def test_out_of_core_memory_stays_flat_as_the_input_grows(tmp_path):
    """Peak RSS of the process tree (the parent and each worker), 0.5M then 2M events, a
    256MB budget: the in-memory engine grows with the input; the out-of-core one stays flat
    (its buckets are sized from the budget) and under the in-memory peak."""
    peaks = {}
    for events in (500_000, 2_000_000):
        log = tmp_path / f"log{events}"
        write_event_log(log, events=events, users=events // 50, items=events // 40, files=4)
        for engine in ("memory", "out-of-core"):
            run = subprocess.run(
                [sys.executable, "-c", PEAK, str(log), str(tmp_path / f"{engine}{events}"), engine],
                capture_output=True,
                text=True,
                timeout=600,
            )
            assert run.returncode == 0, run.stderr[-2000:]
            peaks[engine, events] = int(run.stdout.split()[-1])
    grew = {e: peaks[e, 2_000_000] - peaks[e, 500_000] for e in ("memory", "out-of-core")}
    assert grew["memory"] > 120, peaks  # ~100 bytes per event
    assert grew["out-of-core"] < grew["memory"] / 2, peaks
    assert peaks["out-of-core", 2_000_000] < peaks["memory", 2_000_000] - 60, peaks


# --- Yambda -------------------------------------------------------------------------------


def _yambda(folder: Path) -> None:
    """Yambda's flat schema: listens (with played_ratio_pct) and likes, one folder each."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 6_000
    uid = rng.integers(0, 150, n).astype(np.uint32)
    item = (rng.zipf(1.3, n) % 400).astype(np.uint32)
    ts = np.sort(rng.integers(0, 10**6, n)).astype(np.uint32)
    ratio = rng.integers(0, 101, n).astype(np.uint16)
    for name in ("listens", "likes"):
        (folder / name).mkdir(parents=True)
    listens = pa.table(
        {
            "uid": uid,
            "timestamp": ts,
            "item_id": item,
            "is_organic": rng.integers(0, 2, n).astype(np.uint8),
            "played_ratio_pct": ratio,
            "track_length_seconds": np.full(n, 200, np.uint32),
        }
    )
    pq.write_table(listens, folder / "listens" / "part-00000.parquet")
    likes = listens.select(["uid", "timestamp", "item_id", "is_organic"]).slice(0, 900)
    pq.write_table(likes, folder / "likes" / "part-00000.parquet")


def test_yambda_listens_over_a_played_ratio_and_likes(tmp_path, small_buckets):
    _yambda(tmp_path / "y")
    table = pq.read_table(tmp_path / "y" / "listens")
    played = (table.column("played_ratio_pct").to_numpy() >= 50).sum()
    opts = ProtocolOptions(min_item_count=1, min_user_count=1)
    kw = dict(input_path=str(tmp_path / "y"), fmt="yambda", options=opts)
    listens = prepare(output=tmp_path / "l", **kw)
    # duplicates go, so count distinct (uid, item) among the kept listens
    keep = table.filter(pa.compute.greater_equal(table.column("played_ratio_pct"), 50))
    pairs = {
        (u, i) for u, i in zip(keep.column("uid").to_pylist(), keep.column("item_id").to_pylist())
    }
    assert played < len(table)
    assert listens["stats"]["interactions"] == len(pairs)
    assert listens["options"]["yambda"] == {"events": ["listen"], "min_played_ratio": 50}
    a, b = _both(
        tmp_path, "both", yambda=YambdaOptions(events=("listen", "like"), min_played_ratio=0), **kw
    )
    assert_same_prepared(a, b)
    everything = json.loads((a / "meta.json").read_text())["stats"]["interactions"]
    all_pairs = set(zip(table.column("uid").to_pylist(), table.column("item_id").to_pylist()))
    assert everything == len(all_pairs)


def test_yambda_event_type_column_and_bad_event(tmp_path):
    rows = pa.table(
        {
            "uid": pa.array([1, 1, 1, 2, 2], pa.uint32()),
            "timestamp": pa.array([1, 2, 3, 1, 2], pa.uint32()),
            "item_id": pa.array([10, 11, 12, 10, 13], pa.uint32()),
            "is_organic": pa.array([1] * 5, pa.uint8()),
            "event_type": ["listen", "like", "dislike", "like", "listen"],
            "played_ratio_pct": pa.array([90, None, None, None, 10], pa.uint16()),
        }
    )
    pq.write_table(rows, tmp_path / "multi_event.parquet")
    opts = ProtocolOptions(min_item_count=1, min_user_count=1, new_user_fraction=0.0)
    meta = prepare(
        input_path=str(tmp_path / "multi_event.parquet"),
        fmt="yambda",
        output=tmp_path / "o",
        options=opts,
        yambda=YambdaOptions(events=("listen", "like")),
    )
    assert meta["stats"]["interactions"] == 3  # listen 90%, two likes; not the 10% listen
    with pytest.raises(DataError, match="--events: 'skip' is not a Yambda event"):
        YambdaOptions(events=("skip",))
    pq.write_table(rows.drop_columns(["event_type"]), tmp_path / "events.parquet")
    with pytest.raises(DataError, match="events.parquet: cannot tell its Yambda event type"):
        prepare(
            input_path=str(tmp_path / "events.parquet"),
            fmt="yambda",
            output=tmp_path / "p",
            options=opts,
        )


def test_movielens_25m_ratings_csv_alias(tmp_path):
    csv = tmp_path / "ratings.csv"
    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"{u},{m},4.0,{1000 + u * 10 + m}" for u in range(1, 6) for m in range(1, 8)]
    csv.write_text("\n".join(lines) + "\n")
    meta = prepare(
        input_path=str(csv),
        fmt="ml-25m",
        output=tmp_path / "o",
        options=ProtocolOptions(min_item_count=1, min_user_count=1),
    )
    assert meta["stats"]["interactions"] == 35


def test_a_remote_output_is_refused_with_what_to_do(tmp_path):
    with pytest.raises(DataError, match=r"s3://bucket/x: --output must be a local folder"):
        prepare(input_path="x", fmt="parquet", output="s3://bucket/x")
    assert not any(tmp_path.iterdir())


def test_memory_limit_is_checked(tmp_path):
    with pytest.raises(DataError, match="--memory-limit: 'lots' is not a size"):
        prepare(input_path="x", fmt="parquet", output=tmp_path / "o", memory_limit="lots")
    with pytest.raises(DataError, match="give at least 256MB"):
        prepare(input_path="x", fmt="parquet", output=tmp_path / "o", memory_limit="10MB")


def test_the_bucket_plan_fits_each_worker_in_its_share(tmp_path):
    """Buckets sized so that the processes' own footprint plus a worker's bucket per worker
    plus the parent's share (its per-user and per-item state) stay within the budget, at
    every input size."""
    assert outofcore.plan(10**6, 2 * 10**9, tmp_path, workers=2).buckets == 2
    for rows in (10**6, 10**8, 10**9, 5 * 10**9):
        plan = outofcore.plan(rows, 2 * 10**9, tmp_path, workers=2)
        bucket = rows / plan.buckets * outofcore.BYTES_PER_ROW
        assert 4 * outofcore.PROCESS_BYTES + 3 * bucket <= 2 * 10**9 * 1.01
        assert plan.buckets % 2 == 0  # both workers busy to the last round


@pytest.mark.parametrize("schema", ["generic", "yambda"])
def test_synth_on_the_command_line_then_prepare_with_both_engines(
    tmp_path, small_buckets, capsys, schema
):
    """`dist-tp synth` writes a valid `prepare` input: generic Parquet with its columns, or
    Yambda's layout read with `--format yambda`; both engines give the same folder."""
    log = tmp_path / "log"
    argv = ["synth", "--events", "60K", "--users", "1K", "--items", "2K", "--seed", "3"]
    assert main([*argv, "--schema", schema, "--output", str(log)]) == 0
    assert "60,000 events" in capsys.readouterr().out
    if schema == "generic":
        kw = dict(fmt="parquet", columns={"user": "user", "item": "item", "timestamp": "timestamp"})
    else:
        kw = dict(fmt="yambda", yambda=YambdaOptions(events=("listen", "like")))
    a, b = _both(tmp_path, schema, input_path=str(log), options=LOOSE, **kw)
    assert_same_prepared(a, b)
    assert json.loads((a / "meta.json").read_text())["stats"]["users"] > 500
    with pytest.raises(SystemExit) as bad:  # argparse: one usage line, status 2
        main(["synth", "--events", "lots", "--users", "1", "--items", "1", "--output", "x"])
    assert bad.value.code == 2 and "'lots' is not a count" in capsys.readouterr().err


def test_item_counts_summed_across_buckets_whatever_the_ids():
    """The parent's running item counts: compact integer ids in a dense array, then (an id
    far beyond it) folded by hash aggregation, the totals the same either way."""

    def table(ids, counts):
        return pa.table({"item": pa.array(ids, pa.int64()), "count": pa.array(counts, pa.int64())})

    counts = outofcore._Counts()
    counts.add(table([3, 5, 9], [1, 2, 3]))
    counts.add(table([5, 7], [10, 1]))
    items, totals = counts.result()
    assert items.tolist() == [3, 5, 7, 9] and totals.tolist() == [1, 12, 1, 3]
    counts.add(table([10**15, 3], [4, 1]))  # too sparse for a dense array: folded from here
    assert counts.dense is None
    items, totals = counts.result()
    assert items.tolist() == [3, 5, 7, 9, 10**15] and totals.tolist() == [2, 12, 1, 3, 4]
    text = outofcore._Counts()
    text.add(pa.table({"item": ["b", "a"], "count": pa.array([1, 2], pa.int64())}))
    text.add(pa.table({"item": ["a"], "count": pa.array([5], pa.int64())}))
    items, totals = text.result()
    assert items.tolist() == ["a", "b"] and totals.tolist() == [7, 1]
