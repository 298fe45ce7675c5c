"""Streaming reader over a prepared folder: users in record batches, sharded by (rank, world).

The unit of work is one row group of one shard file. Each epoch the units are put in a seeded
order and rank r takes every W-th one, so the ranks' users are disjoint and together complete
for any world size; rows are shuffled within a unit. Only one row group is held at a time, so
memory follows the row-group size, not the dataset. ``state_dict()`` records the epoch, the
unit and the row reached, and a reader restored from it yields exactly the remaining rows.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError

LAYOUT_OPTIONS = ("num_shards", "row_group_size")
"""``prepare`` options that change how a folder is laid out, not its ids or splits."""


class PreparedData:
    """A prepared folder, opened once per run and passed down: ``meta.json``, the filesystem to
    read it with, the index of its row groups (the units the ranks share), and what is derived
    from every user once (lengths, popularity counts, the balanced split of users across
    ranks), each computed on first use and kept.

    Every reader takes this handle (or a path, which it opens): :class:`UserStream`,
    evaluation, the TP task sampler, the popularity model, the predictor.
    """

    def __init__(self, root: str, fs: fsspec.AbstractFileSystem, meta: dict) -> None:
        self.root, self.fs, self.meta = root, fs, meta
        self._units: list[tuple[str, int]] | None = None
        self._lengths: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._counts: np.ndarray | None = None

    @classmethod
    def of(cls, data: PreparedData | str) -> PreparedData:
        """``data`` itself, or the folder at path ``data`` opened."""
        return data if isinstance(data, PreparedData) else open_prepared(data)

    @property
    def num_items(self) -> int:
        return int(self.meta["stats"]["items"])

    @property
    def files(self) -> list[str]:
        return [f"{self.root}/{s['file']}" for s in self.meta["shards"]]

    @property
    def sha256(self) -> str:
        """The source fingerprint written by ``prepare``."""
        return self.meta["source"]["sha256"]

    @property
    def identity(self) -> tuple:
        """What fixes the folder's item ids and splits: its source fingerprint and
        ``prepare``'s options, those that only lay the folder out (``LAYOUT_OPTIONS``) aside.
        Two folders with one identity give a model the same ids."""
        options = self.meta.get("options", {})
        return self.sha256, {k: v for k, v in options.items() if k not in LAYOUT_OPTIONS}

    def units(self) -> list[tuple[str, int]]:
        """Every (shard file, row group), in file order; each footer is read once."""
        if self._units is None:
            units = []
            for file in self.files:
                with self.fs.open(file, "rb") as f:
                    units += [(file, g) for g in range(pq.ParquetFile(f).num_row_groups)]
            self._units = units
        return self._units

    def rank_units(
        self, rank: int, world_size: int, *, seed: int, epoch: int, shuffle: bool
    ) -> list[tuple[str, int]]:
        """Rank ``rank``'s units of one epoch: all units in a seeded order (file order when
        not ``shuffle``), every ``world_size``-th from ``rank`` on. Disjoint and complete over
        the ranks for any world size: the split that streaming readers use."""
        units = self.units()
        order = np.arange(len(units))
        if shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(order)
        return [units[i] for i in order[rank::world_size]]

    def lengths(self, roles: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(user, length)``: every user's index and number of items (optionally of some
        roles), sorted by user; read once, one row group in memory at a time."""
        key = None if roles is None else tuple(roles)
        if key not in self._lengths:
            self._lengths[key] = read_lengths(self, roles=roles)
        return self._lengths[key]

    def balanced_parts(self, world_size: int, *, holdout: int = 2) -> tuple:
        """The other split, for TP: the existing users with at least one training window,
        ``(users, n_windows, parts)``, ``parts[r]`` the rows of rank r's users (balanced by
        training windows, :func:`balanced_parts`)."""
        users, lengths = self.lengths(["existing"])
        n_windows = lengths - holdout - 1
        keep = n_windows >= 1
        users, n_windows = users[keep], n_windows[keep]
        return users, n_windows, balanced_parts(n_windows, world_size)

    def training_counts(self) -> np.ndarray:
        """[N+1] how often each item is a training item (leave-last-two-out) of an existing
        user: the popularity counts; streamed, one row group at a time."""
        if self._counts is None:
            counts = np.zeros(self.num_items + 1, dtype=np.int64)
            for seqs in stream_sequences(self, roles=["existing"]):
                position = concat_ranges(seqs.lengths)  # [nnz] index within the user
                is_train = position < np.repeat(seqs.lengths - 2, seqs.lengths)
                counts += np.bincount(seqs.items[is_train], minlength=self.num_items + 1)
            self._counts = counts
        return self._counts


