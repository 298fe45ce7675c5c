"""Synthetic industrial-like interaction logs: long-tailed users, Zipf items, sequential signal.

:func:`synthesize` writes a folder of parquet files (``generic``: ``user``/``item``/
``timestamp`` rows; ``yambda``: Yandex Yambda's flat ``listens``/``likes`` schema) and a
``synth.json`` summary. The model, per user:

* **activity** — ``n_u`` from a Lomax (Pareto-II) tail of index ``user_exponent``, at least 1
  when ``events >= users``, scaled so that the total is exactly ``events``;
* **items** — popularity of the item of rank ``r`` ∝ ``r ** -item_exponent`` (ranks mapped to
  ids by a seeded permutation); every item belongs to one of ``clusters`` latent clusters, and
  inside its cluster to a seeded cycle that defines its *planted successor*;
* **events** — a user's first event is a *jump*; then each event is the planted successor of
  the previous item (``p_next``), another item of the current cluster by popularity
  (``p_stay``), or a jump: to one of the user's 3 home clusters (80 %; one of them drifts to
  another cluster for the second half of the user's events) or to any cluster by popularity,
  and to an item of that cluster by popularity;
* **time** — a uniform start within 300 days, then gaps of about ``1 + Exp(mean 900 s)``
  (event ``j`` at ``start + j + floor(sum of j exponential gaps)``); strictly increasing per
  user. Generic: int64 unix seconds from 2024-01-01; yambda: uint32 seconds from 0;
* **yambda extras** — ``is_organic`` (70 % of jumps, 20 % of the rest), ``played_ratio_pct``
  (100 for 40 % of jumps and 55 % of the rest, else uniform in 1..99: about 3/4 are >= 50),
  ``track_length_seconds`` (a seeded lognormal per item, about 3.5 min); ``likes`` are the
  listens' rows liked with probability 8 % after a full listen, 1.5 % otherwise (about 5 %).

Everything is vectorised numpy over chunks of :data:`CHUNK_EVENTS` consecutive events of the
log (users in order, each user's events in time order), each chunk with its own
``SeedSequence(seed, spawn_key=(…, chunk))``: the same seed gives the same rows whatever
``workers`` and ``rows_per_file`` are, and the same files, byte for byte, whatever
``workers`` is. File ``part-N`` holds the log's rows ``[N * rows_per_file, ...)``; each of the
``workers`` processes takes a run of consecutive files (so at most one per file is busy).
A user longer than a chunk is cut at the chunk borders: its time goes on through a Gamma draw
of each earlier piece's span, and each later piece starts with a jump. Memory is one chunk per
worker plus the item tables (a few arrays of ``items``) and the users' offsets (an array of
``users``); nothing of size ``events``.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import pickle
import queue
import shutil
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dist_tp.data.errors import DataError

log = logging.getLogger(__name__)

SCHEMAS = ("generic", "yambda")
CHUNK_EVENTS = 500_000  # events per generated chunk: fixed, so content never depends on it
ROW_GROUP = 1_000_000  # rows per parquet row group
USER_BLOCK = 4096  # users per seeded block of per-user attributes (start time, home clusters)
HOME_CLUSTERS = 3
P_HOME = 0.8  # a jump goes to a home cluster with this probability
GAP_MEAN = 900.0  # seconds, mean of the exponential part of a gap
SPAN_SECONDS = 300 * 86_400  # users start uniformly within this many seconds
EPOCH = 1_704_067_200  # 2024-01-01T00:00:00Z, the generic schema's time origin
UINT32_MAX = 2**32 - 1
LIKE_P_FULL, LIKE_P_PARTIAL = 0.08, 0.015  # yambda: P(like) after a full / partial listen

# spawn_key tags: each stream of random numbers has its own
_ITEMS, _ACTIVITY, _USERS, _CHUNK, _SPAN, _TRACKS = 1, 2, 3, 4, 5, 6

GENERIC = pa.schema([("user", pa.int64()), ("item", pa.int64()), ("timestamp", pa.int64())])
LIKES = pa.schema(
    [
        ("uid", pa.uint32()),
        ("timestamp", pa.uint32()),
        ("item_id", pa.uint32()),
        ("is_organic", pa.uint8()),
    ]
)
LISTENS = pa.schema(
    [*LIKES, ("played_ratio_pct", pa.uint16()), ("track_length_seconds", pa.uint32())]
)
# integers only: delta encoding is about twice as fast to write as dictionary + zstd here,
# and as small
_PARQUET = {"compression": "zstd", "use_dictionary": False, "write_statistics": True}


@dataclass(frozen=True)
class SynthOptions:
    """What :func:`synthesize` generates; see the module docstring for the model."""

    events: int  # total events to write (exact)
    users: int
    items: int
    seed: int = 0
    schema: str = "generic"  # "generic" | "yambda"
    item_exponent: float = 1.1  # Zipf exponent of item popularity, p(rank r) ∝ r^-s
    user_exponent: float = 1.5  # Lomax tail index of user activity; smaller = heavier tail
    clusters: int | None = None  # latent item clusters; default round(sqrt(items)) in [8, 4096]
    p_next: float = 0.3  # P(next event = planted successor of the previous item)
    p_stay: float = 0.5  # P(next event = another item of the same cluster, by popularity)
    rows_per_file: int = 5_000_000
    workers: int | None = None  # processes; default os.cpu_count()

    def num_clusters(self) -> int:
        if self.clusters is not None:
            return int(self.clusters)
        return min(self.items, int(np.clip(round(math.sqrt(self.items)), 8, 4096)))

    def num_workers(self) -> int:
        return int(self.workers) if self.workers is not None else (os.cpu_count() or 1)


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x: object) -> bool:
    return _is_int(x) or (isinstance(x, (float, np.floating)) and math.isfinite(x))


def validate(options: SynthOptions) -> None:
    """Raise :class:`DataError` (one line naming the option) for options that cannot work."""
    o = options
    for name, value in (("events", o.events), ("users", o.users), ("items", o.items)):
        if not _is_int(value) or value < 1:
            raise DataError(f"--{name} must be an integer >= 1 (got {value!r})")
    if not _is_int(o.seed) or o.seed < 0:
        raise DataError(f"--seed must be an integer >= 0 (got {o.seed!r})")
    if o.schema not in SCHEMAS:
        raise DataError(f"--schema must be one of {', '.join(SCHEMAS)} (got {o.schema!r})")
    if not _is_real(o.item_exponent) or o.item_exponent < 0:
        raise DataError(f"--item-exponent must be a number >= 0 (got {o.item_exponent!r})")
    if not _is_real(o.user_exponent) or o.user_exponent <= 0:
        raise DataError(f"--user-exponent must be a number > 0 (got {o.user_exponent!r})")
    if o.clusters is not None and (not _is_int(o.clusters) or not 1 <= o.clusters <= o.items):
        raise DataError(f"--clusters must be an integer in [1, --items] (got {o.clusters!r})")
    for name, value in (("p-next", o.p_next), ("p-stay", o.p_stay)):
        if not _is_real(value) or not 0 <= value <= 1:
            raise DataError(f"--{name} must be a number in [0, 1] (got {value!r})")
    if o.p_next + o.p_stay > 1:
        raise DataError(f"--p-next + --p-stay must be <= 1 (got {o.p_next + o.p_stay:g})")
    if not _is_int(o.rows_per_file) or o.rows_per_file < 1:
        raise DataError(f"--rows-per-file must be an integer >= 1 (got {o.rows_per_file!r})")
    if o.workers is not None and (not _is_int(o.workers) or o.workers < 1):
        raise DataError(f"--workers must be an integer >= 1 (got {o.workers!r})")
    if o.schema == "yambda":
        for name, value in (("users", o.users), ("items", o.items)):
            if value > UINT32_MAX + 1:
                raise DataError(f"--{name} must be <= 2**32 for --schema yambda (uint32 ids)")


def _seq(seed: int, tag: int, index: int = 0) -> np.random.SeedSequence:
    return np.random.SeedSequence(seed, spawn_key=(tag, index))


# ---------------------------------------------------------------------------------------------
# The world: users' activity, the item tables (built once, shared by the workers)


def user_counts(options: SynthOptions) -> np.ndarray:
    """``[users]`` int64 events per user: Lomax(``user_exponent``) shares of the events, at
    least 1 each when ``events >= users``; sums to ``events`` exactly."""
    o = options
    u = np.random.default_rng(_seq(o.seed, _ACTIVITY)).random(o.users)
    z = -np.log1p(-u) / o.user_exponent  # Lomax(a) = expm1(Exp / a); in logs, no overflow
    with np.errstate(divide="ignore"):
        log_x = np.where(z > 30, z, np.log(np.expm1(np.minimum(z, 30))))
    weight = np.exp(log_x - log_x.max())
    floor = 1 if o.events >= o.users else 0
    rest = o.events - floor * o.users
    # cumulative rounding: each user gets its share rounded down or up, the total exactly
    cum = np.cumsum(weight * (rest / weight.sum()))
    cum[-1] = rest
    ends = np.rint(cum).astype(np.int64)
    return np.diff(ends, prepend=0) + floor


def _alias_tables(
    w: np.ndarray, cluster_of_slot: np.ndarray, start: np.ndarray, size: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Walker alias tables for drawing a slot by weight ``w`` within its cluster, built for all
    clusters at once (slots grouped by cluster): ``(prob float32, alias int32)``. Draw: slot
    ``j = start[c] + floor(u * size[c])``, kept when ``frac(u * size[c]) < prob[j]``, else
    ``alias[j]``.

    The sweeping construction (light items paired in order with the current heavy item, a
    heavy item turning light when spent) written with prefix sums: light ``k`` goes to the
    first heavy whose cumulative surplus exceeds the deficits before ``k``; a heavy ends with
    ``1 + its cumulative surplus - the deficits of the lights before it was spent``."""
    n = len(w)
    totals = np.bincount(cluster_of_slot, weights=w, minlength=len(size))
    a = w * (size / np.where(totals > 0, totals, 1))[cluster_of_slot]  # mean 1 per cluster
    light = a < 1
    lights, heavies = np.flatnonzero(light), np.flatnonzero(~light)
    deficit = np.concatenate(([0.0], np.cumsum(1 - a[lights])))  # deficits before light k
    surplus = np.cumsum(a[heavies] - 1)  # surpluses up to heavy m, inclusive
    # each cluster's range of lights and heavies (slots are grouped by cluster)
    h_lo, h_hi = np.searchsorted(heavies, start[:-1]), np.searchsorted(heavies, start[1:])
    l_lo, l_hi = np.searchsorted(lights, start[:-1]), np.searchsorted(lights, start[1:])
    prob = np.ones(n, dtype=np.float64)
    alias = np.arange(n, dtype=np.int64)
    index = np.int32 if n < 2**31 else np.int64
    if len(heavies) == 0:  # all weights 0 (underflow): nothing is ever drawn from here
        return prob.astype(np.float32), alias.astype(index)

    c = cluster_of_slot[lights]
    m = np.searchsorted(surplus, deficit[:-1], side="right")
    has = h_hi[c] > h_lo[c]  # a cluster of lights only: float rounding of all-equal weights
    m = np.clip(m, h_lo[c], np.maximum(h_hi[c] - 1, h_lo[c]))
    prob[lights] = np.where(has, a[lights], 1.0)
    alias[lights] = np.where(has, heavies[np.minimum(m, len(heavies) - 1)], lights)

    c = cluster_of_slot[heavies]
    last = np.arange(len(heavies)) == h_hi[c] - 1
    k = np.clip(np.searchsorted(deficit, surplus, side="left"), l_lo[c], l_hi[c])
    prob[heavies] = np.where(last, 1.0, np.clip(1 + surplus - deficit[k], 0, 1))
    nxt = heavies[np.minimum(np.arange(1, len(heavies) + 1), len(heavies) - 1)]
    alias[heavies] = np.where(last, heavies, nxt)
    return prob.astype(np.float32), alias.astype(index)


