"""Bounded-memory TP sampling (``tp.pool_users`` = P > 0): each rank draws its users from a
*pool* of about P existing users read from its own row groups, refilled as the epoch goes on,
instead of holding its whole share (:func:`~dist_tp.algorithms.tp.sampler.load_part`, 12
bytes per interaction).

The refill rule. In epoch e rank r reads its row groups as :class:`UserStream` deals them
(a seeded order, every W-th unit, rows shuffled within a unit), ⌈P/4⌉ rows at a time. A pool
is the next consecutive batches, until it holds at least P users with a training window and
is owed at least one outer step, or the rank's row groups end. With T the training windows of
the rank's row groups this epoch and N the outer steps of a pass over all users
(``TPStepper.steps_per_pass``), the pool holding the rank's windows C_before..C_after of the
epoch serves outer steps [⌊N·C_before/T⌋, ⌊N·C_after/T⌋): its share of the pass is its share
of the rank's windows, so each window is drawn about once a pass (when the ranks' shares are
even), and the last pool ends with the pass's last step: a rank's row groups never run out
early, and there is nothing to wrap around. T is counted one row group at a time and kept per
row group: memory follows the number of row groups, not of users. Inside a pool, sampling is
:meth:`TaskSampler.sample`, every ``tp.user_sampling`` and negatives option alike.

A pool holds fewer than about 1.25·P users (more only when P users hold less than one outer
step of windows), plus the row group the reader is in. The pools of an epoch are disjoint
across ranks and cover each rank's users; a refill needs no collective. Exact resume: the
state records where each rank's pool in use began (the reader's row group and row, its first
step, the windows before it), and a restored run reads that pool again from there, nothing
before it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dist_tp.algorithms.tp.sampler import TaskSampler
from dist_tp.data.errors import DataError
from dist_tp.data.stream import PreparedData, UserStream, to_sequences

COLUMNS = ["user", "role", "is_head", "items"]
BATCHES_PER_POOL = 4  # rows are read P / 4 at a time: a pool overshoots P by under P / 4


@dataclass(frozen=True)
class Cursor:
    """Where a pool begins: the reader's position (``UserStream.state_dict``), the pool's
    first outer step, and the rank's training windows of the epoch before it."""

    epoch: int
    position: dict
    first_step: int
    windows_before: int


@dataclass
class Pool:
    """The users of outer steps ``[cursor.first_step, end_step)``, as a task sampler."""

    cursor: Cursor
    end_step: int
    after: dict  # the reader's position just past the pool's last user
    windows: int
    sampler: TaskSampler

    def __len__(self) -> int:
        return len(self.sampler)

    @property
    def users(self) -> np.ndarray:
        """The pool's user indices, in sampler order."""
        return self.sampler.seqs.user

    def next_cursor(self) -> Cursor:
        """Where the following pool begins."""
        c = self.cursor
        return Cursor(c.epoch, self.after, self.end_step, c.windows_before + self.windows)


def training_windows(lengths: np.ndarray, holdout: int = 2) -> np.ndarray:
    """Training windows per user of ``lengths`` items (``TaskSampler``: 0 for a user it
    drops)."""
    return np.maximum(lengths.astype(np.int64) - holdout - 1, 0)