def balanced_parts(n_windows: np.ndarray, world_size: int) -> list[np.ndarray]:
    """Rows of ``n_windows`` split into ``world_size`` disjoint, complete parts balanced by
    number of training windows: largest first, each to the lightest part (ties: lowest part).
    Each part is ascending. Deterministic: every rank computes the same split."""
    order = np.lexsort((np.arange(len(n_windows)), -n_windows))
    lightest = [(0, part) for part in range(world_size)]  # a heap of (load, part)
    chosen = []
    for size in n_windows[order].tolist():
        load, part = lightest[0]
        heapq.heapreplace(lightest, (load + size, part))
        chosen.append(part)
    owner = np.empty(len(n_windows), dtype=np.int64)
    owner[order] = chosen
    return [np.flatnonzero(owner == r) for r in range(world_size)]


def open_prepared(path: str) -> PreparedData:
    """Open a prepared folder (local path or fsspec URL) and read its ``meta.json``."""
    fs, root = fsspec.core.url_to_fs(str(path))
    root = root.rstrip("/")
    if fs.isfile(root):
        raise DataError(f"{path}: a file, not a folder written by 'dist-tp prepare'")
    try:
        with fs.open(f"{root}/meta.json", "rb") as f:
            meta = json.load(f)
    except FileNotFoundError as exc:
        raise DataError(
            f"{path}: no meta.json; is this a folder written by 'dist-tp prepare'?"
        ) from exc
    except ValueError as exc:
        raise DataError(f"{path}/meta.json: not valid JSON: {exc}") from exc
    except OSError as exc:
        raise DataError(f"{path}/meta.json: cannot read: {exc.strerror or exc}") from exc
    if not isinstance(meta, dict):
        raise DataError(f"{path}/meta.json: not a prepared folder's meta.json (not an object)")
    if meta.get("format_version") != 1:
        raise DataError(
            f"{path}/meta.json: unsupported format_version {meta.get('format_version')!r}"
        )
    return PreparedData(root, fs, meta)


class UserStream:
    """Iterate the users of a prepared folder for one ``(rank, world_size)``.

    Args:
        data: the prepared folder (:class:`PreparedData`, or its path or fsspec URL).
        rank, world_size: this reader's share of the row-group units.
        seed: with ``epoch``, fixes the unit order and the row shuffle.
        shuffle: False keeps file and row order (for evaluation).
        roles: keep only users whose role is in this set (``existing``/``new``).
        columns: parquet columns to read (default: all).
        batch_rows: users per yielded batch (at most; a batch never spans two units).
    """

    def __init__(
        self,
        data: PreparedData | str,
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
        self.prepared = PreparedData.of(data)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.roles = None if roles is None else list(roles)
        self.columns = None if columns is None else list(dict.fromkeys([*columns, "role"]))
        self.batch_rows = batch_rows
        self.epoch = 0
        self._unit = 0  # position in this rank's unit list
        self._row = 0  # rows of that unit already yielded

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its beginning."""
        self.epoch, self._unit, self._row = epoch, 0, 0

    def units(self) -> list[tuple[str, int]]:
        """This rank's (file, row group) units for the current epoch, in order."""
        return self.prepared.rank_units(
            self.rank, self.world_size, seed=self.seed, epoch=self.epoch, shuffle=self.shuffle
        )

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
    data: PreparedData | str, *, roles: Sequence[str] | None = None, users: np.ndarray | None = None
) -> UserSequences:
    """All users of ``data`` (optionally of some roles, or only the user indices ``users``),
    sorted by user index. With ``users``, each row group is filtered as it is read, so memory
    follows the users kept, not the dataset."""
    stream = _in_file_order(data, roles)
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


def read_lengths(
    data: PreparedData | str, *, roles: Sequence[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(user, length)``: every user's index and number of items (optionally of some roles),
    sorted by user; one row group in memory at a time."""
    users, lengths = [np.zeros(0, np.int32)], [np.zeros(0, np.int64)]
    for seqs in stream_sequences(data, roles=roles):
        users.append(seqs.user)
        lengths.append(seqs.lengths)
    user, length = np.concatenate(users), np.concatenate(lengths)
    order = np.argsort(user, kind="stable")
    return user[order], length[order]


def stream_sequences(
    data: PreparedData | str, *, roles: Sequence[str] | None = None
) -> Iterator[UserSequences]:
    """The users of ``data`` (optionally of some roles) in file order, one row group at a time."""
    for batch in _in_file_order(data, roles):
        yield to_sequences(batch)


def _in_file_order(data: PreparedData | str, roles: Sequence[str] | None) -> UserStream:
    """A reader of every user's columns in file order, a whole row group per batch."""
    return UserStream(
        data,
        shuffle=False,
        roles=roles,
        batch_rows=1 << 20,
        columns=["user", "role", "is_head", "items"],
    )
