"""``dist-tp prepare``: raw log → protocol → ``DIR`` (meta.json, items.parquet, users/part-*).

The output is written into a staging folder beside ``DIR`` and renamed into place at the end,
so an interrupted run leaves no ``DIR``. Re-running with the same input and options is a
no-op (the source fingerprint and options are compared) unless ``force``.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_tp.core.locks import Busy, LockFile
from dist_tp.core.process import exit_now
from dist_tp.data.errors import DataError
from dist_tp.data.layout import user_table
from dist_tp.data.protocol import (
    Prepared,
    ProtocolOptions,
    apply_protocol,
    table2_stats,
    user_shards,
)
from dist_tp.data.readers import (
    PARQUET_FORMATS,
    YAMBDA_COLUMNS,
    YambdaOptions,
    parquet_file_rows,
    read_many,
)
from dist_tp.data.sources import files_fingerprint, list_inputs, parse_size, total_size

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENGINES = ("auto", "memory", "out-of-core")
DEFAULT_MEMORY_LIMIT = "2GB"
MIN_MEMORY_LIMIT = 256 * 10**6
AUTO_FACTOR = 16
"""``--engine auto`` goes out of core when the input's bytes x AUTO_FACTOR > --memory-limit."""


def _id_array(ids: np.ndarray) -> pa.Array:
    if ids.dtype == np.uint64:  # ids >= 2**63: kept exact, never wrapped to int64
        return pa.array(ids, type=pa.uint64())
    if ids.dtype.kind in "iu":
        return pa.array(ids.astype(np.int64))
    return pa.array([str(x) for x in ids], type=pa.string())


def write_users(prep: Prepared, out: Path, *, num_shards: int, row_group_size: int) -> list[dict]:
    """One parquet file per shard, users ascending within a shard, ``row_group_size`` per group."""
    shard_of = user_shards(prep.user_ids, num_shards)
    (out / "users").mkdir()
    files = []
    for shard in range(num_shards):
        rows = np.flatnonzero(shard_of == shard)  # [n] user rows (0-based), ascending
        lengths = prep.lengths[rows]
        table = user_table(
            rows,
            prep.user_ids[rows],
            prep.is_new[rows],
            prep.is_head[rows],
            prep.items,
            prep.timestamps,
            prep.offsets[rows],
            lengths,
        )
        name = f"part-{shard:05d}.parquet"
        pq.write_table(
            table, out / "users" / name, row_group_size=row_group_size, compression="zstd"
        )
        files.append(
            {"file": f"users/{name}", "users": len(rows), "interactions": int(lengths.sum())}
        )
    return files


def write_items(item_ids: np.ndarray, item_counts: np.ndarray, out: Path) -> None:
    table = pa.table(
        {
            "item": pa.array(np.arange(1, len(item_ids) + 1), type=pa.int32()),
            "original_id": _id_array(item_ids),
            "count": pa.array(item_counts.astype(np.int64)),
        }
    )
    pq.write_table(table, out / "items.parquet")


