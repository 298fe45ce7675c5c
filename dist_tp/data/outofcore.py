"""The out-of-core ``prepare`` engine: the protocol of ``protocol.py`` on logs of any size, in
memory bounded by a budget, on every core.

One shuffle by user, then everything is per bucket of users (a user's events all land in one
bucket, so a bucket holds whole users and the in-memory protocol's per-user steps apply to it
unchanged):

1. *scatter*: the input files are streamed in batches (Parquet row batches; the text formats
   file by file) by a pool of worker processes; each row goes to bucket ``hash(user) mod B`` as
   (user, item, timestamp), into one spill file per (bucket, input file).
2. *dedup*, per bucket: its spill files read in input-file order give its rows in input
   order (the tie-break of equal timestamps); the duplicate (user, item) pairs keep their
   earliest row, rows are sorted by (user, timestamp, input order) and written back; the item
   counts go to the parent.
3. the parent keeps the items with enough interactions.
4. *count*, per bucket: the users with enough interactions on kept items, and the items
   they touch.
5. the parent numbers items and users 1..N, 1..U in ascending original id, splits new users,
   marks head users and assigns user shards, exactly as ``apply_protocol`` does.
6. *lists*, per bucket: each user's item and timestamp lists, one file per (shard, bucket).
7. *merge*, per shard: the shard's rows in ascending user, read back by user range.

The buckets are sized from the memory budget, so the working set is bounded whatever the input
size; the global state is O(#users + #items). The output equals the in-memory engine's
(``tests/test_outofcore.py``): same ids, lists, splits, head flags, shards and row groups.
"""

from __future__ import annotations

import glob
import logging
import math
import multiprocessing
import os
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError
from dist_tp.data.layout import USER_SCHEMA, user_table
from dist_tp.data.protocol import (
    ProtocolOptions,
    dense_codes,
    first_of_duplicates,
    head_users,
    split_new_users,
    splitmix64,
    summary_stats,
    time_order,
    user_shards,
)
from dist_tp.data.readers import (
    PARQUET_FORMATS,
    YambdaOptions,
    parquet_batches,
    read_interactions,
)

log = logging.getLogger(__name__)
MIN_ROWS_PER_BUCKET = 100_000
BYTES_PER_ROW = 160
"""Working bytes per event of a bucket being processed (measured peak, with headroom)."""
PROCESS_BYTES = 160 * 10**6
"""What a Python process with numpy and pyarrow holds before any data (measured ~150 MB)."""
SPILL_COMPRESSION = "zstd"


@dataclass(frozen=True)
class Plan:
    buckets: int
    workers: int
    batch_rows: int
    spill: Path


@dataclass
class OutOfCoreResult:
    item_ids: np.ndarray
    item_counts: np.ndarray
    user_ids: np.ndarray
    lengths: np.ndarray
    is_new: np.ndarray
    is_head: np.ndarray
    head_threshold: dict
    shards: list[dict]
    raw_rows: int
    skipped_rows: int
    has_timestamps: bool

    def stats(self) -> dict:
        return summary_stats(
            num_items=len(self.item_ids),
            lengths=self.lengths,
            is_new=self.is_new,
            is_head=self.is_head,
            head_threshold=self.head_threshold,
        )


