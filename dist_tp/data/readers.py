"""Readers: raw interaction logs in their native layouts → one in-memory ``Interactions`` table.

Every reader takes a local path or any fsspec URL; ``.gz``/``.bz2``/``.zip``/``.xz`` are
decompressed transparently. Delimited text is parsed by pyarrow's multi-threaded CSV reader
(the fast path). When that parser rejects the input, a plain line-by-line pass finds the first
bad line so the error can name it — or, with ``on_bad_lines="skip"``, keeps the good lines.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
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
CSV_ALIASES: dict[str, dict[str, str]] = {
    # MovieLens 20M/25M/32M ratings.csv: header userId,movieId,rating,timestamp
    name: {"user": "userId", "item": "movieId", "timestamp": "timestamp"}
    for name in ("ml-20m", "ml-25m", "ml-32m")
}
YAMBDA_COLUMNS = {"user": "uid", "item": "item_id", "timestamp": "timestamp"}
YAMBDA_EVENTS = ("listen", "like", "dislike", "unlike", "undislike")
PARQUET_FORMATS = ("parquet", "yambda")
FORMATS = (*LAYOUTS, "amazon-json", "csv", *CSV_ALIASES, *PARQUET_FORMATS)


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


INT64 = (-(1 << 63), 1 << 63)
UINT64_END = 1 << 64
_INTEGER = re.compile(r"-?[0-9]+")
"""What pyarrow's integer parser accepts (no '+', no spaces): an all-integer id column."""


def to_utf8(data: bytes, path: str, encoding: str) -> bytes:
    """``data`` (in ``encoding``) as UTF-8 bytes, the readers' input. A byte that ``encoding``
    cannot decode is an error naming its line; UTF-8 itself is checked later, by field."""
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise DataError(f"--encoding: unknown encoding {encoding!r}") from None
    if name == "utf-8":
        return data
    try:
        return data.decode(name).encode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise _fail(path, line, f"byte 0x{data[exc.start]:02x} is not valid {encoding}") from None