def _existing_meta(output: Path) -> dict | None:
    try:
        meta = json.loads((output / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` holds a prepared dataset: a ``meta.json`` with a format version."""
    meta = _existing_meta(folder) if folder.is_dir() else None
    return meta is not None and isinstance(meta.get("format_version"), int)


class OutputLocked(DataError):
    """Another ``prepare`` is writing the same output."""


@contextmanager
def _output_lock(output: Path, shown: str):
    """An exclusive lock on ``output`` (:meth:`LockFile.beside` it) while the block runs.
    Taking it is also the check that the output's folder is writable, done before any input
    is read. A second holder is refused at once with one line."""
    lock = LockFile.beside(output)
    try:
        lock.acquire()
    except Busy as busy:
        raise OutputLocked(
            f"{shown}: another 'dist-tp prepare' "
            f"(pid {busy.holder}) is writing it; wait for it to finish"
        ) from None
    except OSError as exc:
        raise _unwritable(output.parent, exc) from None
    try:
        yield
    finally:
        lock.release()


def _unwritable(folder: Path, exc: OSError) -> DataError:
    return DataError(f"{folder}: cannot write here: {exc.strerror or exc}")


def _make_parent(parent: Path) -> list[Path]:
    """Create ``parent`` and its missing ancestors; the folders made, deepest first."""
    made = []
    folder = parent
    while not folder.exists() and folder != folder.parent:
        made.append(folder)
        folder = folder.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unwritable(folder, exc) from None
    return made


def _remove_tree(path: Path) -> None:
    """Remove a folder of our own making, read-only parts included."""
    if not os.path.lexists(path):
        return
    root = os.path.abspath(path)

    def retry(func, name, _exc) -> None:
        parent = os.path.dirname(name)
        if parent == root or parent.startswith(root + os.sep):  # never outside the tree
            try:
                os.chmod(parent, 0o700)
                func(name)
            except OSError:
                pass

    shutil.rmtree(path, onerror=retry)


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
    encoding: str = "utf-8",
    yambda: YambdaOptions | None = None,
    engine: str = "auto",
    memory_limit: str | int = DEFAULT_MEMORY_LIMIT,
    workers: int | None = None,
) -> dict:
    """Prepare one dataset; returns the written (or already present) ``meta.json`` content.

    ``output`` must be absent, an empty folder, or a prepared folder (replaced only with
    ``force``, or left as it is when made from the same input and options); anything else is
    refused. Before the input is read the output's folder is locked (a second run into the
    same output is refused) and found writable. Errors are :class:`DataError` (one line)."""
    shown = str(output)
    output = Path(os.path.abspath(output))
    options = options or ProtocolOptions()
    if num_shards < 1 or row_group_size < 1:
        raise DataError("--shards and --row-group-size must be >= 1")
    if engine not in ENGINES:
        raise DataError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    memory = parse_size(memory_limit)
    if memory < MIN_MEMORY_LIMIT:
        raise DataError(f"--memory-limit {memory_limit}: give at least 256MB")
    if fmt == "yambda":
        yambda = yambda or YambdaOptions()
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise DataError(f"--encoding: unknown encoding {encoding!r}") from None
    check_output(shown)
    made = _make_parent(output.parent)
    try:
        with _output_lock(output, shown):
            return _prepare_locked(
                input_path=input_path,
                fmt=fmt,
                output=output,
                shown=shown,
                options=options,
                columns=columns,
                on_bad_lines=on_bad_lines,
                num_shards=num_shards,
                row_group_size=row_group_size,
                force=force,
                dataset=dataset,
                encoding=encoding,
                yambda=yambda if fmt == "yambda" else None,
                engine=engine,
                memory=memory,
                workers=workers,
            )
    except BaseException:
        for folder in made:  # the folders made for the output, if still empty
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def check_output(output: str | Path) -> None:
    """Refuse an ``output`` that ``prepare`` must not replace (a file, a folder that is not a
    prepared dataset) or cannot write to, before any input is read (or downloaded)."""
    shown = str(output)
    if "://" in shown:
        raise DataError(
            f"{shown}: --output must be a local folder (a remote prepared folder is not written "
            "yet): prepare locally, then copy the folder, e.g. with fsspec or `aws s3 sync`; "
            "training reads it from any fsspec URL"
        )
    output = Path(os.path.abspath(output))
    if output == output.parent:
        raise DataError(f"{shown}: cannot write a prepared folder in place of the root folder")
    if output.exists() and not (is_prepared(output) or _is_empty_dir(output)):
        what = "a folder" if output.is_dir() else "a file"
        raise DataError(
            f"{shown}: {what} that is not a prepared dataset (no meta.json with a format "
            "version) is there; give another --output, or remove it yourself"
        )
    folder = output.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DataError(f"{folder}: cannot write here: Permission denied or read-only")


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not any(path.iterdir())
    except OSError:
        return False


def _prepare_locked(
    *,
    input_path: str,
    fmt: str,
    output: Path,
    shown: str,
    options: ProtocolOptions,
    columns: dict[str, str] | None,
    on_bad_lines: str,
    num_shards: int,
    row_group_size: int,
    force: bool,
    dataset: str | None,
    encoding: str,
    yambda: YambdaOptions | None,
    engine: str,
    memory: int,
    workers: int | None,
) -> dict:
    started = time.perf_counter()
    files = list_inputs(input_path, parquet=fmt in PARQUET_FORMATS)
    fingerprint = files_fingerprint(files)
    settings = {
        "format": fmt,
        "columns": columns,
        "on_bad_lines": on_bad_lines,
        "num_shards": num_shards,
        "row_group_size": row_group_size,
        **options.to_dict(),
    }
    if codecs.lookup(encoding).name != "utf-8":
        settings["encoding"] = encoding  # absent for UTF-8: older folders stay up to date
    if yambda is not None:
        settings["yambda"] = yambda.to_dict()
    previous = _existing_meta(output)
    prepared = is_prepared(output)
    if prepared and not force:
        source = previous.get("source") or {}
        if source.get("fingerprint") == fingerprint and previous.get("options") == settings:
            log.info("%s is up to date (same input files and options); nothing to do", shown)
            return previous
    chosen = choose_engine(engine, files, memory)
    _remove_leftovers(output)
    spill = output.parent / f".{output.name}.spill-{uuid.uuid4().hex[:8]}"
    try:
        if chosen == "memory":
            raw = read_many(
                [f.url for f in files],
                fmt,
                columns=columns,
                on_bad_lines=on_bad_lines,
                encoding=encoding,
                yambda=yambda,
            )
            digest, has_ts = raw.sha256, raw.ts is not None
            raw_rows, skipped = raw.raw_rows, raw.skipped_rows
        else:
            digest = fingerprint
        if prepared and not force:
            source = previous.get("source") or {}
            if source.get("sha256") == digest and previous.get("options") == settings:
                log.info("%s is up to date (same input and options); nothing to do", shown)
                return previous
            raise DataError(
                f"{shown}: already exists with other input or options; use --force to replace it"
            )
        if chosen == "memory":
            prep = apply_protocol(raw, options)
            del raw
            stats = table2_stats(prep)
            stage, shards = _staged(
                output, shown, lambda s: _write_memory(prep, s, num_shards, row_group_size)
            )
        else:
            stage, result = _staged(
                output,
                shown,
                lambda s: _run_out_of_core(
                    files=files,
                    fmt=fmt,
                    columns=columns,
                    yambda=yambda,
                    on_bad_lines=on_bad_lines,
                    encoding=encoding,
                    options=options,
                    num_shards=num_shards,
                    row_group_size=row_group_size,
                    spill=spill,
                    memory=memory,
                    workers=workers,
                    source=str(input_path),
                    out=s,
                ),
                what="the prepared folder or its spill",
            )
            stats, shards = result.stats(), result.shards
            raw_rows, skipped, has_ts = result.raw_rows, result.skipped_rows, result.has_timestamps
        meta = {
            "format_version": FORMAT_VERSION,
            "dataset": dataset,
            "source": {
                "path": str(input_path),
                "sha256": digest,
                "fingerprint": fingerprint,
                "files": len(files),
                "bytes": total_size(files),
                "raw_rows": raw_rows,
                "skipped_rows": skipped,
                "has_timestamps": has_ts,
            },
            "options": settings,
            "stats": stats,
            "engine": chosen,
            "shards": shards,
        }
        return _publish(output, shown, meta, started, stage)
    finally:
        _remove_tree(spill)


def choose_engine(engine: str, files: list, memory: int) -> str:
    """``auto``: out-of-core when the input's bytes times ``AUTO_FACTOR`` exceed the memory
    limit (the in-memory engine holds ~10-15x a Parquet input's size), else in memory."""
    if engine != "auto":
        return engine
    return "out-of-core" if total_size(files) * AUTO_FACTOR > memory else "memory"


def _write_memory(prep: Prepared, stage: Path, num_shards: int, row_group_size: int) -> list:
    write_items(prep.item_ids, prep.item_counts, stage)
    return write_users(prep, stage, num_shards=num_shards, row_group_size=row_group_size)


def _run_out_of_core(*, files, fmt, spill: Path, memory: int, workers, out: Path, **kw):
    """The out-of-core engine into the staging folder ``out`` (its spill in ``spill``)."""
    from dist_tp.data import outofcore

    urls = [f.url for f in files]
    used = list((YAMBDA_COLUMNS if fmt == "yambda" else kw["columns"] or {}).values())
    file_rows = parquet_file_rows(urls, used) if fmt in PARQUET_FORMATS else None
    rows = sum(file_rows) if file_rows is not None else total_size(files) // 8 + 1
    spill.mkdir()
    plan = outofcore.plan(rows, memory, spill, workers)
    log.info(
        "out-of-core: %d files, ~%d rows, %d buckets, %d workers, memory limit %.1f GB",
        len(files),
        rows,
        plan.buckets,
        plan.workers,
        memory / 1e9,
    )
    res = outofcore.run(files=urls, file_rows=file_rows, fmt=fmt, out=out, plan_=plan, **kw)
    write_items(res.item_ids, res.item_counts, out)
    return res


def _remove_leftovers(output: Path) -> None:
    """Staging, spill and set-aside folders of runs killed before they cleaned up (the lock
    on ``output`` is held, so none of them is in use)."""
    for pattern in ("staging", "old", "spill"):
        for stale in output.parent.glob(f".{output.name}.{pattern}-*"):
            _remove_tree(stale)


def _staged(output: Path, shown: str, write, what: str = "the prepared folder"):
    """``write(stage)``'s result, ``stage`` a new staging folder beside ``output`` that it
    filled; the folder is removed on any error, and an OSError (a full disk, a folder made
    read-only) becomes one DataError naming ``output`` and ``what`` could not be written."""
    stage = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()
        return stage, write(stage)
    except OSError as exc:
        _remove_tree(stage)
        raise DataError(f"{shown}: cannot write {what}: {_os_reason(exc)}") from exc
    except BaseException:
        _remove_tree(stage)
        raise


def _publish(output: Path, shown: str, meta: dict, started: float, stage: Path) -> dict:
    """``meta.json`` into the filled staging folder, then the folder renamed into place (a
    previous folder there set aside and removed); nothing is left of it on an error."""
    try:
        meta["seconds"] = round(time.perf_counter() - started, 3)
        (stage / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if output.exists():  # a prepared folder (--force) or an empty one: move it aside
            trash = output.parent / f".{output.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output, trash)
            try:
                os.replace(stage, output)
            except BaseException:
                os.replace(trash, output)  # put the old folder back
                raise
            _remove_tree(trash)
        else:
            os.replace(stage, output)
    except OSError as exc:  # disk full, a folder made read-only meanwhile, ...
        _remove_tree(stage)
        raise DataError(f"{shown}: cannot write the prepared folder: {_os_reason(exc)}") from exc
    except BaseException:
        _remove_tree(stage)
        raise
    return meta


def _os_reason(exc: OSError) -> str:
    if exc.errno is not None and exc.strerror:
        return f"[Errno {exc.errno}] {exc.strerror}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _in_cli_process() -> bool:
    """Whether this process is the ``dist-tp`` command itself (its console script or
    ``python -m dist_tp``), not a Python program calling ``dist_tp.cli.main``."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name == "dist_tp.__main__"
    return os.path.basename(getattr(main, "__file__", None) or "").startswith("dist-tp")


def leave_if_cli(message: str | None, code: int) -> None:
    """In the ``dist-tp`` process, print ``message`` to stderr, flush, and end with ``code``
    at once: interpreter finalization is skipped, since pyarrow's reader threads can abort it
    ("terminate called without an active exception", exit 134 instead of ``code``; see
    ``dist_tp.parallel.distributed.leave``). Elsewhere (``main`` called in-process), return."""
    if not _in_cli_process():
        return
    if message is not None:
        print(message, file=sys.stderr)
    exit_now(code)
