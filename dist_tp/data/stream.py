"""Streaming reader over a prepared folder: users in record batches, sharded by (rank, world).

The unit of work is one row group of one shard file. Each epoch the units are put in a seeded
order and rank r takes every W-th one, so the ranks' users are disjoint and together complete
for any world size; rows are shuffled within a unit. Only one row group is held at a time, so
memory follows the row-group size, not the dataset. ``state_dict()`` records the epoch, the
unit and the row reached, and a reader restored from it yields exactly the remaining rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError


@dataclass
class PreparedMeta:
    """``meta.json`` of a prepared folder plus the filesystem to read it with."""

    root: str
    fs: fsspec.AbstractFileSystem
    meta: dict

    @property
    def num_items(self) -> int:
        return int(self.meta["stats"]["items"])

    @property
    def files(self) -> list[str]:
        return [f"{self.root}/{s['file']}" for s in self.meta["shards"]]


def open_prepared(path: str) -> PreparedMeta:
    """Open a prepared folder (local path or fsspec URL) and read its ``meta.json``."""
    fs, root = fsspec.core.url_to_fs(str(path))
    root = root.rstrip("/")
    try:
        with fs.open(f"{root}/meta.json", "rb") as f:
            meta = json.load(f)
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: no meta.json; is this a folder written by 'dist-tp prepare'?"
        ) from exc
    except ValueError as exc:
        raise DataError(f"{path}/meta.json: not valid JSON: {exc}") from exc
    if meta.get("format_version") != 1:
        raise DataError(
            f"{path}/meta.json: unsupported format_version {meta.get('format_version')!r}"
        )
    return PreparedMeta(root, fs, meta)


class UserStream:
    """Iterate the users of a prepared folder for one ``(rank, world_size)``.

    Args:
        path: prepared folder (local or fsspec URL).
        rank, world_size: this reader's share of the row-group units.
        seed: with ``epoch``, fixes the unit order and the row shuffle.
        shuffle: False keeps file and row order (for evaluation).
        roles: keep only users whose role is in this set (``existing``/``new``).
        columns: parquet columns to read (default: all).
        batch_rows: users per yielded batch (at most; a batch never spans two units).
    """

    def __init__(
        self,
        path: str,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        roles: Sequence[str] | None = None,
        columns: Sequence[str] | None = None,
        batch_rows: int = 256,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} not in [0, {world_size})")
        self.prepared = open_prepared(path)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.roles = None if roles is None else list(roles)
        self.columns = None if columns is None else list(dict.fromkeys([*columns, "role"]))
        self.batch_rows = batch_rows
        self.epoch = 0
        self._unit = 0  # position in this rank's unit list
        self._row = 0  # rows of that unit already yielded
        self._all_units = self._list_units()

    def _list_units(self) -> list[tuple[str, int]]:
        units = []
        for file in self.prepared.files:
            with self.prepared.fs.open(file, "rb") as f:
                units += [(file, g) for g in range(pq.ParquetFile(f).num_row_groups)]
        return units

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.epoch, self._unit, self._row = epoch, 0, 0

    def units(self) -> list[tuple[str, int]]:
        """This rank's (file, row group) units for the current epoch, in order."""
        order = np.arange(len(self._all_units))
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(order)
        return [self._all_units[i] for i in order[self.rank :: self.world_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "unit": self._unit, "row": self._row, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._unit, self._row = state["epoch"], state["unit"], state["row"]
        self.seed = state["seed"]

    def _read_unit(self, file: str, group: int, position: int) -> pa.Table:
        with self.prepared.fs.open(file, "rb") as f:
            table = pq.ParquetFile(f).read_row_group(group, columns=self.columns)
        if self.roles is not None:
            table = table.filter(pc.is_in(table.column("role"), pa.array(self.roles)))
        if self.shuffle and table.num_rows > 1:
            rng = np.random.default_rng([self.seed, self.epoch, position, self.rank])
            table = table.take(rng.permutation(table.num_rows))
        return table

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        units = self.units()
        while self._unit < len(units):
            file, group = units[self._unit]
            table = self._read_unit(file, group, self._unit)
            while self._row < table.num_rows:
                batch = table.slice(self._row, self.batch_rows).combine_chunks()
                self._row += batch.num_rows
                yield batch.to_batches()[0] if batch.num_rows else batch
            self._unit, self._row = self._unit + 1, 0


@dataclass
class UserSequences:
    """Users of some batches in CSR form (numpy), for training and evaluation."""

    user: np.ndarray  # [U] int32 user index
    is_new: np.ndarray  # [U] bool
    is_head: np.ndarray  # [U] bool
    offsets: np.ndarray  # [U+1] int64
    items: np.ndarray  # [nnz] int32

    def __len__(self) -> int:
        return len(self.user)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def select(self, mask: np.ndarray) -> UserSequences:
        """The users where ``mask`` is true, in the same order."""
        idx = np.flatnonzero(mask)
        lengths = self.lengths[idx]
        gather = np.repeat(self.offsets[idx], lengths) + concat_ranges(lengths)
        return UserSequences(
            self.user[idx],
            self.is_new[idx],
            self.is_head[idx],
            np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
            self.items[gather],
        )


def concat_ranges(counts: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(c)`` for each count c, vectorised: [2, 3] → [0, 1, 0, 1, 2]."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(counts)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - counts, counts)


def to_sequences(batch: pa.RecordBatch | pa.Table) -> UserSequences:
    """Columns of a user batch → numpy CSR (no Python loop over users)."""
    items = batch.column("items")
    if isinstance(items, pa.ChunkedArray):
        items = items.combine_chunks()
    offsets = items.offsets.to_numpy().astype(np.int64)
    values = items.values.to_numpy()
    start = offsets[0]
    return UserSequences(
        user=batch.column("user").to_numpy(),
        is_new=(np.asarray(batch.column("role").to_numpy(zero_copy_only=False)) == "new"),
        is_head=np.asarray(batch.column("is_head").to_numpy(zero_copy_only=False), dtype=bool),
        offsets=offsets - start,
        items=values[start : offsets[-1]].astype(np.int32, copy=False),
    )


def load_sequences(
    path: str, *, roles: Sequence[str] | None = None, users: np.ndarray | None = None
) -> UserSequences:
    """All users of ``path`` (optionally of some roles, or only the user indices ``users``),
    sorted by user index. With ``users``, each row group is filtered as it is read, so memory
    follows the users kept, not the dataset."""
    stream = _in_file_order(path, roles)
    keep = None if users is None else pa.array(np.asarray(users, dtype=np.int32))
    batches = [
        batch if keep is None else batch.filter(pc.is_in(batch.column("user"), keep))
        for batch in stream
    ]
    if not batches:
        empty = np.zeros(0, dtype=bool)
        return UserSequences(
            np.zeros(0, np.int32), empty, empty, np.zeros(1, np.int64), np.zeros(0, np.int32)
        )
    table = pa.Table.from_batches(batches)
    table = table.take(pc.sort_indices(table, [("user", "ascending")]))
    return to_sequences(table.combine_chunks())


def read_lengths(path: str, *, roles: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(user, length)``: every user's index and number of items (optionally of some roles),
    sorted by user; one row group in memory at a time."""
    users, lengths = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
    for seqs in stream_sequences(path, roles=roles):
        users.append(seqs.user)
        lengths.append(seqs.lengths)
    user, length = np.concatenate(users), np.concatenate(lengths)
    order = np.argsort(user, kind="stable")
    return user[order], length[order]


def stream_sequences(path: str, *, roles: Sequence[str] | None = None) -> Iterator[UserSequences]:
    """The users of ``path`` (optionally of some roles) in file order, one row group at a time."""
    for batch in _in_file_order(path, roles):
        yield to_sequences(batch)


def _in_file_order(path: str, roles: Sequence[str] | None) -> UserStream:
    """A reader of every user's columns in file order, a whole row group per batch."""
    return UserStream(
        path,
        shuffle=False,
        roles=roles,
        batch_rows=1 << 20,
        columns=["user", "role", "is_head", "items"],
    )
