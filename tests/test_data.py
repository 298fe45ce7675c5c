"""Data layer: readers, the paper's protocol on real data, the parquet output and its stream."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import real_file

from dist_tp.data.errors import DataError
from dist_tp.data.prepare import prepare
from dist_tp.data.protocol import ProtocolOptions, apply_protocol, user_shards
from dist_tp.data.readers import read_interactions
from dist_tp.data.stream import UserStream, load_sequences, open_prepared, to_sequences

EXPECTED = {
    # name: (users, items, interactions) after the protocol, from ../shared/data/README.md
    "ml-100k": (943, 1349, 99287),
    "amazon-music": (2136, 6109, 48162),
    "amazon-games": (6484, 11841, 124382),
    "ml-1m-part": (2999, 3266, 486907),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_counts_after_protocol_match_the_reference(prepared, name):
    meta = open_prepared(prepared(name)).meta
    stats = meta["stats"]
    assert (stats["users"], stats["items"], stats["interactions"]) == EXPECTED[name]
    existing, new = stats["existing_users"], stats["new_users"]
    assert existing + new == stats["users"]
    assert new == round(0.2 * stats["users"])
    assert stats["existing_head"] == math.ceil(0.2 * existing)
    assert stats["new_head"] == math.ceil(0.2 * new)


@pytest.mark.parametrize("name", ["ml-100k", "amazon-music"])
def test_split_head_and_order_invariants(prepared, name):
    folder = prepared(name)
    table = pq.read_table(f"{folder}/users")
    users = table.column("user").to_numpy()
    assert sorted(users) == list(range(1, len(users) + 1))  # every user once, one role each
    roles = np.asarray(table.column("role").to_pylist())
    heads = table.column("is_head").to_numpy(zero_copy_only=False)
    lengths = np.array([len(x) for x in table.column("items").to_pylist()])
    assert lengths.min() >= 10
    for role in ("existing", "new"):
        group = roles == role
        head_len, tail_len = lengths[group & heads], lengths[group & ~heads]
        assert head_len.min() >= tail_len.max()  # head = the most active of the group
    for ts in table.column("timestamps").to_pylist()[:200]:
        assert ts == sorted(ts)
    items = np.concatenate(table.column("items").to_pylist())
    assert items.min() == 1 and items.max() == open_prepared(folder).num_items


def test_id_round_trip_reproduces_the_filtered_input(prepared):
    path, fmt = real_file("ml-100k")
    folder = prepared("ml-100k")
    item_map = pq.read_table(f"{folder}/items.parquet")
    original_item = dict(
        zip(item_map.column("item").to_pylist(), item_map.column("original_id").to_pylist())
    )
    got = set()
    table = pq.read_table(f"{folder}/users")
    for uid, items in zip(
        table.column("original_id").to_pylist(), table.column("items").to_pylist()
    ):
        got.update((int(uid), original_item[i]) for i in items)
    # An independent plain-Python pass over the raw file.
    rows = [tuple(map(int, line.split("\t")[:2])) for line in gzip.open(path, "rt")]
    item_n: dict[int, int] = {}
    for _, i in rows:
        item_n[i] = item_n.get(i, 0) + 1
    rows = [(u, i) for u, i in rows if item_n[i] >= 5]
    user_n: dict[int, int] = {}
    for u, _ in rows:
        user_n[u] = user_n.get(u, 0) + 1
    assert got == {(u, i) for u, i in rows if user_n[u] >= 10}


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _synthetic_lines(users: int = 12, items: int = 6, sep: str = "::") -> list[str]:
    # every user rates every item → nothing is filtered with thresholds (5, 5)
    return [
        sep.join(map(str, (u, i, 3, 1000 + 10 * i + u)))
        for u in range(1, users + 1)
        for i in range(1, items + 1)
    ]


def test_duplicates_keep_earliest_and_ties_keep_input_order(tmp_path):
    lines = ["1 10 5", "1 11 5", "1 10 3", "1 12 4", "2 10 1", "2 11 1"]
    raw = read_interactions(_write(tmp_path, "s.txt", "\n".join(lines)), "seq-txt")
    prep = apply_protocol(
        raw, ProtocolOptions(min_item_count=1, min_user_count=1, new_user_fraction=0)
    )
    seq = [prep.item_ids[i - 1] for i in prep.items[prep.offsets[0] : prep.offsets[1]]]
    # duplicate (1, 10) keeps t=3; ties at t=5 keep line order (10 dropped as later duplicate)
    assert seq == [10, 12, 11]
    assert list(prep.timestamps[: prep.offsets[1]]) == [3, 4, 5]


def test_seq_txt_without_timestamps_uses_line_order(tmp_path):
    raw = read_interactions(_write(tmp_path, "v.txt", "1 5\n1 3\n1 9\n"), "seq-txt")
    assert raw.ts is None
    prep = apply_protocol(
        raw, ProtocolOptions(min_item_count=1, min_user_count=1, new_user_fraction=0)
    )
    assert [prep.item_ids[i - 1] for i in prep.items] == [5, 3, 9]


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zip"])
def test_compressed_inputs_are_read_transparently(tmp_path, suffix):
    import bz2
    import lzma
    import zipfile

    data = ("\n".join(_synthetic_lines()) + "\n").encode()
    path = tmp_path / f"ratings.dat{suffix}"
    if suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("ratings.dat", data)
    else:
        path.write_bytes({".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix].compress(data))
    raw = read_interactions(str(path), "ml-1m")
    assert raw.raw_rows == 72 and raw.ts is not None


def test_other_formats(tmp_path):
    csv = _write(
        tmp_path, "r.csv", "\n".join(f"A{u},B{i},5,{100 + i}" for u in range(3) for i in range(4))
    )
    raw = read_interactions(csv, "amazon-csv")
    assert raw.user[0] == "A0" and raw.item[1] == "B1" and raw.ts[1] == 101
    js = "\n".join(
        json.dumps(
            {"reviewerID": f"U{u}", "asin": f"I{i}", "unixReviewTime": 7 + i, "overall": 5.0}
        )
        for u in range(2)
        for i in range(3)
    )
    raw = read_interactions(_write(tmp_path, "r.json", js), "amazon-json")
    assert list(raw.item[:3]) == ["I0", "I1", "I2"] and raw.ts[2] == 9
    hdr = _write(tmp_path, "h.csv", "uid,iid,when\n1,2,30\n1,3,40\n")
    raw = read_interactions(hdr, "csv", columns={"user": "uid", "item": "iid", "timestamp": "when"})
    assert list(raw.item) == [2, 3] and list(raw.ts) == [30, 40]
    import pyarrow as pa

    pq.write_table(pa.table({"u": ["x", "y"], "i": [5, 6]}), tmp_path / "t.parquet")
    raw = read_interactions(
        str(tmp_path / "t.parquet"), "parquet", columns={"user": "u", "item": "i"}
    )
    assert list(raw.user) == ["x", "y"] and raw.ts is None
    with pytest.raises(DataError, match="no column 'nope'"):
        read_interactions(
            str(tmp_path / "t.parquet"), "parquet", columns={"user": "nope", "item": "i"}
        )


BAD_INPUTS = [
    # (file content, format, expected line number, message fragment)
    ("1::2::3::4\n1\t2\t3\t4\n", "ml-1m", 2, "separated by '::'"),
    ("1::2::3::4\n1:2::3::4\n", "ml-1m", 2, "'::'"),
    ("1\t2\t3\t4\n1\t2\t3\n", "ml-100k", 2, "expected 4 fields"),
    ("1\t2\t3\t4\n1\tx\t3\t4\n", "ml-100k", 2, "item id 'x' is not an integer"),
    ("1\t2\t3\t4\n5\t2\t3\t4\nu\t2\t3\t4\n", "ml-100k", 3, "user id 'u' is not an integer"),
    ("1\t2\t3\t4\n1\t2\t3\t4.5\n", "ml-100k", 2, "timestamp '4.5' is not an integer"),
    ("1 2 3\n1 2 3 4\n", "seq-txt", 2, "expected 3 fields"),
    (
        '{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\n{"reviewerID": "a"}\n',
        "amazon-json",
        2,
        "missing key 'asin'",
    ),
    ('{"reviewerID": "a", "asin": "b", "unixReviewTime": 1}\nnot json\n', "amazon-json", 2, ""),
    ("a,b,5,1\na,b,5,x\n", "amazon-csv", 2, "timestamp 'x' is not an integer"),
]


@pytest.mark.parametrize("text,fmt,line,fragment", BAD_INPUTS)
def test_bad_lines_name_file_and_line_and_write_nothing(tmp_path, text, fmt, line, fragment):
    path = _write(tmp_path, "bad.txt", text)
    out = tmp_path / "out"
    with pytest.raises(DataError) as err:
        prepare(input_path=path, fmt=fmt, output=out)
    message = str(err.value)
    assert message.startswith(f"{path}:{line}: ") and fragment in message
    assert "\n" not in message
    assert not out.exists() and list(tmp_path.iterdir()) == [Path(path)]


def test_a_short_csv_row_names_its_line(tmp_path):
    path = _write(tmp_path, "t.csv", "uid,iid,when\n1,2,3\n1,2,4\n1,x\n2,3,5\n")
    with pytest.raises(DataError, match=r"t\.csv:4: expected 3 fields, got 2: '1,x'$"):
        read_interactions(path, "csv", columns={"user": "uid", "item": "iid", "timestamp": "when"})


def test_skip_bad_lines_reports_the_count(tmp_path):
    lines = _synthetic_lines(sep="\t")
    lines[3] = "oops"
    lines[7] = "1\t2\tx"
    meta = prepare(
        input_path=_write(tmp_path, "u.data", "\n".join(lines)),
        fmt="ml-100k",
        output=tmp_path / "out",
        on_bad_lines="skip",
        options=ProtocolOptions(min_user_count=4),
    )
    assert meta["source"]["skipped_rows"] == 2 and meta["source"]["raw_rows"] == 72
    assert meta["stats"]["interactions"] == 70


@pytest.mark.parametrize(
    "make,fragment",
    [
        (lambda d: str(d / "missing.dat"), "file not found"),
        (lambda d: str(d), "a folder with no data file in it"),
        (lambda d: _write(d, "empty.dat", ""), "empty"),
        (lambda d: _write(d, "few.dat", "1::2::3::4\n"), "nothing left after filtering"),
    ],
)
def test_unusable_inputs(tmp_path, make, fragment):
    src = tmp_path / "src"
    src.mkdir()
    path = make(src)
    with pytest.raises(DataError, match=fragment) as err:
        prepare(input_path=path, fmt="ml-1m", output=tmp_path / "out")
    assert str(err.value).startswith(path)
    assert not (tmp_path / "out").exists()


def test_cli_error_is_one_line_and_nonzero(tmp_path, capsys):
    from dist_tp.cli import main

    path = _write(tmp_path, "bad.dat", "1::2::3::4\n1::x::3::4\n")
    assert (
        main(["prepare", "--input", path, "--format", "ml-1m", "--output", str(tmp_path / "o")])
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err == f"error: {path}:2: item id 'x' is not an integer"


def test_rerun_is_a_noop_and_force_replaces(tmp_path):
    path = _write(tmp_path, "r.dat", "\n".join(_synthetic_lines()))
    out = tmp_path / "out"
    opts = ProtocolOptions(min_user_count=5)
    first = prepare(input_path=path, fmt="ml-1m", output=out, options=opts)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert prepare(input_path=path, fmt="ml-1m", output=out, options=opts) == first
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--force"):
        prepare(input_path=path, fmt="ml-1m", output=out, options=ProtocolOptions(min_user_count=6))
    prepare(
        input_path=path,
        fmt="ml-1m",
        output=out,
        options=ProtocolOptions(min_user_count=6),
        force=True,
    )
    assert json.loads((out / "meta.json").read_text())["options"]["min_user_count"] == 6


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    import dist_tp.data.prepare as prep_mod

    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full")
        return pq.write_table(*args, **kwargs)

    monkeypatch.setattr(prep_mod.pq, "write_table", failing)
    path = _write(tmp_path, "r.dat", "\n".join(_synthetic_lines()))
    with pytest.raises(DataError, match="cannot write the prepared folder: disk full"):
        prepare(
            input_path=path,
            fmt="ml-1m",
            output=tmp_path / "out",
            options=ProtocolOptions(min_user_count=5),
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.dat"]


def test_shards_use_an_explicit_hash():
    ids = np.arange(1, 1000)
    shards = user_shards(ids, 4)
    assert np.array_equal(shards, user_shards(ids.copy(), 4))
    assert set(shards) == {0, 1, 2, 3} and min(np.bincount(shards)) > 200
    # golden values: the hash must not change between versions or engines
    assert list(user_shards(np.array([1, 2, 3, 4, 5]), 16)) == [1, 14, 13, 10, 10]
    strings = user_shards(np.array(["A1", "B2", "C3"], dtype=object), 7)
    assert list(strings) == [5, 1, 4]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stream_partitions_are_disjoint_and_complete(prepared, world):
    folder = prepared("ml-100k", num_shards=3, row_group_size=100)
    seen = []
    for rank in range(world):
        stream = UserStream(folder, rank=rank, world_size=world, seed=5, batch_rows=64)
        stream.set_epoch(2)
        ranks_users = [u for b in stream for u in b.column("user").to_pylist()]
        seen.append(ranks_users)
    flat = [u for r in seen for u in r]
    assert sorted(flat) == list(range(1, 944))
    if world > 1:
        assert all(len(r) > 0 for r in seen)


def test_stream_is_deterministic_per_epoch_and_resumable(prepared):
    folder = prepared("ml-100k", num_shards=3, row_group_size=100)

    def users(stream):
        return [u for b in stream for u in b.column("user").to_pylist()]

    a = UserStream(folder, seed=1, batch_rows=50)
    full = users(a)
    assert full == users(UserStream(folder, seed=1, batch_rows=50))
    b = UserStream(folder, seed=1, batch_rows=50)
    b.set_epoch(1)
    assert users(b) != full  # another epoch, another order
    c = UserStream(folder, seed=1, batch_rows=50)
    it = iter(c)
    head = [u for _ in range(7) for u in next(it).column("user").to_pylist()]
    state = json.loads(json.dumps(c.state_dict()))
    d = UserStream(folder, seed=99, batch_rows=50)
    d.load_state_dict(state)
    assert head + users(d) == full


def test_stream_roles_and_csr(prepared):
    folder = prepared("ml-100k")
    existing = load_sequences(folder, roles=["existing"])
    new = load_sequences(folder, roles=["new"])
    assert len(existing) == 754 and len(new) == 189
    assert not existing.is_new.any() and new.is_new.all()
    assert existing.offsets[-1] == len(existing.items)
    assert existing.lengths.sum() + new.lengths.sum() == 99287
    batch = next(iter(UserStream(folder, batch_rows=10, shuffle=False)))
    seqs = to_sequences(batch)
    assert list(seqs.items[seqs.offsets[0] : seqs.offsets[1]]) == batch.column("items")[0].as_py()


def test_stream_over_an_fsspec_url(prepared):
    import fsspec

    folder = Path(prepared("ml-100k"))
    fs = fsspec.filesystem("memory")
    for path in folder.rglob("*"):
        if path.is_file():
            fs.pipe(f"/mem100k/{path.relative_to(folder)}", path.read_bytes())
    remote = load_sequences("memory://mem100k")
    local = load_sequences(str(folder))
    assert np.array_equal(remote.items, local.items)


def test_cli_stats_json(prepared, capsys):
    from dist_tp.cli import main

    assert main(["stats", prepared("ml-100k"), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["users"], stats["items"], stats["interactions"]) == EXPECTED["ml-100k"]
