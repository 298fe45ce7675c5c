"""Preparing generated logs of 1M to 1B events: seconds, events/s, peak RSS, peak temp disk,
output size; the in-memory engine beside the out-of-core one where it fits; then one epoch
of ``UserStream`` over the largest output on 2 ranks.

    .venv/bin/python benchmarks/scale.py --sizes 1M 10M 100M 1B --work /tmp/scale

Logs come from ``dist-tp synth`` (1M users and 1M items from 100M events on; 1/100 of the
events below that) and are kept in ``--work`` for the next run; each ``prepare`` runs as its
own ``dist-tp`` process. Every 0.2 s the script sums the RSS of that process tree (the
engine's workers included) and the bytes under the output's spill folder (the staging folder
is the output itself, written once): the peaks of those sums are "peak RSS" and "peak temp
disk". The output's size is that of the prepared folder. ``--time-ordered``: each log file sorted by
timestamp first. ``--memory-max`` (default 10M):
the largest log the in-memory engine is also run on (it needs ~140 MB per million events).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
DIST_TP = [sys.executable, "-m", "dist_tp"]


def count(text: str) -> int:
    scale = {"K": 10**3, "M": 10**6, "B": 10**9}.get(text[-1:].upper(), 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def folder_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


class Watch:
    """Peak RSS of a process tree and peak bytes of the folders matching ``temp_glob``."""

    def __init__(self, proc: subprocess.Popen, parent: Path, temp_glob: str) -> None:
        self.proc, self.parent, self.temp_glob = proc, parent, temp_glob
        self.rss = self.disk = 0
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            try:
                tree = [root, *root.children(recursive=True)]
                rss = sum(p.memory_info().rss for p in tree if p.is_running())
            except psutil.Error:
                rss = 0
            self.rss = max(self.rss, rss)
            disk = sum(folder_bytes(p) for p in self.parent.glob(self.temp_glob))
            self.disk = max(self.disk, disk)
            time.sleep(0.2)


def run_watched(cmd: list[str], parent: Path, temp_glob: str) -> tuple[float, Watch, str]:
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watch = Watch(proc, parent, temp_glob)
    out, _ = proc.communicate()
    seconds = time.perf_counter() - started
    watch.thread.join()
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{out}")
    return seconds, watch, out


def synth(events: int, work: Path) -> Path:
    users = items = 10**6 if events >= 10**8 else max(events // 100, 1000)
    log = work / f"log-{events}"
    if not (log / "synth.json").exists():
        shutil.rmtree(log, ignore_errors=True)
        cmd = [*DIST_TP, "synth", "--events", str(events), "--users", str(users)]
        cmd += ["--items", str(items), "--seed", "0", "--output", str(log)]
        seconds, watch, _ = run_watched(cmd, work, "nothing")
        print(
            f"  synth {events:,} events: {seconds:.1f} s, {events / seconds / 1e6:.1f}M events/s,"
            f" peak RSS {watch.rss / 2**30:.2f} GiB, {folder_bytes(log) / 1e9:.2f} GB"
        )
    return log


def time_ordered(log: Path) -> Path:
    """A copy of ``log`` with each file's rows sorted by timestamp: users interleaved, as in
    a log written in time order (the generator writes each user's events together)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = log.with_name(log.name + "-by-time")
    if not (out / "done").exists():
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        for path in sorted(log.glob("*.parquet")):
            table = pq.read_table(path)
            table = table.take(pc.sort_indices(table, sort_keys=[("timestamp", "ascending")]))
            pq.write_table(table, out / path.name, compression="zstd", row_group_size=1 << 20)
        (out / "done").touch()
    return out


def prepare(log: Path, out: Path, engine: str, memory_limit: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [*DIST_TP, "prepare", "--input", str(log), "--format", "parquet"]
    cmd += ["--columns", "user=user,item=item,timestamp=timestamp", "--output", str(out)]
    cmd += ["--engine", engine, "--memory-limit", memory_limit]
    seconds, watch, _ = run_watched(cmd, out.parent, f".{out.name}.spill-*")
    meta = json.loads((out / "meta.json").read_text())
    return {
        "seconds": seconds,
        "rss": watch.rss,
        "temp": watch.disk,
        "output": folder_bytes(out),
        "interactions": meta["stats"]["interactions"],
        "raw": meta["source"]["raw_rows"],
    }


STREAM = r"""
import resource, sys, time
from dist_tp.data.stream import UserStream
rank, world, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
stream = UserStream(path, rank=rank, world_size=world, columns=["items"], batch_rows=1024)
t0, n, users = time.perf_counter(), 0, 0
for batch in stream:
    items = batch.column(batch.schema.get_field_index("items"))
    n += len(items.values)
    users += batch.num_rows
own = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(n, users, time.perf_counter() - t0, own * 1024)
"""


def stream(out: Path, world: int = 2) -> None:
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", STREAM, str(rank), str(world), str(out)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]
    results = [p.communicate()[0].split() for p in procs]
    wall = time.perf_counter() - started
    total = sum(int(r[0]) for r in results)
    print(
        f"stream {out.name}, {world} ranks, one epoch: {total:,} interactions in {wall:.1f} s "
        f"= {total / wall / 1e6:.1f}M interactions/s; peak RSS per rank "
        + ", ".join(f"{int(r[3]) / 2**20:.0f} MiB" for r in results)
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1M", "10M", "100M"])
    ap.add_argument("--work", default="/tmp/dist_tp-scale")
    ap.add_argument("--memory-limit", default="2GB")
    ap.add_argument("--memory-max", default="10M")
    ap.add_argument("--keep", action="store_true", help="keep the logs and outputs")
    ap.add_argument(
        "--time-ordered",
        action="store_true",
        help="each log file sorted by time (users interleaved)",
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{os.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB")
    for size in args.sizes:
        events = count(size)
        log = synth(events, work)
        if args.time_ordered:
            log = time_ordered(log)
        engines = ["out-of-core"] + (["memory"] if events <= count(args.memory_max) else [])
        for engine in engines:
            out = work / f"prepared-{events}-{engine}{'-by-time' if args.time_ordered else ''}"
            r = prepare(log, out, engine, args.memory_limit)
            rows.append((events, engine, r))
            print(
                f"  {events:>13,} {engine:<11} {r['seconds']:7.1f} s "
                f"{r['raw'] / r['seconds'] / 1e6:5.2f}M events/s  peak RSS "
                f"{r['rss'] / 2**30:5.2f} GiB  peak temp {r['temp'] / 1e9:6.2f} GB  output "
                f"{r['output'] / 1e9:6.2f} GB  ({r['interactions']:,} interactions kept)",
                flush=True,
            )
    print()
    print("| events | engine | seconds | events/s | peak RSS | peak temp disk | output | kept |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for events, engine, r in rows:
        print(
            f"| {events:,} | {engine} | {r['seconds']:.1f} | {r['raw'] / r['seconds'] / 1e6:.2f}M"
            f" | {r['rss'] / 2**30:.2f} GiB | {r['temp'] / 1e9:.2f} GB | {r['output'] / 1e9:.2f} GB"
            f" | {r['interactions']:,} |"
        )
    largest = max(count(s) for s in args.sizes)
    stream(work / f"prepared-{largest}-out-of-core{'-by-time' if args.time_ordered else ''}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
