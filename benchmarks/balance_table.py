"""SASRec joint, joint with ``train.balance=user``, SASRec-TP and SASRec-TP with
``tp.user_sampling=windows``: test HR@10 by user group, mean ± std over seeds, change against
joint and the paired t-test's p (RESULTS.md, "The re-weighting alone" and "TP without its
re-weighting"). Reads the run folders of ``benchmarks/grid.py run`` under ``results/``; a row
with no finished run is left out.

    .venv/bin/python benchmarks/balance_table.py
"""

import json
import statistics as st

from grid import _runs  # benchmarks/ is on the path when this script runs

from dist_tp.report import change

ROWS = {  # data → label → (root, variant) of benchmarks/grid.py's layout
    "ml-100k": {
        "joint": ("results/joint", "sasrec-ce"),
        "balance=user": ("results/balance", "sasrec-ce"),
        "TP": ("results/tp-more", "sasrec-tp-ce"),
        "TP, users by windows": ("results/tp-windows", "sasrec-tp-ce"),
    },
    "ml-1m": {
        "joint": ("results/joint", "sasrec-ce"),
        "balance=user": ("results/balance", "sasrec-ce"),
        "TP": ("results/joint", "sasrec-tp-ce"),
        "TP, users by windows": ("results/tp-windows", "sasrec-tp-ce"),
    },
}
COLS = [
    ("existing", "all"),
    ("existing", "head"),
    ("existing", "tail"),
    ("new", "all"),
    ("new", "head"),
    ("new", "tail"),
]


def figures(data: str, root: str, variant: str) -> dict[int, dict]:
    """seed → test metrics of each finished run."""
    runs = _runs([root], data, variant)
    return {s: json.loads((f / "metrics.json").read_text()) for s, f in runs.items()}


def ms(values):
    return f"{st.mean(values):.4f}" + (f" ± {st.stdev(values):.4f}" if len(values) > 1 else "")


print("| data | model | seeds | " + " | ".join(f"{r} {g} HR@10" for r, g in COLS) + " |")
print("| --- " * (3 + len(COLS)) + "|")
for data, rows in ROWS.items():
    base = figures(data, *rows["joint"])
    for label, (root, variant) in rows.items():
        runs = figures(data, root, variant)
        if not runs:
            continue
        cells = []
        for role, group in COLS:
            vals = [runs[s][role][group]["HR@10"] for s in sorted(runs)]
            cell = ms(vals)
            if label != "joint":
                seeds = sorted(set(runs) & set(base))
                c = change(
                    {s: runs[s][role][group]["HR@10"] for s in seeds},
                    {s: base[s][role][group]["HR@10"] for s in seeds},
                )
                p = "" if c.p_value is None else f", p {c.p_value:.2f}"
                cell += f" ({c.relative:+.1%}{p})"
            cells.append(cell)
        print(
            f"| {data} | SASRec {label} | {','.join(map(str, sorted(runs)))} | "
            + " | ".join(cells)
            + " |"
        )
