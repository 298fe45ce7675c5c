"""The synthetic log generator: exact counts, determinism whatever the workers and files, the
distributions asked for, the Yambda schema, atomic writing, and a learnable sequential signal."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dist_tp.data import synth
from dist_tp.data.errors import DataError
from dist_tp.data.prepare import prepare
from dist_tp.data.synth import SynthOptions, synthesize

SMALL = {"events": 200_000, "users": 2_000, "items": 5_000}


def read_log(folder: Path, sub: str = "") -> pa.Table:
    """All ``part-*.parquet`` of ``folder/sub``, in file order."""
    files = sorted((folder / sub).glob("part-*.parquet"))
    assert files
    return pa.concat_tables([pq.read_table(f) for f in files])


def by_user_time(table: pa.Table, user: str = "user") -> dict[str, np.ndarray]:
    cols = {name: table[name].to_numpy() for name in table.column_names}
    order = np.lexsort((cols["timestamp"], cols[user]))
    return {name: col[order] for name, col in cols.items()}


def assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synth") / "log"
    return out, synthesize(SynthOptions(**SMALL, workers=1), out)


def test_counts_ranges_and_time_order(small):
    out, summary = small
    assert summary["events"] == SMALL["events"] and summary["users"] == SMALL["users"]
    assert summary["files"] == ["part-00000.parquet"]
    assert json.loads((out / "synth.json").read_text()) == summary
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "synth.json"]
    table = read_log(out)
    assert table.schema == synth.GENERIC
    user, item, ts = (table[c].to_numpy() for c in ("user", "item", "timestamp"))
    assert len(user) == SMALL["events"]
    assert np.all(np.diff(user) >= 0)  # a file's rows are by user, then time
    counts = np.bincount(user, minlength=SMALL["users"])
    assert len(counts) == SMALL["users"] and counts.min() >= 1  # every user, at least once
    assert counts.max() > 20 * np.median(counts)  # a long tail of activity
    assert 0 <= item.min() and item.max() < SMALL["items"]
    same = user[1:] == user[:-1]
    assert np.all(np.diff(ts)[same] >= 1)  # strictly increasing per user
    first = ts[np.r_[True, ~same]]
    assert first.min() >= synth.EPOCH and first.max() < synth.EPOCH + synth.SPAN_SECONDS
    gaps = np.diff(ts)[same]
    assert 850 < gaps.mean() < 950  # 1 + Exp(900 s)


def test_same_seed_same_rows_whatever_the_workers_and_files(small, tmp_path):
    out, _ = small
    one = by_user_time(read_log(out))
    split = synthesize(SynthOptions(**SMALL, workers=2, rows_per_file=45_000), tmp_path / "split")
    assert split["files"] == [f"part-{i:05d}.parquet" for i in range(5)]
    tables = [pq.read_table(tmp_path / "split" / f) for f in split["files"]]
    assert [t.num_rows for t in tables] == [45_000] * 4 + [20_000]
    assert_same(one, by_user_time(pa.concat_tables(tables)))
    again = synthesize(SynthOptions(**SMALL, workers=1, rows_per_file=45_000), tmp_path / "again")
    for name in again["files"]:  # the same files, byte for byte, whatever the workers
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "split" / name).read_bytes()
    other = synthesize(SynthOptions(**SMALL, seed=1, workers=1), tmp_path / "seed1")
    assert other["events"] == SMALL["events"]
    assert not np.array_equal(read_log(tmp_path / "seed1")["item"].to_numpy(), one["item"])


def test_users_longer_than_a_chunk_are_cut_without_a_seam(tmp_path, monkeypatch):
    """Small chunks: users span several; still strictly increasing time, exact counts, and
    the same rows for any workers and file size (the workers see the patched size: fork)."""
    monkeypatch.setattr(synth, "CHUNK_EVENTS", 7_000)
    options = {"events": 60_000, "users": 50, "items": 2_000, "user_exponent": 0.8}
    a = synthesize(SynthOptions(**options, workers=1), tmp_path / "a")
    b = synthesize(SynthOptions(**options, workers=2, rows_per_file=11_111), tmp_path / "b")
    assert len(b["files"]) == 6
    one, two = by_user_time(read_log(tmp_path / "a")), by_user_time(read_log(tmp_path / "b"))
    assert_same(one, two)
    counts = np.bincount(one["user"])
    assert counts.max() > 3 * 7_000 and counts.min() >= 1 and counts.sum() == 60_000
    same = one["user"][1:] == one["user"][:-1]
    gaps = np.diff(one["timestamp"])[same]
    assert gaps.min() >= 1 and 800 < gaps.mean() < 1000
    assert a["events"] == b["events"] == 60_000


def test_fewer_events_than_users(tmp_path):
    summary = synthesize(
        SynthOptions(events=500, users=2_000, items=100, workers=1), tmp_path / "log"
    )
    user = read_log(tmp_path / "log")["user"].to_numpy()
    assert len(user) == 500 and user.max() < 2_000
    assert summary["users"] == len(np.unique(user)) < 500


@pytest.mark.parametrize("exponent", [0.8, 1.1, 1.5])
def test_item_popularity_follows_the_zipf_exponent(exponent):
    options = SynthOptions(**SMALL, item_exponent=exponent, workers=1)
    chunk = synth.generate_chunk(synth.build_world(options), 0)
    counts = np.sort(np.bincount(chunk["item"], minlength=SMALL["items"]))[::-1][:100]
    slope = np.polyfit(np.log(np.arange(1, 101)), np.log(counts), 1)[0]
    assert abs(-slope - exponent) <= 0.25, slope
    # popular ranks are not the small ids
    assert np.argmax(np.bincount(chunk["item"])) != 0


def test_alias_tables_give_each_cluster_its_popularity():
    world = synth.build_world(SynthOptions(events=10, users=1, items=20_000, clusters=50))
    cluster = np.repeat(np.arange(len(world.size)), world.size)
    assert np.all(cluster[world.alias] == cluster)  # an alias never leaves its cluster
    mass = world.prob.astype(np.float64)
    np.add.at(mass, world.alias, 1 - world.prob.astype(np.float64))
    mass /= world.size[cluster]
    _, item_of_slot, weight = synth.catalogue(world.options)
    np.testing.assert_array_equal(item_of_slot, world.item_of_slot)
    expected = weight / np.bincount(cluster, weights=weight)[cluster]
    np.testing.assert_allclose(mass, expected, rtol=1e-5, atol=1e-9)


def test_the_next_item_is_learnable_from_the_previous(small):
    """Most frequent next item after the previous one (first 80 % of each user's events)
    beats the 10 most popular items on the rest, by 2x at least."""
    out, _ = small
    log = by_user_time(read_log(out))
    user, item, n_items = log["user"], log["item"], SMALL["items"]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lens = np.diff(np.r_[starts, len(user)])
    position = np.arange(len(user)) - np.repeat(starts, lens)
    train = position < np.repeat(np.floor(0.8 * lens), lens)
    same = user[1:] == user[:-1]
    fit, test = same & train[1:], same & ~train[1:]
    pairs, counts = np.unique(item[:-1][fit] * n_items + item[1:][fit], return_counts=True)
    prev, nxt = pairs // n_items, pairs % n_items
    order = np.lexsort((-counts, prev))
    prev, nxt = prev[order], nxt[order]
    group = np.flatnonzero(np.r_[True, prev[1:] != prev[:-1]])
    rank = np.arange(len(prev)) - np.repeat(group, np.diff(np.r_[group, len(prev)]))
    top = np.full((n_items, 10), -1)
    top[prev[rank < 10], rank[rank < 10]] = nxt[rank < 10]
    before, after = item[:-1][test], item[1:][test]
    sequential = (top[before] == after[:, None]).any(axis=1).mean()
    popular = np.argsort(-np.bincount(item[train], minlength=n_items), kind="stable")[:10]
    popularity = np.isin(after, popular).mean()
    assert sequential >= 2 * popularity, (sequential, popularity)


def test_yambda_schema(tmp_path):
    options = SynthOptions(
        events=120_000, users=1_000, items=3_000, schema="yambda", workers=2, rows_per_file=70_000
    )
    summary = synthesize(options, tmp_path / "y")
    out = tmp_path / "y"
    assert summary["events"] == 120_000
    assert summary["files"] == [
        "listens/part-00000.parquet",
        "listens/part-00001.parquet",
        "likes/part-00000.parquet",
        "likes/part-00001.parquet",
    ]
    listens, likes = read_log(out, "listens"), read_log(out, "likes")
    assert listens.schema == pa.schema(
        [
            ("uid", pa.uint32()),
            ("timestamp", pa.uint32()),
            ("item_id", pa.uint32()),
            ("is_organic", pa.uint8()),
            ("played_ratio_pct", pa.uint16()),
            ("track_length_seconds", pa.uint32()),
        ]
    )
    assert likes.schema == pa.schema(
        [
            ("uid", pa.uint32()),
            ("timestamp", pa.uint32()),
            ("item_id", pa.uint32()),
            ("is_organic", pa.uint8()),
        ]
    )
    assert listens.num_rows == 120_000 and likes.num_rows == summary["likes"]
    assert 0.03 < likes.num_rows / listens.num_rows < 0.07
    played = listens["played_ratio_pct"].to_numpy()
    assert played.min() >= 1 and played.max() <= 100
    assert 0.68 < np.mean(played >= 50) < 0.82
    assert listens["timestamp"].to_numpy().max() < 2**32 - 1
    key = ["uid", "timestamp", "item_id", "is_organic"]
    joined = likes.join(listens.select(key), keys=key, join_type="inner")
    assert joined.num_rows == likes.num_rows  # likes are rows of the listens
    # same seed, same uid/item sequence as the generic schema (time origin aside)
    generic = synthesize(SynthOptions(**{**options.__dict__, "schema": "generic"}), tmp_path / "g")
    g = by_user_time(read_log(tmp_path / "g"))
    y = by_user_time(listens, user="uid")
    np.testing.assert_array_equal(g["item"], y["item_id"])
    np.testing.assert_array_equal(g["timestamp"] - synth.EPOCH, y["timestamp"])
    assert generic["events"] == 120_000


def test_readable_by_prepare(small, tmp_path):
    out, _ = small
    meta = prepare(
        input_path=str(out / "part-00000.parquet"),
        fmt="parquet",
        columns={"user": "user", "item": "item", "timestamp": "timestamp"},
        output=tmp_path / "prepared",
    )
    assert meta["source"]["raw_rows"] == SMALL["events"]
    # the protocol keeps a user's first listen of an item: repeats go
    assert 0.2 * SMALL["events"] < meta["stats"]["interactions"] < SMALL["events"]
    assert meta["stats"]["users"] > 0.5 * SMALL["users"]


@pytest.mark.parametrize(
    "change, option",
    [
        ({"events": 0}, "--events"),
        ({"users": -1}, "--users"),
        ({"items": 2.5}, "--items"),
        ({"seed": -3}, "--seed"),
        ({"schema": "csv"}, "--schema"),
        ({"item_exponent": -0.1}, "--item-exponent"),
        ({"user_exponent": 0}, "--user-exponent"),
        ({"clusters": 0}, "--clusters"),
        ({"clusters": 101}, "--clusters"),
        ({"p_next": 1.5}, "--p-next"),
        ({"p_next": 0.6, "p_stay": 0.6}, "--p-next + --p-stay"),
        ({"rows_per_file": 0}, "--rows-per-file"),
        ({"workers": 0}, "--workers"),
        ({"schema": "yambda", "users": 2**33}, "--users"),
        ({"schema": "yambda", "events": 10**8, "users": 1}, "--schema yambda"),
    ],
)
def test_bad_options_are_one_line_naming_the_option(tmp_path, change, option):
    options = SynthOptions(**{"events": 100, "users": 10, "items": 100, **change})
    with pytest.raises(DataError) as err:
        synthesize(options, tmp_path / "log")
    assert str(err.value).startswith(option) and "\n" not in str(err.value)
    assert not (tmp_path / "log").exists() and list(tmp_path.iterdir()) == []


def test_an_output_that_is_not_empty_is_refused(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("keep")
    (tmp_path / "file").write_text("keep")
    options = SynthOptions(events=100, users=10, items=50, workers=1)
    for name in ("full", "file"):
        with pytest.raises(DataError, match=f"^{tmp_path / name}: a"):
            synthesize(options, tmp_path / name)
    assert (tmp_path / "full" / "x.txt").read_text() == "keep"
    (tmp_path / "empty").mkdir()
    assert synthesize(options, tmp_path / "empty")["events"] == 100
    assert (tmp_path / "empty" / "part-00000.parquet").exists()


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt])
@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_write_leaves_no_output_and_no_staging(tmp_path, monkeypatch, error, workers):
    (tmp_path / ".log.staging-0dead0").mkdir()  # left by a killed run: removed at start
    calls = []

    def failing(writer, table):
        calls.append(1)
        if isinstance(error, OSError) or workers == 1:
            raise error
        raise OSError(5, "Input/output error")  # a worker cannot raise KeyboardInterrupt here

    monkeypatch.setattr(synth, "write_table", failing)
    options = SynthOptions(events=2_000, users=100, items=50, workers=workers, rows_per_file=500)
    expected = KeyboardInterrupt if error is KeyboardInterrupt and workers == 1 else DataError
    with pytest.raises(expected) as err:
        synthesize(options, tmp_path / "log")
    if expected is DataError:
        assert str(err.value).startswith(f"{tmp_path / 'log'}: cannot write the log: ")
    assert list(tmp_path.iterdir()) == []


def test_a_worker_that_dies_is_an_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "write_table", lambda writer, table: os._exit(9))
    options = SynthOptions(events=2_000, users=100, items=50, workers=2, rows_per_file=500)
    with pytest.raises(DataError, match="a worker process died .exit code 9"):
        synthesize(options, tmp_path / "log")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupt_while_workers_run_ends_them_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(synth, "write_table", lambda writer, table: time.sleep(60))

    def interrupt(*_):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 1.0)  # not inherited by the forked workers
    started = time.monotonic()
    options = SynthOptions(events=2_000, users=100, items=50, workers=2, rows_per_file=500)
    try:
        with pytest.raises(KeyboardInterrupt):
            synthesize(options, tmp_path / "log")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert time.monotonic() - started < 10
    assert list(tmp_path.iterdir()) == []
