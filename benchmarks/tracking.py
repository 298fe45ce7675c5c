"""Cost of tracking: one batched ``Tracker.log_metrics`` (spool + one ``log_batch``) against one
``MlflowClient.log_metric`` call per value, on the same sqlite store in the same run.

    .venv/bin/python benchmarks/tracking.py [--values 76] [--repeats 20]

76 values is what a run logs at its end (test and best-validation HR/NDCG for 5 N, 3 groups,
2 roles, user counts, the discriminator's figures).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dist_tp.tracking import Tracker


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--values", type=int, default=76)
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{tmp}/mlflow.db"
        tracker = Tracker(Path(tmp) / "run", uri=uri, experiment="bench")
        tracker.start(run_name="bench", params={"a": 1}, tags={})
        values = {f"m/{i}": float(i) for i in range(args.values)}
        tracker.log_metrics(values, step=0)  # warm-up: connection, first insert
        t0 = time.perf_counter()
        for step in range(1, args.repeats + 1):
            tracker.log_metrics(values, step=step)
        batched = (time.perf_counter() - t0) / args.repeats
        client = tracker.client
        t0 = time.perf_counter()
        for step in range(1, args.repeats + 1):
            for key, value in values.items():
                client.log_metric(tracker.run_id, f"x{key}", value, step=step)
        single = (time.perf_counter() - t0) / args.repeats
    print("| values per step | batched (spool + log_batch) | one log_metric per value | ratio |")
    print("| --- | --- | --- | --- |")
    print(
        f"| {args.values} | {batched * 1e3:.1f} ms | {single * 1e3:.1f} ms "
        f"({single / args.values * 1e3:.1f} ms per value) | {single / batched:.1f}x |"
    )


if __name__ == "__main__":
    main()
