"""The paper's preprocessing protocol, on in-memory numpy arrays.

Raw interactions → implicit feedback: duplicate (user, item) pairs keep the earliest; items with
fewer than ``min_item_count`` interactions go, then users with fewer than ``min_user_count``
(each filter once, in that order); each user's items sorted by time (stable: ties keep input
order); contiguous ids 1..N in ascending order of the original id; a seeded share of users
becomes *new* users (cold start, never trained on); head users are the top share by
interaction count within the existing and within the new users separately (ties by user id).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dist_tp.data.errors import DataError
from dist_tp.data.readers import Interactions


@dataclass(frozen=True)
class ProtocolOptions:
    min_item_count: int = 5
    min_user_count: int = 10
    new_user_fraction: float = 0.2
    head_fraction: float = 0.2
    seed: int = 0
    """Seed of the existing/new user split."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.new_user_fraction < 1.0:
            raise DataError("new_user_fraction must be in [0, 1)")
        if not 0.0 < self.head_fraction <= 1.0:
            raise DataError("head_fraction must be in (0, 1]")
        if self.min_item_count < 1 or self.min_user_count < 1:
            raise DataError("min_item_count and min_user_count must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Prepared:
    """The protocol's result. Users are 1..U (row u-1), items 1..N; sequences in CSR form."""

    user_ids: np.ndarray  # [U] original user id, row u-1 is user index u
    item_ids: np.ndarray  # [N] original item id, row i-1 is item index i
    item_counts: np.ndarray  # [N] interactions per item after filtering
    offsets: np.ndarray  # [U+1] int64, user u's items are items[offsets[u-1]:offsets[u]]
    items: np.ndarray  # [nnz] int32 item index, time-ordered within each user
    timestamps: np.ndarray  # [nnz] int64 (the line order when the input has no timestamps)
    is_new: np.ndarray  # [U] bool
    is_head: np.ndarray  # [U] bool, within the user's own group
    head_threshold: dict  # {"existing": min #interactions of a head user, "new": ...}

    @property
    def num_users(self) -> int:
        return len(self.user_ids)

    @property
    def num_items(self) -> int:
        return len(self.item_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def dense_codes(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique values, code of each value); codes follow the ascending original-id order.

    Hash-based (pyarrow's dictionary encoding), then only the small dictionary is sorted.
    Integer ids beyond 64 bits (Python integers in an object array) are sorted as integers.
    """
    if values.dtype == object and len(values) and not isinstance(values[0], str):
        unique, codes = np.unique(values, return_inverse=True)
        return unique, codes.astype(np.int64)
    encoded = pc.dictionary_encode(pa.array(values, from_pandas=False))
    dictionary = encoded.dictionary.to_numpy(zero_copy_only=False)
    order = np.argsort(dictionary, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return dictionary[order], rank[encoded.indices.to_numpy()]


def _mask_rows(keep: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    return [a[keep] for a in arrays]


def time_order(ucode: np.ndarray, ts: np.ndarray, line: np.ndarray) -> np.ndarray:
    """Row order by (user, timestamp, input line): one stable sort on a packed key when
    (user, timestamp) fit in 63 bits, else two stable sorts."""
    t0, span = int(ts.min()), int(ts.max()) - int(ts.min()) + 1
    if int(ucode.max()) + 1 < (1 << 62) // span:
        return np.argsort(ucode * span + (ts - t0), kind="stable")
    order = np.argsort(ts, kind="stable")
    return order[np.argsort(ucode[order], kind="stable")]


def first_of_duplicates(ucode, icode, ts, line) -> np.ndarray | None:
    """Mask keeping the earliest row (by timestamp, then line) of each (user, item) pair, or
    None when there is no duplicate. A hash aggregation (min of a packed (timestamp, line)
    value per pair), no sort."""
    n = len(line)
    key = ucode * (int(icode.max()) + 1) + icode
    t0, span = int(ts.min()), int(ts.max()) - int(ts.min()) + 1
    if span < (1 << 62) // n:
        when = (ts - t0) * n + line
    else:  # too wide to pack: rank the timestamps first
        when = np.empty(n, dtype=np.int64)
        when[np.argsort(ts, kind="stable")] = line
    table = pa.table({"key": key, "when": when})
    first = table.group_by("key", use_threads=False).aggregate([("when", "min")])
    if first.num_rows == n:
        return None
    keep = np.zeros(n, dtype=bool)
    earliest = first.column("when_min").to_numpy()
    keep[earliest % n if span < (1 << 62) // n else np.argsort(when)[earliest]] = True
    return keep


def apply_protocol(raw: Interactions, opts: ProtocolOptions) -> Prepared:
    """Run the protocol; raises DataError when nothing is left after filtering."""
    n = len(raw.user)
    users, ucode = dense_codes(raw.user)
    items, icode = dense_codes(raw.item)
    line = np.arange(n, dtype=np.int64)
    ts = raw.ts if raw.ts is not None else line
    keep = first_of_duplicates(ucode, icode, ts, line)
    if keep is not None:
        ucode, icode, ts, line = _mask_rows(keep, ucode, icode, ts, line)
    # The filters only count, so they run before the (expensive) time sort, on fewer rows.
    item_count = np.bincount(icode, minlength=len(items))
    ucode, icode, ts, line = _mask_rows(
        item_count[icode] >= opts.min_item_count, ucode, icode, ts, line
    )
    user_count = np.bincount(ucode, minlength=len(users))
    ucode, icode, ts, line = _mask_rows(
        user_count[ucode] >= opts.min_user_count, ucode, icode, ts, line
    )
    if len(ucode) == 0:
        raise DataError(
            f"{raw.source}: nothing left after filtering (min_item_count={opts.min_item_count}, "
            f"min_user_count={opts.min_user_count}); {n} interactions were read"
        )
    # Rows are still in input order, so a stable sort keeps input order for equal timestamps.
    order = time_order(ucode, ts, line)
    ucode, icode, ts = ucode[order], icode[order], ts[order]

    # Contiguous ids 1..N in ascending order of the original id.
    kept_items = np.unique(icode)
    item_index = np.zeros(len(items), dtype=np.int32)
    item_index[kept_items] = np.arange(1, len(kept_items) + 1, dtype=np.int32)
    kept_users = np.unique(ucode)
    user_index = np.zeros(len(users), dtype=np.int64)
    user_index[kept_users] = np.arange(1, len(kept_users) + 1)
    new_items = item_index[icode]
    lengths = np.bincount(user_index[ucode] - 1, minlength=len(kept_users))
    offsets = np.zeros(len(kept_users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])

    is_new = split_new_users(len(kept_users), opts.new_user_fraction, opts.seed)
    is_head, thresholds = head_users(lengths, is_new, opts.head_fraction)
    return Prepared(
        user_ids=users[kept_users],
        item_ids=items[kept_items],
        item_counts=np.bincount(new_items, minlength=len(kept_items) + 1)[1:],
        offsets=offsets,
        items=new_items,
        timestamps=ts.astype(np.int64, copy=False),
        is_new=is_new,
        is_head=is_head,
        head_threshold=thresholds,
    )


def split_new_users(num_users: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded ``round(fraction * U)`` users become new users (boolean mask over user rows)."""
    num_new = int(round(fraction * num_users))
    rng = np.random.default_rng(seed)
    mask = np.zeros(num_users, dtype=bool)
    mask[rng.permutation(num_users)[:num_new]] = True
    return mask


def head_users(lengths: np.ndarray, is_new: np.ndarray, fraction: float) -> tuple[np.ndarray, dict]:
    """Head = the ceil(fraction · group size) users with the most interactions, per group.

    Ties at the boundary go to the smaller user index, so the split is deterministic.
    """
    is_head = np.zeros(len(lengths), dtype=bool)
    thresholds = {}
    for name, members in (("existing", ~is_new), ("new", is_new)):
        idx = np.flatnonzero(members)
        num_head = math.ceil(fraction * len(idx))
        # lexsort: last key is primary → most interactions first, then smaller user index.
        ranked = idx[np.lexsort((idx, -lengths[idx]))]
        head = ranked[:num_head]
        is_head[head] = True
        thresholds[name] = int(lengths[head].min()) if num_head else None
    return is_head, thresholds


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 (wrapping arithmetic): an explicit, engine-free hash."""
    z = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def user_shards(user_ids: np.ndarray, num_shards: int) -> np.ndarray:
    """Shard of each user: splitmix64(id) mod S for integer ids; for string ids the first
    8 bytes (little endian) of the id's blake2b digest go through the same mix."""
    if user_ids.dtype.kind in "iu":
        keys = user_ids.astype(np.int64).view(np.uint64)
    else:
        keys = np.fromiter(
            (
                int.from_bytes(hashlib.blake2b(str(u).encode(), digest_size=8).digest(), "little")
                for u in user_ids
            ),
            dtype=np.uint64,
            count=len(user_ids),
        )
    return (splitmix64(keys) % np.uint64(num_shards)).astype(np.int64)


def table2_stats(prep: Prepared) -> dict:
    """The paper's Table 2 figures plus the group counts."""
    return summary_stats(
        num_items=prep.num_items,
        lengths=prep.lengths,
        is_new=prep.is_new,
        is_head=prep.is_head,
        head_threshold=prep.head_threshold,
    )


def summary_stats(
    *,
    num_items: int,
    lengths: np.ndarray,
    is_new: np.ndarray,
    is_head: np.ndarray,
    head_threshold: dict,
) -> dict:
    """Table 2's figures from the per-user lengths, groups and head flags."""
    users, items, nnz = len(lengths), num_items, int(lengths.sum())
    existing = ~is_new
    return {
        "users": users,
        "items": items,
        "interactions": nnz,
        "records_per_user": nnz / users,
        "records_per_item": nnz / items,
        "density": nnz / (users * items),
        "existing_users": int(existing.sum()),
        "new_users": int(is_new.sum()),
        "existing_head": int((existing & is_head).sum()),
        "existing_tail": int((existing & ~is_head).sum()),
        "new_head": int((is_new & is_head).sum()),
        "new_tail": int((is_new & ~is_head).sum()),
        "head_threshold": head_threshold,
    }
