"""The rows of a prepared folder's ``users/part-*.parquet``: their schema, and the one way
both ``prepare`` engines build a table of them from per-user ranges of flat arrays."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from dist_tp.data.stream import concat_ranges

USER_SCHEMA = pa.schema(
    [
        ("user", pa.int32()),
        ("original_id", pa.string()),
        ("role", pa.string()),
        ("is_head", pa.bool_()),
        ("items", pa.list_(pa.int32())),
        ("timestamps", pa.list_(pa.int64())),
    ]
)


def user_table(
    rows: np.ndarray,
    original: np.ndarray,
    is_new: np.ndarray,
    is_head: np.ndarray,
    items: np.ndarray,
    timestamps: np.ndarray,
    starts: np.ndarray,
    lengths: np.ndarray,
) -> pa.Table:
    """Users ``rows`` (0-based user rows; ``original``, ``is_new``, ``is_head`` are theirs,
    row by row): user i's items and timestamps are ``items[starts[i] : starts[i] +
    lengths[i]]`` (item ids 1..N) and the same range of ``timestamps``."""
    gather = np.repeat(starts, lengths) + concat_ranges(lengths)
    offsets = pa.array(np.concatenate(([0], np.cumsum(lengths))).astype(np.int32))
    return pa.Table.from_arrays(
        [
            pa.array(rows + 1, type=pa.int32()),
            pa.array([str(x) for x in original], type=pa.string()),
            pa.array(np.where(is_new, "new", "existing")),
            pa.array(is_head),
            pa.ListArray.from_arrays(offsets, pa.array(items[gather], type=pa.int32())),
            pa.ListArray.from_arrays(offsets, pa.array(timestamps[gather], type=pa.int64())),
        ],
        schema=USER_SCHEMA,
    )