@dataclass
class World:
    """What every chunk needs: options, users' offsets, the item and cluster tables."""

    options: SynthOptions
    offsets: np.ndarray  # [U+1] int64: user u's events are [offsets[u], offsets[u+1])
    item_of_slot: np.ndarray  # [I] items grouped by cluster, each cluster in its cycle order
    start: np.ndarray  # [C+1] int64: cluster c's slots are [start[c], start[c+1])
    size: np.ndarray  # [C] int64
    prob: np.ndarray  # [I] float32 alias threshold of a slot
    alias: np.ndarray  # [I] int32 alias slot
    cluster_prob: np.ndarray  # [C] float32 alias table of the clusters by popularity
    cluster_alias: np.ndarray  # [C] int32
    track_seconds: np.ndarray | None  # [I] uint32 by slot (yambda only)

    def draw_cluster(self, u: np.ndarray) -> np.ndarray:
        """Clusters by popularity for uniforms ``u`` in [0, 1)."""
        x = u * len(self.size)
        c = np.minimum(x.astype(np.int64), len(self.size) - 1)
        return np.where((x - c) < self.cluster_prob[c], c, self.cluster_alias[c])

    def draw_slot(self, cluster: np.ndarray, u: np.ndarray) -> np.ndarray:
        """A slot of each ``cluster`` by popularity, for uniforms ``u`` in [0, 1)."""
        size = self.size[cluster]
        x = u * size
        j = np.minimum(x.astype(np.int64), size - 1)
        slot = self.start[cluster] + j
        keep = (x - j) < self.prob[slot]
        return np.where(keep, slot, self.alias[slot])