def list_lengths(items: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Each user's number of items, from the ``items`` list column."""
    return np.asarray(pc.list_value_length(items).to_numpy(zero_copy_only=False), dtype=np.int64)


def unit_windows(data: PreparedData, unit: tuple[str, int], holdout: int = 2) -> int:
    """The training windows of one row group's existing users (that row group alone read)."""
    file, group = unit
    with data.fs.open(file, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(group, columns=["role", "items"])
    existing = table.filter(pc.is_in(table.column("role"), pa.array(["existing"])))
    return int(training_windows(list_lengths(existing.column("items")), holdout).sum())


class UserPools:
    """Rank ``rank``'s pools of existing users (the module's refill rule); ``current`` is the
    pool last served, the only one held."""

    def __init__(
        self,
        data: PreparedData | str,
        *,
        pool_users: int,
        max_len: int,
        rank: int,
        world_size: int,
        seed: int,
        holdout: int = 2,
    ) -> None:
        if pool_users < 1:
            raise ValueError(f"pool_users must be >= 1, got {pool_users}")
        self.data = PreparedData.of(data)
        self.pool_users, self.max_len, self.holdout = pool_users, max_len, holdout
        self.stream = UserStream(
            self.data,
            rank=rank,
            world_size=world_size,
            seed=seed,
            roles=["existing"],
            columns=COLUMNS,
            batch_rows=-(-pool_users // BATCHES_PER_POOL),
        )
        self.current: Pool | None = None
        self.reads = 0  # pools read so far (refills and re-reads)
        self._batches: Iterator[pa.RecordBatch] | None = None  # the reader, left where it was
        self._resume: Cursor | None = None  # the pool in use at a checkpoint
        self._unit_windows: dict[tuple[str, int], int] = {}

    def units(self, epoch: int) -> list[tuple[str, int]]:
        """This rank's row groups of epoch ``epoch``, in reading order."""
        s = self.stream
        return self.data.rank_units(
            s.rank, s.world_size, seed=s.seed, epoch=epoch, shuffle=s.shuffle
        )

    def epoch_windows(self, epoch: int) -> int:
        """T: the training windows of this rank's row groups in epoch ``epoch`` (each row
        group's count read once, then kept)."""
        total = 0
        for unit in self.units(epoch):
            if unit not in self._unit_windows:
                self._unit_windows[unit] = unit_windows(self.data, unit, self.holdout)
            total += self._unit_windows[unit]
        return total

    def pool_at(self, epoch: int, step: int, steps: int) -> Pool:
        """The pool serving outer step ``step`` of epoch ``epoch`` (of ``steps``); a later
        step of the same epoch refills from where the current pool ends, an earlier one (or
        another epoch) reads again from the checkpoint's pool or the epoch's start. A step
        past the epoch (never taken by ``run_epoch``) wraps around to its start."""
        step %= steps
        if not self._reaches(epoch, step):
            self._batches = None  # the reader's row group too: it will read elsewhere
            self._refill(self._start(epoch, step), steps)
        while step >= self.current.end_step:
            self._refill(self.current.next_cursor(), steps)
        return self.current

    def state_dict(self) -> dict | None:
        """Where the pool in use began (None before the first)."""
        return None if self.current is None else asdict(self.current.cursor)

    def load_state_dict(self, state: dict | None) -> None:
        """Restore a checkpoint's pool: the next ``pool_at`` of its epoch from its first step
        on reads it again from its recorded position."""
        self._resume = None if state is None else Cursor(**state)
        self.current, self._batches = None, None

    def _reaches(self, epoch: int, step: int) -> bool:
        """Whether the current pool or one after it serves ``step`` of ``epoch``."""
        pool = self.current
        return pool is not None and pool.cursor.epoch == epoch and pool.cursor.first_step <= step

    def _refill(self, cursor: Cursor, steps: int) -> None:
        """Replace the current pool with the one beginning at ``cursor``."""
        self.current = None  # released before the next is read
        self.current = self._fill(cursor, steps)

    def _start(self, epoch: int, step: int) -> Cursor:
        """The checkpoint's pool when it is of ``epoch`` and not after ``step``, else the
        epoch's first pool."""
        saved = self._resume
        if saved is not None and saved.epoch == epoch and saved.first_step <= step:
            return saved
        position = {"epoch": epoch, "unit": 0, "row": 0, "seed": self.stream.seed}
        return Cursor(epoch, position, 0, 0)

    def _fill(self, cursor: Cursor, steps: int) -> Pool:
        """Read the pool beginning at ``cursor``: batches until P users with a window and at
        least one outer step, or the end of the rank's row groups (then the epoch's end)."""
        total = self.epoch_windows(cursor.epoch)
        if total == 0:
            raise DataError(
                f"rank {self.stream.rank}: no existing user with a training window in its row "
                f"groups of epoch {cursor.epoch}; with tp.pool_users the ranks share row groups "
                "(prepare with a smaller --row-group-size, or use fewer ranks)"
            )
        batches, users, windows, end = [], 0, 0, steps  # a step < steps leaves a batch to read
        for batch in self._reader_at(cursor.position):
            n_windows = training_windows(list_lengths(batch.column("items")), self.holdout)
            batches.append(batch)
            users += int(np.count_nonzero(n_windows))
            windows += int(n_windows.sum())
            end = steps * (cursor.windows_before + windows) // total
            if users >= self.pool_users and end > cursor.first_step:
                break
        else:
            end = steps  # the rank's row groups end with the epoch
        self.reads += 1
        seqs = to_sequences(pa.Table.from_batches(batches).combine_chunks())
        sampler = TaskSampler(seqs, max_len=self.max_len, holdout=self.holdout)
        return Pool(cursor, end, self.stream.state_dict(), windows, sampler)

    def _reader_at(self, position: dict) -> Iterator[pa.RecordBatch]:
        """The reader's batches from ``position``: the one left there, or a new one."""
        if self._batches is None or self.stream.state_dict() != position:
            self.stream.load_state_dict(position)
            self._batches = iter(self.stream)
        return self._batches
