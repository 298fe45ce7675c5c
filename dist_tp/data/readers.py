"""Readers: raw interaction logs in their native layouts → one in-memory ``Interactions`` table.

Every reader takes a local path or any fsspec URL; ``.gz``/``.bz2``/``.zip``/``.xz`` are
decompressed transparently. Delimited text is parsed by pyarrow's multi-threaded CSV reader
(the fast path). When that parser rejects the input, a plain line-by-line pass finds the first
bad line so the error can name it — or, with ``on_bad_lines="skip"``, keeps the good lines.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError


@dataclass
class Interactions:
    """Raw interactions in input order. Ids are int64 or string arrays; ``ts`` may be None."""

    user: np.ndarray
    item: np.ndarray
    ts: np.ndarray | None
    source: str
    sha256: str
    raw_rows: int
    skipped_rows: int = 0


@dataclass(frozen=True)
class TextLayout:
    """A delimited text layout: which split columns hold user, item and timestamp."""

    delimiter: str
    ncols: tuple[int, ...]
    """Accepted numbers of split fields per line."""
    user: int
    item: int
    ts: int | None
    int_ids: bool
    separator_name: str
    """How the separator is written in error messages."""

    def ts_index(self, ncols: int) -> int | None:
        return self.ts if self.ts is not None and self.ts < ncols else None


# `::` is split on ':' so pyarrow can parse it: fields 1, 3, 5 must then be empty.
LAYOUTS: dict[str, TextLayout] = {
    "ml-1m": TextLayout(":", (7,), 0, 2, 6, True, "'::'"),
    "movietweetings": TextLayout(":", (7,), 0, 2, 6, True, "'::'"),
    "ml-100k": TextLayout("\t", (4,), 0, 1, 3, True, "TAB"),
    "amazon-csv": TextLayout(",", (4,), 0, 1, 3, False, "','"),
    "seq-txt": TextLayout(" ", (2, 3), 0, 1, 2, True, "one space"),
}
FORMATS = (*LAYOUTS, "amazon-json", "csv", "parquet")


def read_bytes(path: str) -> bytes:
    """Whole (decompressed) file content; a clear DataError when it cannot be read."""
    try:
        with fsspec.open(path, "rb", compression="infer") as f:
            return f.read()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (OSError, EOFError, ValueError) as exc:
        raise DataError(f"{path}: cannot read: {exc}") from exc


def _fail(path: str, line: int, why: str) -> DataError:
    return DataError(f"{path}:{line}: {why}")


def _parse_int(text: str) -> int:
    # int() accepts '1_000' and surrounding spaces; the fast parser does not, so neither do we.
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        raise ValueError(text)
    return int(text)


def _scan_text(
    data: bytes, path: str, layout: TextLayout, ncols: int, skip: bool
) -> tuple[list, list, list | None, int]:
    """Line-by-line parse: raise on the first bad line, or skip bad lines when ``skip``."""
    users: list = []
    items: list = []
    ts_idx = layout.ts_index(ncols)
    times: list | None = [] if ts_idx is not None else None
    skipped = 0
    text = data.decode("utf-8", errors="replace")
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.rstrip("\r")
        if not line:
            continue
        fields = line.split(layout.delimiter)
        try:
            if len(fields) != ncols:
                raise ValueError(
                    f"expected {_expected_fields(layout, ncols)} separated by "
                    f"{layout.separator_name}, got {line[:80]!r}"
                )
            if layout.delimiter == ":" and any(fields[i] for i in (1, 3, 5)):
                raise ValueError(f"expected fields separated by '::', got {line[:80]!r}")
            u, it = fields[layout.user], fields[layout.item]
            if layout.int_ids:
                for name, value in (("user id", u), ("item id", it)):
                    try:
                        _parse_int(value)
                    except ValueError:
                        raise ValueError(f"{name} {value!r} is not an integer") from None
                u, it = int(u), int(it)
            t = None
            if ts_idx is not None:
                try:
                    t = _parse_int(fields[ts_idx])
                except ValueError:
                    raise ValueError(f"timestamp {fields[ts_idx]!r} is not an integer") from None
        except ValueError as exc:
            if not skip:
                raise _fail(path, lineno, str(exc)) from None
            skipped += 1
            continue
        users.append(u)
        items.append(it)
        if times is not None:
            times.append(t)
    return users, items, times, skipped


def _expected_fields(layout: TextLayout, ncols: int) -> str:
    if layout.delimiter == ":":
        return "4 fields"
    return f"{ncols} fields"


def _first_line(data: bytes) -> str:
    for raw in data.split(b"\n", 64):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line:
            return line
    return ""


def read_text(path: str, fmt: str, *, on_bad_lines: str = "error") -> Interactions:
    """Read one of the delimited ``LAYOUTS`` formats."""
    layout = LAYOUTS[fmt]
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    first = _first_line(data)
    if not first:
        raise DataError(f"{path}: the input is empty")
    ncols = len(first.split(layout.delimiter))
    if ncols not in layout.ncols:
        ncols = layout.ncols[0]  # the scan below reports line 1 (or skips it)
    ts_idx = layout.ts_index(ncols)
    names = [f"f{i}" for i in range(ncols)]
    id_type = pa.int64() if layout.int_ids else pa.string()
    types = {names[layout.user]: id_type, names[layout.item]: id_type}
    if ts_idx is not None:
        types[names[ts_idx]] = pa.int64()
    if layout.delimiter == ":":
        types.update({names[i]: pa.string() for i in (1, 3, 5)})
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            read_options=pacsv.ReadOptions(column_names=names, block_size=1 << 24),
            parse_options=pacsv.ParseOptions(delimiter=layout.delimiter, quote_char=False),
            convert_options=pacsv.ConvertOptions(
                column_types=types, include_columns=list(types), strings_can_be_null=False
            ),
        )
        if layout.delimiter == ":" and _separator_fields_used(table, names):
            raise pa.ArrowInvalid("a single ':' where '::' was expected")
    except pa.ArrowInvalid:
        users, items, times, skipped = _scan_text(data, path, layout, ncols, on_bad_lines == "skip")
        dtype = np.int64 if layout.int_ids else object
        return _finish(
            path,
            digest,
            np.asarray(users, dtype=dtype),
            np.asarray(items, dtype=dtype),
            None if times is None else np.asarray(times, dtype=np.int64),
            skipped=skipped,
        )
    user = _column(table, names[layout.user], layout.int_ids)
    item = _column(table, names[layout.item], layout.int_ids)
    ts = None if ts_idx is None else _column(table, names[ts_idx], True)
    return _finish(path, digest, user, item, ts)


def _separator_fields_used(table: pa.Table, names: list[str]) -> bool:
    """'::' files are split on ':': the fields between the real ones must all be empty."""
    for name in (names[1], names[3], names[5]):
        col = table.column(name)
        if col.null_count != len(col) and pc.max(pc.utf8_length(col)).as_py():
            return True
    return False


def _column(table: pa.Table, name: str, as_int: bool) -> np.ndarray:
    col = table.column(name)
    if as_int:
        return col.to_numpy().astype(np.int64, copy=False)
    return np.asarray(col.to_pylist(), dtype=object)


def _finish(
    path: str,
    digest: str,
    user: np.ndarray,
    item: np.ndarray,
    ts: np.ndarray | None,
    *,
    skipped: int = 0,
) -> Interactions:
    if len(user) == 0:
        raise DataError(f"{path}: no interactions in the input")
    return Interactions(user, item, ts, path, digest, len(user) + skipped, skipped)


def read_amazon_json(path: str, *, on_bad_lines: str = "error") -> Interactions:
    """JSON lines with ``reviewerID``, ``asin`` and ``unixReviewTime`` (Amazon 2014 reviews)."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    users, items, times, skipped = [], [], [], 0
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            missing = [k for k in ("reviewerID", "asin", "unixReviewTime") if k not in rec]
            if missing:
                raise ValueError(f"missing key {missing[0]!r}")
            t = rec["unixReviewTime"]
            if isinstance(t, bool) or not isinstance(t, int):
                raise ValueError(f"unixReviewTime {t!r} is not an integer")
        except ValueError as exc:
            if on_bad_lines != "skip":
                raise _fail(path, lineno, str(exc)) from None
            skipped += 1
            continue
        users.append(str(rec["reviewerID"]))
        items.append(str(rec["asin"]))
        times.append(t)
    return _finish(
        path,
        digest,
        np.asarray(users, dtype=object),
        np.asarray(items, dtype=object),
        np.asarray(times, dtype=np.int64),
        skipped=skipped,
    )