def catalogue(options: SynthOptions) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(size [C], item_of_slot [I], weight [I] by slot)``. Slots are grouped by cluster,
    each cluster's in its cycle order; the item of a slot and its popularity rank are seeded
    permutations, the cluster sizes multinomial: every item in a uniformly random cluster."""
    o = options
    rng = np.random.default_rng(_seq(o.seed, _ITEMS))
    num, num_c = o.items, o.num_clusters()
    size = rng.multinomial(num, np.full(num_c, 1 / num_c)).astype(np.int64)
    item_of_slot = rng.permutation(num).astype(np.int32 if num < 2**31 else np.int64)
    weight = rng.permutation(np.arange(1, num + 1, dtype=np.float64) ** -o.item_exponent)
    return size, item_of_slot, weight


def build_world(options: SynthOptions) -> World:
    o = options
    counts = user_counts(o)
    offsets = np.zeros(o.users + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    del counts
    size, item_of_slot, w = catalogue(o)
    num, num_c = len(w), len(size)
    start = np.zeros(num_c + 1, dtype=np.int64)
    np.cumsum(size, out=start[1:])
    cluster_of_slot = np.repeat(
        np.arange(num_c, dtype=np.int32 if num_c < 2**31 else np.int64), size
    )
    prob, alias = _alias_tables(w, cluster_of_slot, start, size)
    popularity = np.bincount(cluster_of_slot, weights=w, minlength=num_c)
    one = np.zeros(num_c, dtype=np.int64)  # the clusters as one group
    cluster_prob, cluster_alias = _alias_tables(
        popularity, one, np.array([0, num_c]), one[:1] + num_c
    )
    del w, cluster_of_slot
    track = None
    if o.schema == "yambda":  # seconds, lognormal around 3.5 minutes
        rng = np.random.default_rng(_seq(o.seed, _TRACKS))
        track = (30 + rng.lognormal(np.log(180.0), 0.45, size=num)).astype(np.uint32)
    return World(
        options=o,
        offsets=offsets,
        item_of_slot=item_of_slot,
        start=start,
        size=size,
        prob=prob,
        alias=alias,
        cluster_prob=cluster_prob,
        cluster_alias=cluster_alias,
        track_seconds=track,
    )


def _user_attributes(world: World, users: np.ndarray) -> tuple[np.ndarray, ...]:
    """``(start second, home clusters [n, 3], drift cluster)`` of ``users`` (ascending), each
    from its seeded block of :data:`USER_BLOCK` users."""
    o = world.options
    blocks = np.unique(users // USER_BLOCK)
    starts, homes = [], []
    for b in blocks:
        rng = np.random.default_rng(_seq(o.seed, _USERS, int(b)))
        starts.append(rng.integers(0, SPAN_SECONDS, size=USER_BLOCK))
        homes.append(world.draw_cluster(rng.random((USER_BLOCK, HOME_CLUSTERS + 1))))
    where = np.searchsorted(blocks, users // USER_BLOCK) * USER_BLOCK + users % USER_BLOCK
    home = np.concatenate(homes)[where]
    return np.concatenate(starts)[where], home[:, :HOME_CLUSTERS], home[:, HOME_CLUSTERS]


def _piece_spans(world: World, user: int) -> tuple[np.ndarray, np.ndarray]:
    """A user cut by chunk borders: ``(first event, Gamma span in seconds)`` of each piece
    but the last (the span of ``L`` events' gaps, the one into the next piece included)."""
    lo, hi = int(world.offsets[user]), int(world.offsets[user + 1])
    cuts = np.arange((lo // CHUNK_EVENTS + 1) * CHUNK_EVENTS, hi, CHUNK_EVENTS, dtype=np.int64)
    bounds = np.concatenate(([lo], cuts, [hi]))
    rng = np.random.default_rng(_seq(world.options.seed, _SPAN, user))
    spans = rng.gamma(np.diff(bounds)[:-1].astype(np.float64), GAP_MEAN)
    return bounds[:-1], spans


def generate_chunk(world: World, k: int) -> dict[str, np.ndarray]:
    """Chunk ``k``: the log's events ``[k * CHUNK_EVENTS, ...)``, columns by schema."""
    o = world.options
    a = k * CHUNK_EVENTS
    b = min(a + CHUNK_EVENTS, o.events)
    n = b - a
    rng = np.random.default_rng(_seq(o.seed, _CHUNK, k))
    off = world.offsets
    users = np.arange(np.searchsorted(off, a, side="right") - 1, np.searchsorted(off, b))
    seg_lo, seg_hi = np.maximum(off[users], a), np.minimum(off[users + 1], b)
    keep = seg_hi > seg_lo
    users, seg_lo, seg_hi = users[keep], seg_lo[keep], seg_hi[keep]
    lens = seg_hi - seg_lo
    first = seg_lo - a  # local index of each user's first event here
    total = off[users + 1] - off[users]
    local_user = np.repeat(np.arange(len(users), dtype=np.int32), lens)
    j = np.arange(n, dtype=np.int64) - np.repeat(first - (seg_lo - off[users]), lens)
    begin, home, drift = _user_attributes(world, users)

    # event types; each piece of a user starts with a jump
    r = rng.random(n, dtype=np.float32)
    nxt = r < np.float32(o.p_next)
    jump = r >= np.float32(o.p_next + o.p_stay)
    jump[first] = True
    nxt[first] = False
    del r

    # jumps: a home cluster (one drifts for the second half of the user) or any, by popularity
    jumps = np.flatnonzero(jump)
    v = rng.random(len(jumps))
    to_home = v < P_HOME
    cl_jump = np.empty(len(jumps), dtype=np.int64)
    hj = jumps[to_home]
    h = (v[to_home] * (HOME_CLUSTERS / P_HOME)).astype(np.int64)
    uj = local_user[hj]
    late = (h == 0) & (2 * j[hj] >= total[uj])
    cl_jump[to_home] = np.where(late, drift[uj], home[uj, np.minimum(h, HOME_CLUSTERS - 1)])
    cl_jump[~to_home] = world.draw_cluster((v[~to_home] - P_HOME) / (1 - P_HOME))
    cluster = cl_jump[np.cumsum(jump) - 1]  # an event's cluster: that of the last jump
    del v, to_home, hj, h, uj, late, cl_jump, jumps

    # jumps and stays: an item of the cluster by popularity; next: k successors further
    own = ~nxt
    drawn = np.flatnonzero(own)
    slot_drawn = world.draw_slot(cluster[drawn], rng.random(len(drawn)))
    slot = np.empty(n, dtype=np.int64)
    slot[drawn] = slot_drawn
    follow = np.flatnonzero(nxt)
    if len(follow):
        base = (np.cumsum(own) - 1)[follow]
        c = cluster[follow]
        lo = world.start[c]
        slot[follow] = lo + (slot_drawn[base] - lo + (follow - drawn[base])) % world.size[c]
    del own, drawn, slot_drawn, follow, cluster
    item = world.item_of_slot[slot]

    # time: start + j + floor(cumulative exponential gaps); pieces of cut users via _piece_spans
    gaps = rng.standard_exponential(n, dtype=np.float32)
    closing = float(rng.standard_exponential())
    gaps[first] = 0
    tau = np.cumsum(gaps, dtype=np.float64)
    del gaps
    tau -= np.repeat(tau[first], lens)
    tau *= GAP_MEAN
    for i in {0, len(users) - 1}:
        cut_before, cut_after = seg_lo[i] > off[users[i]], seg_hi[i] < off[users[i] + 1]
        if not (cut_before or cut_after):
            continue
        piece_first, spans = _piece_spans(world, int(users[i]))
        p = int(np.searchsorted(piece_first, seg_lo[i], side="right")) - 1
        part = slice(int(first[i]), int(first[i] + lens[i]))
        if cut_after:  # stretch this piece's gaps (and the one into the next) to its span
            tau[part] *= spans[p] / (tau[part.stop - 1] + closing * GAP_MEAN)
        tau[part] += spans[:p].sum()
    origin = EPOCH if o.schema == "generic" else 0
    ts = np.repeat(begin + origin, lens) + j + tau.astype(np.int64)
    del tau

    uid = np.repeat(users, lens)
    if o.schema == "generic":
        return {"user": uid, "item": item.astype(np.int64), "timestamp": ts}
    if ts.max() > UINT32_MAX:
        raise DataError(
            f"--schema yambda: timestamps pass 2**32 - 1 seconds (user {int(uid[-1])}); "
            "give fewer --events per user or use --schema generic"
        )
    organic = rng.random(n, dtype=np.float32) < np.where(jump, 0.7, 0.2).astype(np.float32)
    full = rng.random(n, dtype=np.float32) < np.where(jump, 0.4, 0.55).astype(np.float32)
    partial = 1 + (rng.random(n, dtype=np.float32) * 99).astype(np.uint16)  # 1..99
    played = np.where(full, np.uint16(100), partial).astype(np.uint16)
    like_p = np.where(full, LIKE_P_FULL, LIKE_P_PARTIAL).astype(np.float32)
    liked = rng.random(n, dtype=np.float32) < like_p
    return {
        "uid": uid.astype(np.uint32),
        "timestamp": ts.astype(np.uint32),
        "item_id": item.astype(np.uint32),
        "is_organic": organic.astype(np.uint8),
        "played_ratio_pct": played,
        "track_length_seconds": world.track_seconds[slot],
        "_liked": liked,
    }


# ---------------------------------------------------------------------------------------------
# Writing: one task per file; each worker process takes a run of consecutive files


class _Sink:
    """One parquet file, written a row group of :data:`ROW_GROUP` rows at a time."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path, self.schema = path, schema
        self.parts: list[dict[str, np.ndarray]] = []
        self.buffered = self.rows = 0
        encoding = {f.name: "DELTA_BINARY_PACKED" for f in schema}
        self.writer = pq.ParquetWriter(path, schema, column_encoding=encoding, **_PARQUET)

    def add(self, columns: dict[str, np.ndarray]) -> None:
        self.parts.append(columns)
        self.buffered += len(next(iter(columns.values())))
        if self.buffered >= ROW_GROUP:
            self.flush()

    def flush(self) -> None:
        if not self.parts:
            return
        arrays = [
            pa.array(np.concatenate([p[f.name] for p in self.parts]), type=f.type)
            for f in self.schema
        ]
        write_table(self.writer, pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += self.buffered
        self.parts, self.buffered = [], 0

    def close(self) -> int:
        self.flush()
        self.writer.close()
        return self.rows


def write_table(writer: pq.ParquetWriter, table: pa.Table) -> None:
    """The one place rows reach disk (tests replace it to fail a write)."""
    writer.write_table(table, row_group_size=ROW_GROUP)


_WORLD: World | None = None
_STAGE: Path | None = None


def _init_worker(world: World, stage: Path) -> None:
    global _WORLD, _STAGE
    _WORLD, _STAGE = world, stage


def _write_file(task: tuple[int, int, int], cache: dict) -> tuple[int, int, int]:
    """Task ``(index, lo, hi)``: the log's events ``[lo, hi)`` into file ``index``;
    returns ``(index, rows, likes)``. ``cache`` keeps the last chunk made, for the next file
    when it shares that chunk."""
    index, lo, hi = task
    world, stage = _WORLD, _STAGE
    assert world is not None and stage is not None
    name = f"part-{index:05d}.parquet"
    yambda = world.options.schema == "yambda"
    sinks: list[_Sink] = []
    try:
        if yambda:
            sinks += [
                _Sink(stage / "listens" / name, LISTENS),
                _Sink(stage / "likes" / name, LIKES),
            ]
        else:
            sinks.append(_Sink(stage / name, GENERIC))
        for k in range(lo // CHUNK_EVENTS, (hi - 1) // CHUNK_EVENTS + 1):
            a = k * CHUNK_EVENTS
            part = slice(max(lo - a, 0), min(hi - a, CHUNK_EVENTS))
            if cache.get("k") != k:
                cache.clear()  # free it first
                cache.update(k=k, chunk=generate_chunk(world, k))
            columns = {key: col[part] for key, col in cache["chunk"].items()}
            if yambda:
                liked = columns.pop("_liked")
                sinks[1].add({f.name: columns[f.name][liked] for f in LIKES})
            sinks[0].add(columns)
        rows = [s.close() for s in sinks]
    finally:
        for s in sinks:
            s.writer.close()  # idempotent; frees the file on an error
    return index, rows[0], rows[1] if yambda else 0


def file_ranges(options: SynthOptions) -> list[tuple[int, int, int]]:
    """``(index, lo, hi)`` of each file: ``rows_per_file`` events each, the last fewer. Not a
    function of ``workers``: the same options give the same files, byte for byte, whatever
    the number of processes (which are busy at most one per file)."""
    o = options
    per = o.rows_per_file
    return [(i, lo, min(lo + per, o.events)) for i, lo in enumerate(range(0, o.events, per))]


def _check_output(output: Path, shown: str) -> None:
    if output == output.parent:
        raise DataError(f"{shown}: cannot write a log in place of the root folder")
    if os.path.lexists(output):
        try:
            empty = output.is_dir() and not output.is_symlink() and not any(output.iterdir())
        except OSError as exc:
            raise DataError(f"{shown}: cannot read it: {exc.strerror or exc}") from None
        if not empty:
            what = "a folder that is not empty" if output.is_dir() else "a file"
            raise DataError(f"{shown}: {what} is there; give another output, or remove it")


def _check_yambda_time(options: SynthOptions, offsets: np.ndarray) -> None:
    most = int(np.diff(offsets).max())
    expect = SPAN_SECONDS + most * (1 + GAP_MEAN) + 8 * GAP_MEAN * math.sqrt(most)
    if options.schema == "yambda" and expect > UINT32_MAX:
        raise DataError(
            f"--schema yambda: the most active user's {most} events would pass 2**32 - 1 "
            "seconds (uint32 timestamps); give fewer --events per user or use --schema generic"
        )


def synthesize(options: SynthOptions, output: str | Path) -> dict:
    """Write the log to ``output`` (a folder, absent or empty) and return its summary (also
    ``output/synth.json``): ``events`` (rows; yambda: listens), ``users`` (with >= 1 event),
    ``items`` (the catalogue), ``files`` (paths in ``output``), ``seconds``, ``options``;
    yambda adds ``likes``. Written into ``.<name>.staging-<id>`` beside ``output`` and renamed
    into place at the end; the staging folder goes on any error or interrupt."""
    started = time.perf_counter()
    validate(options)
    shown = str(output)
    output = Path(os.path.abspath(output))
    _check_output(output, shown)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{output.parent}: cannot write here: {exc.strerror or exc}") from None
    for stale in output.parent.glob(f".{output.name}.staging-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    world = build_world(options)
    _check_yambda_time(options, world.offsets)
    tasks = file_ranges(options)
    stage = output.parent / f".{output.name}.staging-{uuid.uuid4().hex[:8]}"
    try:
        stage.mkdir()
        if options.schema == "yambda":
            (stage / "listens").mkdir()
            (stage / "likes").mkdir()
        workers = min(options.num_workers(), len(tasks))
        results = _run(world, stage, tasks, workers, shown)
        prefix = "listens/" if options.schema == "yambda" else ""
        files = [f"{prefix}part-{i:05d}.parquet" for i, _, _ in tasks]
        if options.schema == "yambda":
            files += [f"likes/part-{i:05d}.parquet" for i, _, _ in tasks]
        rows = sum(r for _, r, _ in results)
        assert rows == options.events, (rows, options.events)
        summary = {
            "events": rows,
            "users": int(np.count_nonzero(np.diff(world.offsets))),
            "items": options.items,
            "schema": options.schema,
            "files": files,
            "seconds": round(time.perf_counter() - started, 3),
            "options": asdict(options),
        }
        if options.schema == "yambda":
            summary["likes"] = sum(likes for _, _, likes in results)
        (stage / "synth.json").write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(stage, output)  # onto an empty folder too
    except OSError as exc:
        shutil.rmtree(stage, ignore_errors=True)
        raise DataError(f"{shown}: cannot write the log: {exc.strerror or exc}") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    log.info(
        "%s: %d events of %d users in %d files, %.1f s",
        shown,
        summary["events"],
        summary["users"],
        len(files),
        summary["seconds"],
    )
    return summary


def _run(
    world: World, stage: Path, tasks: list[tuple[int, int, int]], workers: int, shown: str
) -> list[tuple[int, int, int]]:
    """Write the files, in this process (one worker) or in ``workers`` processes, each with a
    run of consecutive files (so a chunk shared by two files is mostly made once). A worker's
    error is raised here; a worker that dies (killed, out of memory) is a :class:`DataError`;
    on any error or interrupt the workers are ended."""
    if workers <= 1:
        _init_worker(world, stage)
        try:
            cache: dict = {}
            return [_write_file(t, cache) for t in tasks]
        finally:
            _init_worker(None, None)  # type: ignore[arg-type]
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    done = ctx.Queue()
    bounds = np.linspace(0, len(tasks), workers + 1).round().astype(int)
    # fork: the tables are shared with the workers, not pickled
    procs = [
        ctx.Process(target=_worker_main, args=(world, stage, tasks[lo:hi], done), daemon=True)
        for lo, hi in zip(bounds[:-1], bounds[1:])
    ]
    try:
        for p in procs:
            p.start()
        results = []
        while len(results) < len(tasks):
            try:
                kind, value = done.get(timeout=0.2)
            except queue.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise DataError(
                        f"{shown}: a worker process died (exit code {dead[0]}; "
                        "killed, or out of memory?)"
                    ) from None
                continue
            if kind == "error":
                raise value
            results.append(value)
        return sorted(results)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            if p.pid is not None:
                p.join()
        done.cancel_join_thread()


def _worker_main(world: World, stage: Path, tasks: list, done) -> None:
    _init_worker(world, stage)
    cache: dict = {}
    for task in tasks:
        try:
            done.put(("done", _write_file(task, cache)))
        except BaseException as exc:  # handed to the parent, which raises it
            try:
                pickle.dumps(exc)
            except Exception:
                exc = RuntimeError(f"{type(exc).__name__}: {exc}")
            done.put(("error", exc))
            return
