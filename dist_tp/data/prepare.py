"""``dist-tp prepare``: raw log → protocol → ``DIR`` (meta.json, items.parquet, users/part-*).

The output is written into a staging folder beside ``DIR`` and renamed into place at the end,
so an interrupted run leaves no ``DIR``. Re-running with the same input and options is a
no-op (the source fingerprint and options are compared) unless ``force``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError
from dist_tp.data.protocol import (
    Prepared,
    ProtocolOptions,
    apply_protocol,
    table2_stats,
    user_shards,
)
from dist_tp.data.readers import read_interactions

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
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


def _id_array(ids: np.ndarray) -> pa.Array:
    if ids.dtype.kind in "iu":
        return pa.array(ids.astype(np.int64))
    return pa.array([str(x) for x in ids], type=pa.string())


def _list_array(values: np.ndarray, offsets: np.ndarray, value_type: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets.astype(np.int32)), pa.array(values, type=value_type)
    )


def write_users(prep: Prepared, out: Path, *, num_shards: int, row_group_size: int) -> list[dict]:
    """One parquet file per shard, users ascending within a shard, ``row_group_size`` per group."""
    shard_of = user_shards(prep.user_ids, num_shards)
    original = [str(x) for x in prep.user_ids]
    (out / "users").mkdir()
    files = []
    for shard in range(num_shards):
        rows = np.flatnonzero(shard_of == shard)  # [n] user rows (0-based), ascending
        lengths = prep.lengths[rows]
        starts = prep.offsets[rows]
        gather = np.repeat(starts - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
        gather += np.arange(int(lengths.sum()), dtype=np.int64)
        offsets = np.concatenate(([0], np.cumsum(lengths)))
        table = pa.Table.from_arrays(
            [
                pa.array(rows + 1, type=pa.int32()),
                pa.array([original[r] for r in rows], type=pa.string()),
                pa.array(np.where(prep.is_new[rows], "new", "existing")),
                pa.array(prep.is_head[rows]),
                _list_array(prep.items[gather], offsets, pa.int32()),
                _list_array(prep.timestamps[gather], offsets, pa.int64()),
            ],
            schema=USER_SCHEMA,
        )
        name = f"part-{shard:05d}.parquet"
        pq.write_table(
            table, out / "users" / name, row_group_size=row_group_size, compression="zstd"
        )
        files.append(
            {"file": f"users/{name}", "users": len(rows), "interactions": int(lengths.sum())}
        )
    return files


def write_items(prep: Prepared, out: Path) -> None:
    table = pa.table(
        {
            "item": pa.array(np.arange(1, prep.num_items + 1), type=pa.int32()),
            "original_id": _id_array(prep.item_ids),
            "count": pa.array(prep.item_counts.astype(np.int64)),
        }
    )
    pq.write_table(table, out / "items.parquet")


def _existing_meta(output: Path) -> dict | None:
    try:
        return json.loads((output / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def prepare(
    *,
    input_path: str,
    fmt: str,
    output: str | Path,
    options: ProtocolOptions | None = None,
    columns: dict[str, str] | None = None,
    on_bad_lines: str = "error",
    num_shards: int = 4,
    row_group_size: int = 1024,
    force: bool = False,
    dataset: str | None = None,
) -> dict:
    """Prepare one dataset; returns the written (or already present) ``meta.json`` content."""
    output = Path(output)
    options = options or ProtocolOptions()
    if num_shards < 1 or row_group_size < 1:
        raise DataError("--shards and --row-group-size must be >= 1")
    started = time.perf_counter()
    raw = read_interactions(input_path, fmt, columns=columns, on_bad_lines=on_bad_lines)
    settings = {
        "format": fmt,
        "columns": columns,
        "on_bad_lines": on_bad_lines,
        "num_shards": num_shards,
        "row_group_size": row_group_size,
        **options.to_dict(),
    }
    previous = _existing_meta(output)
    if output.exists() and not force:
        if (
            previous
            and previous["source"]["sha256"] == raw.sha256
            and previous["options"] == settings
        ):
            log.info("%s is up to date (same input and options); nothing to do", output)
            return previous
        raise DataError(
            f"{output}: already exists with other input or options; use --force to replace it"
        )
    prep = apply_protocol(raw, options)
    meta = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "source": {
            "path": str(input_path),
            "sha256": raw.sha256,
            "raw_rows": raw.raw_rows,
            "skipped_rows": raw.skipped_rows,
            "has_timestamps": raw.ts is not None,
        },
        "options": settings,
        "stats": table2_stats(prep),
    }
    output.parent.mkdir(parents=True, exist_ok=True)
    for stale in output.parent.glob(f".{output.name}.staging-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    stage = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        write_items(prep, stage)
        meta["shards"] = write_users(
            prep, stage, num_shards=num_shards, row_group_size=row_group_size
        )
        meta["seconds"] = round(time.perf_counter() - started, 3)
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if output.exists():  # --force: move the old folder aside, then drop it
            trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(stage, output)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return meta