def _decode_field(raw: bytes, name: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(_not_utf8(name, raw[exc.start])) from None


def _not_utf8(name: str, byte: int) -> str:
    return f"{name} is not valid UTF-8 (byte 0x{byte:02x}); give --encoding, e.g. latin-1"


def int_ids(values: list[int]) -> np.ndarray:
    """Exact integer ids: int64 when they fit, else uint64 when none is negative, else the
    Python integers themselves (an object array: still exact, still in integer order)."""
    if not values:
        return np.zeros(0, dtype=np.int64)
    low, high = min(values), max(values)
    if INT64[0] <= low and high < INT64[1]:
        return np.asarray(values, dtype=np.int64)
    if low >= 0 and high < UINT64_END:
        return np.asarray(values, dtype=np.uint64)
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _parse_int(text: str) -> int:
    # int() accepts '1_000' and surrounding spaces; the fast parser does not, so neither do we.
    if not text or not (text.isdigit() or (text[0] in "+-" and text[1:].isdigit())):
        raise ValueError(text)
    return int(text)


def _scan_text(
    data: bytes, path: str, layout: TextLayout, ncols: int, skip: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, int]:
    """Line-by-line parse: raise on the first bad line, or skip bad lines when ``skip``.
    Only the fields used are decoded (strictly, as UTF-8); integer ids are kept exactly."""
    users: list = []
    items: list = []
    ts_idx = layout.ts_index(ncols)
    times: list | None = [] if ts_idx is not None else None
    skipped = 0
    delimiter = layout.delimiter.encode()
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        raw = raw.rstrip(b"\r")
        if not raw:
            continue
        fields = raw.split(delimiter)
        try:
            shown = raw.decode("utf-8", errors="replace")[:80]
            if len(fields) != ncols:
                raise ValueError(
                    f"expected {_expected_fields(layout, ncols)} separated by "
                    f"{layout.separator_name}, got {shown!r}"
                )
            if layout.delimiter == ":" and any(fields[i] for i in (1, 3, 5)):
                raise ValueError(f"expected fields separated by '::', got {shown!r}")
            u = _decode_field(fields[layout.user], "user id")
            it = _decode_field(fields[layout.item], "item id")
            if layout.int_ids:
                for name, value in (("user id", u), ("item id", it)):
                    try:
                        _parse_int(value)
                    except ValueError:
                        raise ValueError(f"{name} {value!r} is not an integer") from None
                u, it = int(u), int(it)
            t = None
            if ts_idx is not None:
                text = _decode_field(fields[ts_idx], "timestamp")
                try:
                    t = _parse_int(text)
                except ValueError:
                    raise ValueError(f"timestamp {text!r} is not an integer") from None
                if not INT64[0] <= t < INT64[1]:
                    raise ValueError(f"timestamp {text!r} does not fit in 64 bits")
        except ValueError as exc:
            if not skip:
                raise _fail(path, lineno, str(exc)) from None
            skipped += 1
            continue
        users.append(u)
        items.append(it)
        if times is not None:
            times.append(t)
    if layout.int_ids:
        user, item = int_ids(users), int_ids(items)
    else:
        user, item = np.asarray(users, dtype=object), np.asarray(items, dtype=object)
    ts = None if times is None else np.asarray(times, dtype=np.int64)
    return user, item, ts, skipped


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


def read_text(
    path: str, fmt: str, *, on_bad_lines: str = "error", encoding: str = "utf-8"
) -> Interactions:
    """Read one of the delimited ``LAYOUTS`` formats."""
    layout = LAYOUTS[fmt]
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    data = to_utf8(data, path, encoding)
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
        user, item, ts, skipped = _scan_text(data, path, layout, ncols, on_bad_lines == "skip")
        return _finish(path, digest, user, item, ts, skipped=skipped)
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


def read_amazon_json(
    path: str, *, on_bad_lines: str = "error", encoding: str = "utf-8"
) -> Interactions:
    """JSON lines with ``reviewerID``, ``asin`` and ``unixReviewTime`` (Amazon 2014 reviews)."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    data = to_utf8(data, path, encoding)
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
            if not INT64[0] <= t < INT64[1]:
                raise ValueError(f"unixReviewTime {t} does not fit in 64 bits")
        except UnicodeDecodeError as exc:
            if on_bad_lines != "skip":
                raise _fail(path, lineno, _not_utf8("the line", line[exc.start])) from None
            skipped += 1
            continue
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


Where = Callable[[int], str]
"""``where(row)``: how an error names the input row ``row`` (0-based): ``file:line`` for a
csv, ``file: row N`` for Parquet."""


def _from_table(
    path: str,
    digest: str,
    table: pa.Table,
    columns: dict[str, str],
    where: Where,
    *,
    allow_empty: bool = False,
) -> Interactions:
    """Map a generic table's columns (``columns`` = {user, item[, timestamp]} → column name).
    Integer id columns stay exact integers (int64, or uint64 when an id is >= 2**63); any
    other id column is read as strings."""
    _check_columns(path, table, columns)
    if table.num_rows == 0 and not allow_empty:
        raise DataError(f"{path}: no interactions in the input")
    out = {}
    for role in ("user", "item"):
        col = table.column(columns[role])
        if col.null_count:
            bad = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
            raise DataError(f"{where(bad)}: empty {role} id")
        if pa.types.is_integer(col.type):
            values = col.to_numpy()
            if values.dtype == np.uint64 and len(values) and values.max() >= np.uint64(1 << 63):
                out[role] = values  # exact: cast to int64 these would wrap
            else:
                out[role] = values.astype(np.int64)
        else:
            out[role] = np.asarray(col.cast(pa.string()).to_pylist(), dtype=object)
    ts = None
    if "timestamp" in columns:
        col = table.column(columns["timestamp"])
        if pa.types.is_timestamp(col.type):
            col = col.cast(pa.timestamp("s")).cast(pa.int64())
        if pa.types.is_uint64(col.type) and not col.null_count and pc.max(col).as_py() >= 1 << 63:
            bad = int(np.flatnonzero(col.to_numpy() >= np.uint64(1 << 63))[0])
            raise DataError(f"{where(bad)}: timestamp {col[bad].as_py()} does not fit in 64 bits")
        if not pa.types.is_integer(col.type) or col.null_count:
            bad = _first_non_int(col)
            raise DataError(f"{where(bad)}: timestamp {col[bad].as_py()!r} is not an integer")
        ts = col.to_numpy().astype(np.int64)
    if allow_empty and not len(out["user"]):
        return Interactions(out["user"], out["item"], ts, path, digest, 0)
    return _finish(path, digest, out["user"], out["item"], ts)


def _check_columns(path: str, table: pa.Table, columns: dict[str, str]) -> None:
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


def _first_non_int(col: pa.ChunkedArray) -> int:
    for i, v in enumerate(col.to_pylist()):
        if v is None or (isinstance(v, str) and not v.lstrip("+-").isdigit()):
            return i
        if isinstance(v, float) and not v.is_integer():
            return i
        if isinstance(v, bytes):
            return i
    return 0


def read_csv_table(
    path: str, columns: dict[str, str], *, on_bad_lines: str = "error", encoding: str = "utf-8"
) -> Interactions:
    """A CSV file with a header row; ``columns`` names the user/item/timestamp columns.

    Column types are inferred, but an id column is never read through floats: one inferred as
    anything but integers or strings (float64 for ids >= 2**63, or '+5') is read again as
    strings, then kept as exact integers when every id is one, else as the strings."""
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    data = to_utf8(data, path, encoding)
    if not data.strip():
        raise DataError(f"{path}: the input is empty")
    skip = on_bad_lines == "skip"
    table, skipped = _parse_csv(path, data, skip, {})
    _check_columns(path, table, columns)
    ids = [columns["user"], columns["item"]]
    retype = {name: pa.string() for name in ids if not _integer_or_text(table.column(name).type)}
    if retype:
        table, skipped = _parse_csv(path, data, skip, retype)
    lines = _CsvLines(path, data, len(table.column_names))
    beyond: dict[str, np.ndarray] = {}
    for role in ("user", "item"):
        name = columns[role]
        if pa.types.is_binary(table.column(name).type):
            keep = _utf8_rows(table.column(name), f"{role} id", lines, skip)
            if not keep.all():
                skipped += int((~keep).sum())
                table, lines = table.filter(pa.array(keep)), lines.filtered(keep)
            col = table.column(name).cast(pa.string())
        elif name in retype:
            col = _exact_integers(table.column(name))
            if isinstance(col, np.ndarray):  # beyond 64 bits: set on the result below
                if table.column(name).null_count == 0:
                    beyond[role] = col
                continue
        else:
            continue
        table = table.set_column(table.column_names.index(name), name, col)
    result = _from_table(path, digest, table, columns, lines.where)
    for role, ids in beyond.items():
        setattr(result, role, ids)
    result.skipped_rows = skipped
    result.raw_rows += skipped
    return result


def _integer_or_text(kind: pa.DataType) -> bool:
    return (
        pa.types.is_integer(kind)
        or pa.types.is_string(kind)
        or pa.types.is_binary(kind)  # text that is not UTF-8: checked below
        or pa.types.is_null(kind)  # every value empty: reported below
    )


def _parse_csv(
    path: str, data: bytes, skip: bool, column_types: dict[str, pa.DataType]
) -> tuple[pa.Table, int]:
    """pyarrow's csv reader; a row with too few or too many fields names its line (or is
    skipped and counted when ``skip``)."""
    skipped = [0]
    bad: list[pacsv.InvalidRow] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        if skip:
            skipped[0] += 1
            return "skip"
        bad.append(row)  # pyarrow ignores exceptions raised here: report it below
        return "error"

    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(
                column_types=column_types, strings_can_be_null=bool(column_types)
            ),
        )
    except pa.ArrowInvalid as exc:
        if bad:
            row = bad[0]
            line = row.number if row.number is not None else _line_of(data, row.text)
            why = f"expected {row.expected_columns} fields, got {row.actual_columns}"
            raise _fail(path, line, f"{why}: {row.text[:80]!r}") from None
        raise DataError(f"{path}: {str(exc).splitlines()[0]}") from None
    return table, skipped[0]


def _utf8_rows(col: pa.ChunkedArray, name: str, lines: _CsvLines, skip: bool) -> np.ndarray:
    """Which rows of a binary column (pyarrow's type for text that is not UTF-8) are UTF-8:
    the first that is not is an error naming its line, unless ``skip``."""
    keep = np.ones(len(col), dtype=bool)
    for row, value in enumerate(col.to_pylist()):
        try:
            if value is not None:
                value.decode("utf-8")
        except UnicodeDecodeError as exc:
            if not skip:
                raise DataError(
                    f"{lines.where(row)}: {_not_utf8(name, value[exc.start])}"
                ) from None
            keep[row] = False
    return keep


def _exact_integers(col: pa.ChunkedArray) -> pa.ChunkedArray | np.ndarray:
    """A string id column as exact integers when every id is one: int64, else uint64, else
    (ids beyond 64 bits) :func:`int_ids`' Python integers; the strings when some id is not."""
    for kind in (pa.int64(), pa.uint64()):
        try:
            return col.cast(kind)
        except (pa.ArrowInvalid, OverflowError):
            pass
    values = col.to_pylist()
    if not all(v is None or _INTEGER.fullmatch(v) for v in values):
        return col
    return int_ids([int(v) for v in values if v is not None])


class _CsvLines:
    """Line numbers of a csv's data rows, found only when an error needs one (a row may span
    lines inside quotes; blank lines and rows pyarrow skipped are not rows)."""

    def __init__(self, path: str, data: bytes, fields: int, rows: np.ndarray | None = None):
        self.path, self.data, self.fields, self.rows = path, data, fields, rows
        self._starts: list[int] | None = None

    def filtered(self, keep: np.ndarray) -> _CsvLines:
        """The same lines for the table's rows where ``keep`` is true."""
        rows = np.flatnonzero(keep) if self.rows is None else self.rows[keep]
        return _CsvLines(self.path, self.data, self.fields, rows)

    def line(self, row: int) -> int | str:
        if self._starts is None:
            text = io.StringIO(self.data.decode("utf-8", errors="replace"), newline="")
            reader = csv.reader(text)
            next(reader, None)  # the header
            starts, previous = [], reader.line_num
            for record in reader:
                if len(record) == self.fields:
                    starts.append(previous + 1)
                previous = reader.line_num
            self._starts = starts
        if self.rows is not None:
            row = int(self.rows[row])
        return self._starts[row] if row < len(self._starts) else "?"

    def where(self, row: int) -> str:
        return f"{self.path}:{self.line(row)}"


def _line_of(data: bytes, text: str) -> int | str:
    """The 1-based line of ``data`` whose text is ``text`` (pyarrow's multithreaded parser
    does not give row numbers); ``?`` if not found."""
    target = text.encode("utf-8", "replace")
    for number, line in enumerate(data.split(b"\n"), 1):
        if line.rstrip(b"\r") == target:
            return number
    return "?"


def read_parquet_table(
    path: str, columns: dict[str, str], *, encoding: str = "utf-8", **_: object
) -> Interactions:
    table, digest = _whole_parquet(path, encoding)
    return _from_table(path, digest, table, columns, lambda row: f"{path}: row {row + 1}")


def _whole_parquet(path: str, encoding: str) -> tuple[pa.Table, str]:
    """A Parquet file read whole, and the sha256 of its bytes."""
    if codecs.lookup(encoding).name != "utf-8":
        raise DataError("--encoding applies to the text formats, not to parquet")
    data = read_bytes(path)
    digest = hashlib.sha256(data).hexdigest()
    try:
        return pq.read_table(io.BytesIO(data), use_threads=False), digest
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc


@dataclass(frozen=True)
class YambdaOptions:
    """Which of Yambda's events count as interactions."""

    events: tuple[str, ...] = ("listen",)
    min_played_ratio: int = 50
    """A listen counts when ``played_ratio_pct`` is at least this (0 keeps every listen)."""

    def __post_init__(self) -> None:
        unknown = [e for e in self.events if e not in YAMBDA_EVENTS]
        if unknown or not self.events:
            raise DataError(
                f"--events: {unknown[0] if unknown else '(none)'!r} is not a Yambda event "
                f"(known: {', '.join(YAMBDA_EVENTS)})"
            )
        if not 0 <= self.min_played_ratio <= 100:
            raise DataError("--min-played-ratio must be in [0, 100]")

    def to_dict(self) -> dict:
        return {"events": list(self.events), "min_played_ratio": self.min_played_ratio}


def yambda_event_of(path: str, table_columns: list[str]) -> str | None:
    """The event type of a Yambda file without an ``event_type`` column, from its path
    (``listens.parquet``, ``likes/part-0.parquet``, ...); None when the file has the column."""
    if "event_type" in table_columns:
        return None
    for part in reversed(re.split(r"[/\\]", path)):
        stem = part.split(".")[0]
        for event in YAMBDA_EVENTS:
            if stem == f"{event}s":
                return event
    raise DataError(
        f"{path}: cannot tell its Yambda event type: no event_type column, and no "
        f"{'/'.join(e + 's' for e in YAMBDA_EVENTS)} in its path"
    )


def yambda_rows(table: pa.Table, path: str, opts: YambdaOptions) -> pa.Table:
    """The rows of a Yambda table that count: its event is one of ``opts.events``, and a
    listen was played to at least ``opts.min_played_ratio`` percent. Adds ``_row`` (the
    row's index in ``table``) so errors can name the original row."""
    table = table.append_column("_row", pa.array(np.arange(table.num_rows, dtype=np.int64)))
    event = yambda_event_of(path, table.column_names)
    if event is None:
        kinds = table.column("event_type").cast(pa.string())
        is_listen = pc.equal(kinds, "listen")
        keep = pc.is_in(kinds, value_set=pa.array(list(opts.events)))
    else:
        if event not in opts.events:
            return table.slice(0, 0)
        is_listen = pa.scalar(event == "listen")
        keep = pa.scalar(True)
    if "listen" in opts.events and opts.min_played_ratio > 0:
        if "played_ratio_pct" in table.column_names:
            played = pc.greater_equal(table.column("played_ratio_pct"), opts.min_played_ratio)
            keep = pc.and_(keep, pc.or_(pc.invert(is_listen), pc.fill_null(played, False)))
        elif event == "listen":
            raise DataError(f"{path}: listens without a played_ratio_pct column")
    if isinstance(keep, pa.Scalar):
        return table
    return table.filter(keep)


def parquet_batches(
    path: str,
    fmt: str,
    columns: dict[str, str] | None,
    yambda: YambdaOptions | None,
    batch_rows: int,
):
    """Stream a Parquet file in batches of at most ``batch_rows`` rows: yields
    ``(rows, Interactions)`` where ``rows`` are the batch rows' indices in the file (the
    rows kept by Yambda's event filter), the same checks as the whole-file reader."""
    columns = YAMBDA_COLUMNS if fmt == "yambda" else (columns or {})
    try:
        with open_parquet(path) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            _check_columns(path, pa.table({n: [] for n in names}), columns)
            wanted = list(dict.fromkeys(columns.values()))
            if fmt == "yambda":
                extra = ["event_type", "played_ratio_pct"]
                wanted += [n for n in extra if n in names]
            start = 0
            for batch in pf.iter_batches(batch_size=batch_rows, columns=wanted, use_threads=False):
                table = pa.Table.from_batches([batch])
                if fmt == "yambda":
                    table = yambda_rows(table, path, yambda or YambdaOptions())
                    rows = table.column("_row").to_numpy() + start
                else:
                    rows = np.arange(start, start + table.num_rows, dtype=np.int64)
                start += batch.num_rows
                if table.num_rows == 0:
                    continue
                where = _row_namer(path, rows)
                yield rows, _from_table(path, "", table, columns, where, allow_empty=True)
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path}: not a readable parquet file: {exc}") from exc


