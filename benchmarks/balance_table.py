"""SASRec joint, joint with ``train.balance=user``, SASRec-TP and SASRec-TP with
``tp.user_sampling=windows``: test HR@10 by user group, mean ± std over seeds, change against
joint and the paired t-test's p (RESULTS.md, "The re-weighting alone" and "TP without its
re-weighting"). Reads the run folders of ``benchmarks/grid.py run`` under ``results/``; a row
with no finished run is left out.

    .venv/bin/python benchmarks/balance_table.py
"""

import json
import statistics as st
from pathlib import Path

from dist_tp.report import change

ROWS = {
    "ml-100k": {
        "joint": "results/joint/ml-100k/sasrec-ce",
        "balance=user": "results/balance/ml-100k/sasrec-ce",
        "TP": "results/tp-more/ml-100k/sasrec-tp-ce",
        "TP, users by windows": "results/tp-windows/ml-100k/sasrec-tp-ce",
    },
    "ml-1m": {
        "joint": "results/joint/ml-1m/sasrec-ce",
        "balance=user": "results/balance/ml-1m/sasrec-ce",
        "TP": "results/joint/ml-1m/sasrec-tp-ce",
        "TP, users by windows": "results/tp-windows/ml-1m/sasrec-tp-ce",
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


def figures(root):
    out = {}
    for m in sorted(Path(root).glob("seed*/metrics_nohist.json")):
        metrics = json.loads((m.parent / "metrics.json").read_text())
        out[int(m.parent.name[4:])] = metrics
    return out


def ms(values):
    return f"{st.mean(values):.4f}" + (f" ± {st.stdev(values):.4f}" if len(values) > 1 else "")


print("| data | model | seeds | " + " | ".join(f"{r} {g} HR@10" for r, g in COLS) + " |")
print("| --- " * (3 + len(COLS)) + "|")
for data, rows in ROWS.items():
    base = figures(rows["joint"])
    for label, root in rows.items():
        runs = figures(root)
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