def _from_table(path: str, digest: str, table: pa.Table, columns: dict[str, str]) -> Interactions:
    """Map a generic table's columns (``columns`` = {user, item[, timestamp]} → column name)."""
    for role in ("user", "item"):
        if role not in columns:
            raise DataError(f"{path}: --columns must map {role!r} (e.g. user=uid,item=iid)")
    unknown = set(columns) - {"user", "item", "timestamp"}
    if unknown:
        raise DataError(f"{path}: unknown --columns key {sorted(unknown)[0]!r}")
    for role, name in columns.items():
        if name not in table.column_names:
            raise DataError(
                f"{path}: no column {name!r} for {role} (columns: {', '.join(table.column_names)})"
            )
    if table.num_rows == 0:
        raise DataError(f"{path}: no interactions in the input")
    out = {}
    for role in ("user", "item"):
        col = table.column(columns[role])
        if pa.types.is_integer(col.type):
            out[role] = col.to_numpy().astype(np.int64)
        else:
            out[role] = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{path}: row {bad + 1}: empty {role} id")
    ts = None
    if "timestamp" in columns:
        col = table.column(columns["timestamp"])
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("s")).cast(pa.int64())
        if not pa.types.is_integer(col.type) or col.null_count:
            bad = _first_non_int(col)
            raise DataError(
                f"{path}: row {bad + 1}: timestamp {col[bad].as_py()!r} is not an integer"
            )
        ts = col.to_numpy().astype(np.int64)
    return _finish(path, digest, out["user"], out["item"], ts)


