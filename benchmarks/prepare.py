"""Throughput and peak memory of ``prepare`` and of the streaming reader.

    .venv/bin/python benchmarks/prepare.py [--rows 10000000] [--shared ../shared/data]

Each measurement runs in a fresh subprocess so its peak RSS is its own. Prints raw rows/s of
``prepare`` on the ML-1M part and on a generated long-tailed ``::`` file, and interactions/s
of ``UserStream`` over the generated prepared folder.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
mode, src, out = sys.argv[1:4]
from dist_tp.data.prepare import prepare
from dist_tp.data.stream import UserStream, to_sequences
t0 = time.perf_counter()
if mode == "prepare":
    meta = prepare(input_path=src, fmt="ml-1m", output=out, num_shards=8, row_group_size=4096)
    n = meta["source"]["raw_rows"]
else:
    # epoch 0 includes pyarrow's one-time start-up; epochs 1-3 are what training sees per epoch
    stream = UserStream(out, batch_rows=4096, columns=["user", "role", "is_head", "items"])
    times = []
    for epoch in range(4):
        stream.set_epoch(epoch)
        t0, n = time.perf_counter(), 0
        for batch in stream:
            n += len(to_sequences(batch).items)
        times.append(time.perf_counter() - t0)
seconds = time.perf_counter() - t0 if mode == "prepare" else sum(times[1:]) / 3
first = None if mode == "prepare" else times[0]
# VmHWM, not ru_maxrss: Linux keeps ru_maxrss across exec, so it would include the parent.
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
rss = int(hwm.split()[1]) / 1024
print(json.dumps({{"n": n, "seconds": seconds, "first": first, "rss_mib": rss}}))
"""


def generate(path: Path, rows: int, seed: int = 0) -> None:
    """A ``user::item::rating::timestamp`` file with long-tailed users and Zipf-like items."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    per_user = 1 + np.floor(5 * ((1 - rng.random(rows // 3)) ** (-1 / 1.5) - 1)).astype(np.int64)
    per_user = per_user[np.cumsum(per_user) <= rows]
    users = np.repeat(np.arange(1, len(per_user) + 1), per_user)
    users = np.concatenate([users, np.full(rows - len(users), len(per_user) + 1)])
    items = np.minimum(rng.zipf(1.1, rows), 200_000)
    ts = 978_300_000 + rng.integers(0, 10**7, rows)
    cols = [pa.array(x).cast(pa.string()) for x in (users, items, rng.integers(1, 6, rows), ts)]
    lines = pc.binary_join_element_wise(*cols, "::")
    with open(path, "wb") as f:
        for chunk in range(0, rows, 1_000_000):
            part = lines.slice(chunk, 1_000_000).to_pylist()
            f.write(("\n".join(part) + "\n").encode())


def run(mode: str, src: str, out: str) -> dict:
    code = CHILD.format(repo=str(REPO))
    res = subprocess.run(
        [sys.executable, "-c", code, mode, src, out], check=True, capture_output=True, text=True
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--shared", default=str(REPO.parent / "shared" / "data"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cases = []
        ml1m = Path(args.shared) / "ml-1m" / "partial" / "ratings.dat.gz"
        if ml1m.is_file():
            cases.append(("ML-1M part (gz)", str(ml1m)))
        synthetic = Path(tmp) / "synthetic.dat"
        t0 = time.perf_counter()
        generate(synthetic, args.rows)
        print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        cases.append((f"generated {args.rows / 1e6:g}M rows", str(synthetic)))
        print("| what | rows | seconds | rate | peak RSS |")
        print("| --- | --- | --- | --- | --- |")
        for i, (name, src) in enumerate(cases):
            out = f"{tmp}/out{i}"
            r = run("prepare", src, out)
            rate = r["n"] / r["seconds"]
            print(
                f"| prepare, {name} | {r['n']:,} raw | {r['seconds']:.2f} | "
                f"{rate / 1e6:.2f} M raw rows/s | {r['rss_mib']:.0f} MiB |"
            )
            r = run("stream", src, out)
            rate = r["n"] / r["seconds"]
            print(
                f"| stream, {name} (epochs 2-4; first epoch {r['first']:.2f}s) | "
                f"{r['n']:,} interactions | {r['seconds']:.3f} | "
                f"{rate / 1e6:.2f} M interactions/s | {r['rss_mib']:.0f} MiB |"
            )


if __name__ == "__main__":
    main()