def open_parquet(path: str):
    """A seekable handle on a Parquet file: streamed from its filesystem, or decompressed
    into memory when the file itself is compressed (``ratings.parquet.gz``)."""
    if path.endswith((".gz", ".bz2", ".xz", ".zip", ".zst")):
        return io.BytesIO(read_bytes(path))
    return fsspec.open(path, "rb")


def parquet_file_rows(paths: list[str], columns: list[str]) -> list[int]:
    """Rows per Parquet file, from the footers; a DataError names two files whose
    ``columns`` differ in type (or one lacks)."""
    rows, first = [], None
    for path in paths:
        try:
            with open_parquet(path) as handle:
                meta = pq.ParquetFile(handle).metadata
                schema = meta.schema.to_arrow_schema()
        except FileNotFoundError as exc:
            raise DataError(f"{path}: file not found") from exc
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{path}: not a readable parquet file: {exc}") from exc
        types = {name: schema.field(name).type for name in schema.names if name in columns}
        if first is None:
            first = (path, types)
        else:
            for name in columns:
                if first[1].get(name) != types.get(name):
                    raise DataError(
                        f"{path}: its schema differs from {first[0]}'s: column {name!r} is "
                        f"{types.get(name, 'absent')} here and "
                        f"{first[1].get(name, 'absent')} there"
                    )
        rows.append(meta.num_rows)
    return rows


