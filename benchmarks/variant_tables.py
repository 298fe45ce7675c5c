"""Variants of one model against a reference run, over seeds: test figures by user group, mean
± std, the change against the reference and the paired t-test's p. Reads the run folders of
``benchmarks/grid.py run`` under ``results/``; a row with no finished run is left out.

    .venv/bin/python benchmarks/variant_tables.py balance  # RESULTS.md "The re-weighting
        # alone" and "TP without its re-weighting": SASRec joint, joint with
        # train.balance=user, SASRec-TP, SASRec-TP with tp.user_sampling=windows
    .venv/bin/python benchmarks/variant_tables.py sweep    # RESULTS.md "k and λ sweeps":
        # SASRec-TP on Amazon Music, patience 10, against k = 2, λ = 0.1
"""

import argparse
import json
import statistics as st

from grid import PAIR_COLUMNS, _runs  # benchmarks/ is on the path when this script runs

from dist_tp.experiments.report import change

BY_GROUP = [
    (role, group, "HR@10") for role in ("existing", "new") for group in ("all", "head", "tail")
]
MAIN = [c for c in PAIR_COLUMNS if c[1] != "head"]  # all and tail, HR@10 and NDCG@10


def _sweep(setting: str) -> tuple[str, str]:
    return f"results/sweep-p10/{setting}", "sasrec-tp-ce"


# table → (columns, data → label → (root, variant) of grid.py's layout; the first is the reference)
TABLES = {
    "balance": (
        BY_GROUP,
        {
            "ml-100k": {
                "SASRec joint": ("results/joint", "sasrec-ce"),
                "SASRec balance=user": ("results/balance", "sasrec-ce"),
                "SASRec TP": ("results/tp-more", "sasrec-tp-ce"),
                "SASRec TP, users by windows": ("results/tp-windows", "sasrec-tp-ce"),
            },
            "ml-1m": {
                "SASRec joint": ("results/joint", "sasrec-ce"),
                "SASRec balance=user": ("results/balance", "sasrec-ce"),
                "SASRec TP": ("results/joint", "sasrec-tp-ce"),
                "SASRec TP, users by windows": ("results/tp-windows", "sasrec-tp-ce"),
            },
        },
    ),
    "sweep": (
        MAIN,
        {
            "amazon-music": {
                "k = 2, λ = 0.1": _sweep("k2"),
                "k = 1": _sweep("k1"),
                "k = 3": _sweep("k3"),
                "k = 4": _sweep("k4"),
                "k = 5": _sweep("k5"),
                "λ = 0": _sweep("lambda_adv0"),
                "λ = 1": _sweep("lambda_adv1"),
            }
        },
    ),
}


def figures(data: str, root: str, variant: str) -> dict[int, dict]:
    """seed → test metrics of each finished run."""
    runs = _runs([root], data, variant)
    return {s: json.loads((f / "metrics.json").read_text()) for s, f in runs.items()}


def ms(values):
    return f"{st.mean(values):.4f}" + (f" ± {st.stdev(values):.4f}" if len(values) > 1 else "")


def table(cols, rows_by_data) -> None:
    print("| data | model | seeds | " + " | ".join(f"{r} {g} {m}" for r, g, m in cols) + " |")
    print("| --- " * (3 + len(cols)) + "|")
    for data, rows in rows_by_data.items():
        (ref_label, ref), *_ = rows.items()
        base = figures(data, *ref)
        for label, (root, variant) in rows.items():
            runs = figures(data, root, variant)
            if not runs:
                continue
            cells = []
            for role, group, metric in cols:
                cell = ms([runs[s][role][group][metric] for s in sorted(runs)])
                if label != ref_label:
                    seeds = sorted(set(runs) & set(base))
                    c = change(
                        {s: runs[s][role][group][metric] for s in seeds},
                        {s: base[s][role][group][metric] for s in seeds},
                    )
                    p = "" if c.p_value is None else f", p {c.p_value:.2f}"
                    cell += f" ({c.relative:+.1%}{p})"
                cells.append(cell)
            seeds = ",".join(map(str, sorted(runs)))
            print(f"| {data} | {label} | {seeds} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", choices=sorted(TABLES))
    cols, rows = TABLES[parser.parse_args().table]
    table(cols, rows)


if __name__ == "__main__":
    main()