def _first_non_int(col: pa.ChunkedArray) -> int:
    for i, v in enumerate(col.to_pylist()):
        if v is None or (isinstance(v, str) and not v.lstrip("+-").isdigit()):
            return i
        if isinstance(v, float) and not v.is_integer():
            return i
    return 0


def read_csv_table(
    path: str, columns: dict[str, str], *, on_bad_lines: str = "error"
) -> Interactions:
    """A CSV file with a header row; ``columns`` names the user/item/timestamp columns."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    if not data.strip():
        raise DataError(f"{path}: the input is empty")
    skipped = [0]
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if on_bad_lines == "skip":
            skipped[0] += 1
            return "skip"
        bad.append(row)  # pyarrow ignores exceptions raised here: report it below
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
        )
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            line = row.number if row.number is not None else _line_of(data, row.text)
            why = f"expected {row.expected_columns} fields, got {row.actual_columns}"
            raise _fail(path, line, f"{why}: {row.text[:80]!r}") from None
        raise DataError(f"{path}: {exc}") from None
    result = _from_table(path, digest, table, columns)
    result.skipped_rows = skipped[0]
    result.raw_rows += skipped[0]
    return result


def _line_of(data: bytes, text: str) -> int | str:
    """The 1-based line of ``data`` whose text is ``text`` (pyarrow's multithreaded parser
    does not give row numbers); ``?`` if not found."""
    target = text.encode("utf-8", "replace")
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.rstrip(b"\r") == target:
            return number
    return "?"


def read_parquet_table(path: str, columns: dict[str, str], **_: object) -> Interactions:
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
    return _from_table(path, digest, table, columns)


def read_interactions(
    path: str,
    fmt: str,
    *,
    columns: dict[str, str] | None = None,
    on_bad_lines: str = "error",
) -> Interactions:
    """Read ``path`` in format ``fmt`` (one of ``FORMATS``)."""
    if on_bad_lines not in ("error", "skip"):
        raise DataError(f"--on-bad-lines must be 'error' or 'skip', got {on_bad_lines!r}")
    readers: dict[str, Callable[..., Interactions]] = {
        "amazon-json": read_amazon_json,
        "csv": lambda p, **kw: read_csv_table(p, columns or {}, **kw),
        "parquet": lambda p, **kw: read_parquet_table(p, columns or {}, **kw),
    }
    if fmt in LAYOUTS:
        return read_text(path, fmt, on_bad_lines=on_bad_lines)
    if fmt in readers:
        return readers[fmt](path, on_bad_lines=on_bad_lines)
    raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