def _row_namer(path: str, rows: np.ndarray) -> Where:
    return lambda r: f"{path}: row {int(rows[r]) + 1}"


def read_yambda(
    path: str, yambda: YambdaOptions | None = None, *, encoding: str = "utf-8", **_: object
) -> Interactions:
    """One Yambda Parquet file (flat schema: uid, item_id, timestamp, and event_type or an
    event named by the file, played_ratio_pct for listens), filtered to the chosen events."""
    table, digest = _whole_parquet(path, encoding)
    _check_columns(path, table, YAMBDA_COLUMNS)
    table = yambda_rows(table, path, yambda or YambdaOptions())
    rows = table.column("_row").to_numpy()
    result = _from_table(
        path, digest, table, YAMBDA_COLUMNS, _row_namer(path, rows), allow_empty=True
    )
    result.raw_rows = int(rows.max()) + 1 if len(rows) else 0
    return result


def read_interactions(
    path: str,
    fmt: str,
    *,
    columns: dict[str, str] | None = None,
    on_bad_lines: str = "error",
    encoding: str = "utf-8",
    yambda: YambdaOptions | None = None,
) -> Interactions:
    """Read ``path`` in format ``fmt`` (one of ``FORMATS``); ``encoding``: of the text
    formats' bytes (``latin-1`` for an export that is not UTF-8)."""
    if on_bad_lines not in ("error", "skip"):
        raise DataError(f"--on-bad-lines must be 'error' or 'skip', got {on_bad_lines!r}")
    if fmt in CSV_ALIASES:
        fmt, columns = "csv", {**CSV_ALIASES[fmt], **(columns or {})}
    readers: dict[str, Callable[..., Interactions]] = {
        "amazon-json": read_amazon_json,
        "csv": lambda p, **kw: read_csv_table(p, columns or {}, **kw),
        "parquet": lambda p, **kw: read_parquet_table(p, columns or {}, **kw),
        "yambda": lambda p, **kw: read_yambda(p, yambda, **kw),
    }
    if fmt in LAYOUTS:
        return read_text(path, fmt, on_bad_lines=on_bad_lines, encoding=encoding)
    if fmt in readers:
        return readers[fmt](path, on_bad_lines=on_bad_lines, encoding=encoding)
    raise DataError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")