def plan(rows: int, memory_limit: int, spill: Path, workers: int | None = None) -> Plan:
    """Buckets so that each worker's bucket fits its share of ``memory_limit``."""
    workers = max(1, min(workers or os.cpu_count() or 1, 16))
    # the parent, the forkserver and the workers each hold PROCESS_BYTES; the rest is split
    # into a share per worker and one for the parent's O(users + items) state
    free = max(memory_limit - (workers + 2) * PROCESS_BYTES, memory_limit // 4)
    share = free // (workers + 1)
    rows_per_bucket = max(MIN_ROWS_PER_BUCKET, share // BYTES_PER_ROW)
    buckets = max(workers, math.ceil(rows / rows_per_bucket))
    buckets = math.ceil(buckets / workers) * workers  # every worker busy to the last round
    batch_rows = int(min(1 << 20, max(16_384, share // (4 * BYTES_PER_ROW))))
    return Plan(buckets, workers, batch_rows, spill)


# --- worker side --------------------------------------------------------------------------


def _system_pool() -> None:
    """Arrow buffers from the C allocator, which gives freed memory back: mimalloc and
    jemalloc keep it for reuse, and kept ~200 MB per worker process above the budget."""
    if pa.default_memory_pool().backend_name != "system":
        pa.set_memory_pool(pa.system_memory_pool())


def _bucket_of(ids: np.ndarray, buckets: int) -> np.ndarray:
    """Bucket of each user id: splitmix64 of integer ids, of a 64-bit hash of text ids."""
    if ids.dtype.kind in "iu":
        keys = ids.astype(np.int64, copy=False).view(np.uint64)
        return (splitmix64(keys) % np.uint64(buckets)).astype(np.int64)
    encoded = pc.dictionary_encode(pa.array(ids, type=pa.string()))
    uniq = encoded.dictionary.to_pylist()
    keys = np.fromiter((_hash_text(u) for u in uniq), dtype=np.uint64, count=len(uniq))
    per_unique = (splitmix64(keys) % np.uint64(buckets)).astype(np.int64)
    return per_unique[encoded.indices.to_numpy()]


def _hash_text(text: str) -> int:
    data = text.encode()
    return zlib.crc32(data) | (zlib.adler32(data) << 32)


def _id_arrow(ids: np.ndarray) -> pa.Array:
    if ids.dtype == object:
        return pa.array(ids, type=pa.string())
    if ids.dtype == np.uint64:
        raise DataError(
            "ids at or beyond 2**63: the out-of-core engine keeps int64 ids; use --engine memory"
        )
    return pa.array(ids.astype(np.int64, copy=False))


def _scatter_file(task: tuple) -> tuple[int, int, int, bool | None]:
    """Stream one input file into its per-bucket spill files; returns (file index, rows read,
    rows skipped, whether it has timestamps). The parent counts a Parquet file's rows from
    its footer instead (a Yambda batch holds only the kept events)."""
    _system_pool()
    index, url, fmt, columns, yambda, on_bad_lines, encoding, offset, plan_ = task
    writers: dict[int, ipc.RecordBatchStreamWriter] = {}
    sinks = []
    rows = skipped = 0
    has_ts: bool | None = None
    try:
        for lines, raw in _file_batches(
            url, fmt, columns, yambda, on_bad_lines, encoding, plan_.batch_rows
        ):
            has_ts = raw.ts is not None
            rows, skipped = rows + raw.raw_rows, skipped + raw.skipped_rows
            ts = raw.ts if raw.ts is not None else lines + offset
            user, item = raw.user, raw.item
            # A repeated (user, item) pair that is not the earliest within its batch cannot be
            # the earliest of the log: dropped here, it is neither spilled nor sorted later.
            keep = first_of_duplicates(
                _codes(user)[1], _codes(item)[1], ts, np.arange(len(ts), dtype=np.int64)
            )
            if keep is not None:
                user, item, ts = user[keep], item[keep], ts[keep]
            bucket = _bucket_of(user, plan_.buckets)
            if plan_.buckets <= 1 << 16:
                bucket = bucket.astype(np.uint16)  # numpy's stable sort: a radix sort
            order = np.argsort(bucket, kind="stable")
            bounds = np.searchsorted(bucket[order], np.arange(plan_.buckets + 1))
            table = pa.table(
                {
                    "user": _id_arrow(user),
                    "item": _id_arrow(item),
                    "ts": pa.array(ts.astype(np.int64, copy=False)),
                }
            ).take(pa.array(order))
            for b in np.flatnonzero(np.diff(bounds)):
                part = table.slice(bounds[b], bounds[b + 1] - bounds[b])
                if b not in writers:
                    path = plan_.spill / "scatter" / f"b{b:05d}-f{index:07d}.arrow"
                    sink = pa.OSFile(str(path), "wb")
                    sinks.append(sink)
                    writers[b] = ipc.new_stream(
                        sink,
                        part.schema,
                        options=ipc.IpcWriteOptions(compression=SPILL_COMPRESSION),
                    )
                writers[b].write_table(part)
    finally:
        for w in writers.values():
            w.close()
        for s in sinks:
            s.close()
    return index, rows, skipped, has_ts


def _file_batches(url, fmt, columns, yambda, on_bad_lines, encoding, batch_rows):
    """(row numbers in the file, Interactions) per batch: Parquet streamed, the text formats
    read whole."""
    if fmt in PARQUET_FORMATS:
        yield from parquet_batches(url, fmt, columns, yambda, batch_rows)
        return
    raw = read_interactions(
        url, fmt, columns=columns, on_bad_lines=on_bad_lines, encoding=encoding, yambda=yambda
    )
    yield np.arange(len(raw.user), dtype=np.int64), raw


def _read_bucket(paths: list[str]) -> pa.Table:
    tables = []
    for path in paths:
        with pa.OSFile(path, "rb") as f:
            tables.append(ipc.open_stream(f).read_all())
    return pa.concat_tables(tables)


def _ids(col: pa.ChunkedArray) -> np.ndarray:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return np.asarray(col.to_pylist(), dtype=object)
    return col.to_numpy()


def _dedup_bucket(task: tuple) -> tuple[pa.Table, int]:
    """Keep each (user, item) pair's earliest row, sort by (user, timestamp, line); write the
    bucket back; return the item counts (original item id, count) and the rows kept."""
    _system_pool()
    bucket, plan_ = task
    paths = sorted(glob.glob(str(plan_.spill / "scatter" / f"b{bucket:05d}-f*.arrow")))
    out = plan_.spill / "dedup" / f"b{bucket:05d}.arrow"
    if not paths:
        return _no_counts(), 0
    table = _read_bucket(paths)  # file order, then row order: input order
    user, item = _ids(table.column("user")), _ids(table.column("item"))
    ts = table.column("ts").to_numpy()
    _, ucode = _codes(user)
    items, icode = _codes(item)
    local = np.arange(len(ts), dtype=np.int64)
    keep = first_of_duplicates(ucode, icode, ts, local)
    if keep is not None:
        table = table.filter(pa.array(keep))
        ucode, icode, ts, local = ucode[keep], icode[keep], ts[keep], local[keep]
    order = time_order(ucode, ts, local)
    table = table.take(pa.array(order))
    _write_ipc(out, table)
    for path in paths:
        os.unlink(path)
    return _counts_table(items, icode), len(order)


def _write_ipc(path: Path, table: pa.Table) -> None:
    with pa.OSFile(str(path), "wb") as sink:
        with ipc.new_stream(
            sink, table.schema, options=ipc.IpcWriteOptions(compression=SPILL_COMPRESSION)
        ) as w:
            w.write_table(table, max_chunksize=1 << 20)


def _share(plan_: Plan, **arrays: np.ndarray) -> None:
    """Hand arrays to the workers through the spill folder (memory-mapped where numeric)."""
    for name, array in arrays.items():
        np.save(plan_.spill / f"{name}.npy", array, allow_pickle=array.dtype == object)


def _shared(plan_: Plan, name: str) -> np.ndarray:
    path = plan_.spill / f"{name}.npy"
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # text ids: an object array, loaded whole
        return np.load(path, allow_pickle=True)


def _load_dedup(bucket: int, plan_: Plan) -> pa.Table | None:
    path = plan_.spill / "dedup" / f"b{bucket:05d}.arrow"
    return _read_bucket([str(path)]) if path.exists() else None


def _direct(lo: int, hi: int, n: int) -> bool:
    """Whether integer ids in [lo, hi] can index a table directly (non-negative, and a range
    not much wider than the ``n`` ids or 16M)."""
    return lo >= 0 and hi - lo < max(4 * n, 1 << 24)


def _codes(ids: np.ndarray) -> tuple[np.ndarray | int, np.ndarray]:
    """Order-preserving integer codes of ``ids``: ``(min, ids - min)`` for compact
    non-negative integer ids (no hashing, no sort), else ``dense_codes``'s ``(uniques, codes)``.
    Either orders and groups rows exactly as ``dense_codes`` does."""
    if ids.dtype.kind in "iu" and len(ids):
        lo, hi = int(ids.min()), int(ids.max())
        if _direct(lo, hi, len(ids)):
            return lo, ids.astype(np.int64, copy=False) - lo
    return dense_codes(ids)


def _no_counts() -> pa.Table:
    return pa.table({"item": pa.array([], pa.int64()), "count": pa.array([], pa.int64())})


def _counts_table(key: np.ndarray | int, codes: np.ndarray) -> pa.Table:
    """(original id, count) of ids coded by ``_codes`` (``key``: its first result)."""
    counts = np.bincount(codes)
    present = np.flatnonzero(counts)
    original = present + key if isinstance(key, int) else key[present]
    return pa.table({"item": _id_arrow(original), "count": counts[present]})


def _member(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Whether each value is in ``sorted_set``, and its position there: a direct table for
    compact integer ids, else a binary search."""
    if not len(sorted_set):
        return np.zeros(len(values), dtype=bool), np.zeros(len(values), dtype=np.int64)
    if sorted_set.dtype.kind in "iu" and values.dtype.kind in "iu":
        lo, hi = int(sorted_set[0]), int(sorted_set[-1])
        if _direct(lo, hi, len(sorted_set)):
            table = np.full(hi - lo + 2, -1, dtype=np.int64)  # the last slot: out of range
            table[np.asarray(sorted_set) - lo] = np.arange(len(sorted_set))
            offset = values.astype(np.int64, copy=False) - lo
            offset[(offset < 0) | (offset > hi - lo)] = hi - lo + 1
            pos = table[offset]
            return pos >= 0, np.maximum(pos, 0)
    pos = np.searchsorted(sorted_set, values)
    pos = np.minimum(pos, len(sorted_set) - 1)
    return sorted_set[pos] == values, pos


def _kept_rows(table: pa.Table, kept_items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which rows are on kept items, and those rows' user ids (ascending: rows are sorted
    by user)."""
    item = _ids(table.column("item"))
    ok, _ = _member(item, kept_items)
    user = _ids(table.column("user"))[ok]
    return ok, user


def _count_bucket(task: tuple) -> tuple[np.ndarray, np.ndarray, pa.Table]:
    """The bucket's users with >= min_user_count interactions on kept items (their ids and
    lengths, ascending) and the item counts of those users' interactions."""
    _system_pool()
    bucket, plan_, min_user_count = task
    kept_items = _shared(plan_, "kept_items")
    table = _load_dedup(bucket, plan_)
    empty = _no_counts()
    if table is None:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64), empty
    ok, user = _kept_rows(table, kept_items)
    if not len(user):
        return user, np.array([], dtype=np.int64), empty
    # rows are sorted by user: runs of equal ids
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    lengths = np.diff(np.r_[starts, len(user)])
    good = lengths >= min_user_count
    rows = np.repeat(good, lengths)
    item = _ids(table.column("item"))[ok][rows]
    users = user[starts]
    if not len(item):
        return users[good], lengths[good], empty
    items, icode = _codes(item)
    return users[good], lengths[good], _counts_table(items, icode)


def _lists_bucket(task: tuple) -> None:
    """Each kept user's item and timestamp lists, one Parquet file per (shard, bucket)."""
    _system_pool()
    bucket, plan_ = task
    kept_items, final_items = _shared(plan_, "kept_items"), _shared(plan_, "final_items")
    user_ids, user_shard = _shared(plan_, "user_ids"), _shared(plan_, "shard_of")
    is_new, is_head = _shared(plan_, "is_new"), _shared(plan_, "is_head")
    table = _load_dedup(bucket, plan_)
    if table is None:
        return
    ok, user = _kept_rows(table, kept_items)
    member, upos = _member(user, user_ids)
    rows = np.flatnonzero(ok)[member]
    if not len(rows):
        return
    uidx = upos[member]  # 0-based user row, ascending within the bucket
    _, ipos = _member(_ids(table.column("item"))[rows], final_items)
    ts = table.column("ts").to_numpy()[rows]
    starts = np.flatnonzero(np.r_[True, uidx[1:] != uidx[:-1]])
    users = uidx[starts]
    offsets = np.r_[starts, len(uidx)]
    shards = user_shard[users]
    for shard in np.unique(shards):
        sel = np.flatnonzero(shards == shard)
        u = users[sel]
        part = user_table(
            u,
            user_ids[u],
            is_new[u],
            is_head[u],
            ipos + 1,
            ts,
            offsets[sel],
            offsets[sel + 1] - offsets[sel],
        )
        path = plan_.spill / "lists" / f"s{int(shard):05d}-b{bucket:05d}.parquet"
        pq.write_table(part, path, row_group_size=256, compression="lz4")


def _merge_shard(task: tuple) -> dict:
    """The shard's rows in ascending user, written as ``users/part-<shard>.parquet`` with
    ``row_group_size`` users per row group, read back by ranges of users."""
    _system_pool()
    shard, plan_, users, lengths, out, row_group_size, budget_rows = task
    paths = sorted(glob.glob(str(plan_.spill / "lists" / f"s{shard:05d}-b*.parquet")))
    files = [pq.ParquetFile(p) for p in paths]
    name = f"part-{shard:05d}.parquet"
    # ranges of whole row groups of users, each within the event budget
    groups = np.arange(0, len(users), row_group_size)
    group_events = np.add.reduceat(lengths, groups) if len(users) else np.array([])
    with pq.ParquetWriter(out / "users" / name, USER_SCHEMA, compression="zstd") as writer:
        start = 0
        while start < len(groups):
            stop, events = start, 0
            while stop < len(groups) and (
                stop == start or events + group_events[stop] <= budget_rows
            ):
                events += group_events[stop]
                stop += 1
            lo = int(users[groups[start]]) + 1  # users are 0-based rows; the column is 1-based
            hi = int(users[groups[stop] - 1]) + 1 if stop < len(groups) else None
            parts = [p for p in (_read_range(f, lo, hi) for f in files) if p.num_rows]
            table = pa.concat_tables(parts) if parts else USER_SCHEMA.empty_table()
            table = table.take(pc.sort_indices(table.column("user")))
            writer.write_table(table, row_group_size=row_group_size)
            start = stop
    return {"file": f"users/{name}", "users": len(users), "interactions": int(lengths.sum())}


def _read_range(f: pq.ParquetFile, lo: int, hi: int | None) -> pa.Table:
    """Rows of ``f`` (ascending user) with ``lo <= user`` and ``user <= hi`` (no upper bound
    when ``hi`` is None), reading only the row groups whose statistics overlap."""
    chosen = []
    for g in range(f.num_row_groups):
        st = f.metadata.row_group(g).column(0).statistics
        if st.max < lo or (hi is not None and st.min > hi):
            continue
        chosen.append(g)
    if not chosen:
        return f.schema_arrow.empty_table()
    table = f.read_row_groups(chosen)
    user = table.column("user")
    mask = pc.greater_equal(user, lo)
    if hi is not None:
        mask = pc.and_(mask, pc.less_equal(user, hi))
    return table.filter(mask)


# --- parent side --------------------------------------------------------------------------


class _Counts:
    """Per-item counts summed over the buckets' (item, count) tables as they arrive, so the
    parent holds O(#items), never one table per bucket at once: compact non-negative integer
    ids add into one dense array; other ids are folded with a hash aggregation."""

    def __init__(self) -> None:
        self.total: pa.Table | None = None
        self.pending: list[pa.Table] = []
        self.rows = 0
        self.dense = np.zeros(0, dtype=np.int64)  # count of id i at [i], while ids allow

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        ids = _ids(table.column("item"))
        if self.dense is not None and ids.dtype.kind in "iu":
            lo, hi = int(ids.min()), int(ids.max())
            if _direct(0, hi, max(len(self.dense), len(ids))) and lo >= 0:
                if hi >= len(self.dense):
                    grown = np.zeros(max(hi + 1, 2 * len(self.dense)), dtype=np.int64)
                    grown[: len(self.dense)] = self.dense
                    self.dense = grown
                self.dense[ids] += table.column("count").to_numpy()  # ids unique per table
                return
        if self.dense is not None and self.dense.any():  # ids outgrew the dense array
            present = np.flatnonzero(self.dense)
            self.pending.append(
                pa.table({"item": _id_arrow(present), "count": self.dense[present]})
            )
            self.rows += len(present)
        self.dense = None
        self.pending.append(table)
        self.rows += table.num_rows
        if self.rows > max(1 << 22, 2 * (self.total.num_rows if self.total else 0)):
            self._fold()

    def _fold(self) -> None:
        if not self.pending and self.total is not None:
            return
        tables = ([self.total] if self.total is not None else []) + self.pending
        if not tables:
            return
        if len({t.schema.field("item").type for t in tables}) > 1:
            tables = [t.set_column(0, "item", t.column("item").cast(pa.string())) for t in tables]
        summed = pa.concat_tables(tables).group_by("item").aggregate([("count", "sum")])
        self.total = pa.table({"item": summed.column("item"), "count": summed.column("count_sum")})
        self.pending, self.rows = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(items ascending as ``dense_codes`` orders them, their counts)."""
        if self.dense is not None:
            present = np.flatnonzero(self.dense)
            return present.astype(np.int64), self.dense[present]
        self._fold()
        if self.total is None or not self.total.num_rows:
            return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
        items, counts = _ids(self.total.column("item")), self.total.column("count").to_numpy()
        uniq, codes = dense_codes(items)
        order = np.argsort(codes, kind="stable")
        return uniq, counts[order]


def _pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes started from a fresh server process (forkserver; spawn where there is
    none): never forked from this process's threads (pyarrow's pools), and the caller's
    ``__main__`` is not imported again. A worker that dies breaks the pool (an error) instead
    of hanging it."""
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    if ctx.get_start_method() == "forkserver":
        ctx.set_forkserver_preload([__name__])
    return ProcessPoolExecutor(workers, mp_context=ctx)


def _imap(pool: ProcessPoolExecutor | None, fn, tasks: list) -> Iterator:
    if pool is None:
        yield from map(fn, tasks)
        return
    try:
        yield from pool.map(fn, tasks)
    except BrokenProcessPool as exc:
        raise DataError(f"a worker process of the out-of-core engine died: {exc}") from None


def run(
    *,
    files: list[str],
    file_rows: list[int] | None,
    fmt: str,
    columns: dict[str, str] | None,
    yambda: YambdaOptions | None,
    on_bad_lines: str,
    encoding: str,
    options: ProtocolOptions,
    num_shards: int,
    row_group_size: int,
    out: Path,
    plan_: Plan,
    source: str,
) -> OutOfCoreResult:
    """Run the seven steps (see the module's doc) into the staging folder ``out``."""
    _system_pool()
    for sub in ("scatter", "dedup", "lists"):
        (plan_.spill / sub).mkdir(parents=True, exist_ok=True)
    offsets = np.r_[0, np.cumsum(file_rows)] if file_rows is not None else None
    pool = _pool(plan_.workers) if plan_.workers > 1 else None
    clock = _Clock()
    try:
        # 1. scatter. Text formats run one file after another: a file's rows numbered from the
        # kept rows of the files before it (their timestamps when the input has none).
        raw_rows = skipped = 0
        has_ts = set()
        scatter = []
        base = 0
        for i, url in enumerate(files):
            offset = int(offsets[i]) if offsets is not None else base
            task = (i, url, fmt, columns, yambda, on_bad_lines, encoding, offset, plan_)
            if offsets is None:  # text: sequential, each file's kept rows known after it
                _, n, s, ts = _scatter_file(task)
                base += n - s
                raw_rows, skipped = raw_rows + n, skipped + s
                has_ts.add(ts)
            else:
                scatter.append(task)
        for _, _, s, ts in _imap(pool, _scatter_file, scatter):
            skipped += s
            has_ts.add(ts)
        if offsets is not None:
            raw_rows = int(offsets[-1])
        has_ts.discard(None)
        if len(has_ts) > 1:
            raise DataError(f"{source}: some files have a timestamp column and some do not")
        buckets = list(range(plan_.buckets))
        clock.lap("2")
        # 2. dedup
        item_counts, rows = _Counts(), 0
        for counts, n in _imap(pool, _dedup_bucket, [(b, plan_) for b in buckets]):
            item_counts.add(counts)
            rows += n
        if rows == 0:
            raise DataError(f"{source}: no interactions in the input")
        clock.lap("3")
        # 3. items with enough interactions
        items, counts = item_counts.result()
        _share(plan_, kept_items=items[counts >= options.min_item_count])
        del items, counts
        clock.lap("4")
        # 4. users with enough interactions on kept items
        user_parts, length_parts, final_counts = [], [], _Counts()
        tasks = [(b, plan_, options.min_user_count) for b in buckets]
        for users, lengths, counted in _imap(pool, _count_bucket, tasks):
            user_parts.append(users)
            length_parts.append(lengths)
            final_counts.add(counted)
        clock.lap("5")
        # 5. ids, new users, head users, shards
        final_items, item_counts = final_counts.result()
        all_users = np.concatenate(user_parts) if user_parts else np.array([])
        all_lengths = np.concatenate(length_parts) if length_parts else np.array([])
        if not len(all_users):
            raise DataError(
                f"{source}: nothing left after filtering (min_item_count="
                f"{options.min_item_count}, min_user_count={options.min_user_count}); "
                f"{raw_rows - skipped} interactions were read"
            )
        user_ids, order = _sorted_ids(all_users)
        lengths = all_lengths[order].astype(np.int64)
        is_new = split_new_users(len(user_ids), options.new_user_fraction, options.seed)
        is_head, thresholds = head_users(lengths, is_new, options.head_fraction)
        shard_of = user_shards(user_ids, num_shards)
        clock.lap("6")
        # 6. lists
        _share(
            plan_,
            final_items=final_items,
            user_ids=user_ids,
            shard_of=shard_of,
            is_new=is_new,
            is_head=is_head,
        )
        for _ in _imap(pool, _lists_bucket, [(b, plan_) for b in buckets]):
            pass
        clock.lap("7")
        # 7. merge
        (out / "users").mkdir()
        budget = max(row_group_size, plan_.batch_rows * 4)
        tasks = []
        for shard in range(num_shards):
            rows_ = np.flatnonzero(shard_of == shard)
            tasks.append((shard, plan_, rows_, lengths[rows_], out, row_group_size, budget))
        shards = list(_imap(pool, _merge_shard, tasks))
        clock.lap("8")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return OutOfCoreResult(
        item_ids=final_items,
        item_counts=item_counts,
        user_ids=user_ids,
        lengths=lengths,
        is_new=is_new,
        is_head=is_head,
        head_threshold=thresholds,
        shards=shards,
        raw_rows=raw_rows,
        skipped_rows=skipped,
        has_timestamps=bool(has_ts and has_ts.pop()),
    )


class _Clock:
    """Logs each step's seconds (the steps of the module's doc)."""

    NAMES = {
        "2": "scatter",
        "3": "dedup",
        "4": "item filter",
        "5": "user filter",
        "6": "ids and splits",
        "7": "lists",
    }

    def __init__(self) -> None:
        self.last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        name = self.NAMES.get(step, "merge")
        log.info("out-of-core: %s took %.1f s", name, now - self.last)
        self.last = now


def _sorted_ids(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids ascending as ``dense_codes`` orders them, the order that sorts ``ids``)."""
    uniq, codes = dense_codes(ids)
    order = np.argsort(codes, kind="stable")
    return uniq, order
