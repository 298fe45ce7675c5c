"""Throughput and peak memory of the synthetic log generator (``dist_tp.data.synth``).

    .venv/bin/python benchmarks/synth.py [--events 20000000] [--users 1000000]
        [--items 1000000] [--workers 2 1] [--schema generic] [--profile]

Each run is its own subprocess, so that its peak RSS is its own: the generating process's
``ru_maxrss`` (RUSAGE_SELF) and the largest of its workers' (RUSAGE_CHILDREN), both after
the run. Also the CPU seconds of the process tree (user + system, the start-up of Python
included): on a shared machine, wall time depends on the neighbours, CPU time much less.
``--profile`` prints where the time of 8 chunks goes (in-process, one worker).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {repo!r})
from dist_tp.data.synth import SynthOptions, synthesize
events, users, items, workers, schema, out = sys.argv[1:7]
options = SynthOptions(events=int(events), users=int(users), items=int(items),
                       workers=int(workers), schema=schema)
t0 = time.perf_counter()
summary = synthesize(options, out)
seconds = time.perf_counter() - t0
own = resource.getrusage(resource.RUSAGE_SELF)
kids = resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime
print(json.dumps({{"events": summary["events"], "seconds": seconds, "cpu_seconds": cpu,
                   "own_rss_mib": own.ru_maxrss / 1024, "worker_rss_mib": kids.ru_maxrss / 1024}}))
"""


def measure(events: int, users: int, items: int, workers: int, schema: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "log")
        args = [str(x) for x in (events, users, items, workers, schema, out)]
        done = subprocess.run(
            [sys.executable, "-c", CHILD.format(repo=str(REPO)), *args],
            check=True,
            capture_output=True,
            text=True,
        )
        size = sum(f.stat().st_size for f in Path(out).rglob("*.parquet"))
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["bytes_per_event"] = size / result["events"]
    return result


def profile(events: int, users: int, items: int, schema: str) -> None:
    import cProfile
    import pstats

    from dist_tp.data.synth import CHUNK_EVENTS, SynthOptions, build_world, generate_chunk

    options = SynthOptions(events=events, users=users, items=items, schema=schema, workers=1)
    world = build_world(options)
    chunks = min(8, -(-events // CHUNK_EVENTS))
    cProfile.runctx(
        "for k in range(chunks): generate_chunk(world, k)",
        globals(),
        {"chunks": chunks, "world": world, "generate_chunk": generate_chunk},
        "/tmp/synth.prof",
    )
    pstats.Stats("/tmp/synth.prof").sort_stats("tottime").print_stats(15)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000_000)
    parser.add_argument("--users", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--schema", default="generic", choices=["generic", "yambda"])
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        profile(args.events, args.users, args.items, args.schema)
        return
    print(f"{args.events:,} events, {args.users:,} users, {args.items:,} items, {args.schema}")
    for workers in args.workers:
        r = measure(args.events, args.users, args.items, workers, args.schema)
        print(
            f"workers={workers}: {r['seconds']:.2f} s, {r['events'] / r['seconds'] / 1e6:.2f}M "
            f"events/s; {r['cpu_seconds']:.2f} CPU s, "
            f"{r['events'] / r['cpu_seconds'] / 1e6:.2f}M events per CPU s; "
            f"peak RSS {r['own_rss_mib']:.0f} MiB (generating process), "
            f"{r['worker_rss_mib']:.0f} MiB (largest worker), "
            f"{r['bytes_per_event']:.2f} bytes/event on disk"
        )


if __name__ == "__main__":
    main()