def read_many(
    paths: list[str],
    fmt: str,
    *,
    columns: dict[str, str] | None = None,
    on_bad_lines: str = "error",
    encoding: str = "utf-8",
    yambda: YambdaOptions | None = None,
) -> Interactions:
    """Read several files of one format as one log, rows in the order of ``paths``: their
    ids must be of one kind (all integers or all text), else a DataError names two files.
    ``sha256`` is the single file's content hash, or a hash of the files' content hashes."""
    parts = [
        read_interactions(
            p, fmt, columns=columns, on_bad_lines=on_bad_lines, encoding=encoding, yambda=yambda
        )
        for p in paths
    ]
    if len(parts) == 1:
        if not len(parts[0].user):
            raise DataError(f"{paths[0]}: no interactions in the input (after the event filter)")
        return parts[0]
    first = parts[0]
    for part in parts[1:]:
        for role in ("user", "item"):
            a, b = getattr(first, role), getattr(part, role)
            if (a.dtype == object) != (b.dtype == object):
                raise DataError(
                    f"{part.source}: its {role} ids are "
                    f"{'text' if b.dtype == object else 'integers'} but those of "
                    f"{first.source} are {'text' if a.dtype == object else 'integers'}"
                )
        if (first.ts is None) != (part.ts is None):
            raise DataError(
                f"{part.source}: {'no' if part.ts is None else 'a'} timestamp column, unlike "
                f"{first.source}"
            )
    if not sum(len(p.user) for p in parts):
        raise DataError(f"{paths[0]}: no interactions in the {len(paths)} files")

    def joined(role: str) -> np.ndarray:
        arrays = [getattr(p, role) for p in parts]
        if any(a.dtype == np.uint64 for a in arrays) and not all(
            a.dtype == np.uint64 for a in arrays
        ):
            return np.concatenate([a.astype(object) for a in arrays])
        return np.concatenate(arrays)

    digest = hashlib.sha256("".join(p.sha256 for p in parts).encode()).hexdigest()
    return Interactions(
        joined("user"),
        joined("item"),
        None if first.ts is None else np.concatenate([p.ts for p in parts]),
        f"{paths[0]} (+{len(paths) - 1} files)",
        digest,
        sum(p.raw_rows for p in parts),
        sum(p.skipped_rows for p in parts),
    )
