"""Figures like the paper's, drawn with matplotlib (Agg, no display needed).

- :func:`training_curves`: one run's loss and validation NDCG@10 per epoch;
- :func:`topn_figure` (Fig. 4): HR@N and NDCG@N against N, per dataset, existing and new users;
- :func:`head_tail_figure` (Fig. 5): HR@10 of head and tail users, per model;
- :func:`sweep_figure` (Fig. 6 for ``k``, Fig. 7 for ``lambda_adv``): HR@10 against the swept
  TP parameter, mean ± std over seeds, for all and tail users, existing and new.

The rows and runs come from :mod:`dist_tp.experiments.report` (``Row``, ``RunRecord``); this
module reads only their attributes, so it imports nothing from the rooms above it.
"""

from __future__ import annotations

import re
import statistics
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from dist_tp.tracking.names import GROUPS, ROLES, key_for

if TYPE_CHECKING:  # only for the annotations: the experiments room sits above this one
    from dist_tp.experiments.report import Row, RunRecord


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    """Atomic: draw to a temp file beside ``path``, then rename."""
    from dist_tp.core.files import atomic_write

    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    _plt().close(fig)
    return path


def training_curves(history: list[dict], path: str | Path) -> Path:
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["loss"] for h in history], marker=".")
    a.set(xlabel="epoch", ylabel="training loss")
    val = [(h["epoch"], h["valid_ndcg10"]) for h in history if "valid_ndcg10" in h]
    if val:
        b.plot(*zip(*val, strict=True), marker=".", label="validation NDCG@10")
    disc = [(h["epoch"], h["disc_auc"]) for h in history if "disc_auc" in h]
    if disc:
        b.plot(*zip(*disc, strict=True), marker=".", label="discriminator AUC")
    b.set(xlabel="epoch")
    b.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def _ns(rows: list[Row]) -> list[int]:
    found = set()
    for row in rows:
        for r in row.runs:
            for key in r.metrics:
                m = re.fullmatch(r"test/existing/all/HR_(\d+)", key)
                if m:
                    found.add(int(m.group(1)))
    return sorted(found)


def _mean(row: Row, key: str) -> float | None:
    values = list(row.values(key).values())
    return statistics.fmean(values) if values else None


def topn_figure(rows: list[Row], dataset: str, path: str | Path) -> Path | None:
    """Fig. 4: HR@N and NDCG@N against N for every model of ``dataset``."""
    rows = [r for r in rows if r.dataset == dataset]
    ns = _ns(rows)
    if not rows or len(ns) < 2:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (role, metric) in zip(
        axes, [(r, m) for r in ROLES for m in ("HR", "NDCG")], strict=True
    ):
        for row in rows:
            points = [(n, _mean(row, key_for(role, "all", f"{metric}@{n}"))) for n in ns]
            points = [(n, v) for n, v in points if v is not None]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=row.label)
        ax.set(title=f"{dataset}: {role} users", xlabel="N", ylabel=f"{metric}@N")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def head_tail_figure(rows: list[Row], dataset: str, path: str | Path, metric="HR@10") -> Path:
    """Fig. 5: bars of head and tail users' ``metric``, existing and new, per model."""
    rows = [r for r in rows if r.dataset == dataset]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 3.4))
    slots = [(role, g) for role in ROLES for g in GROUPS]
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        means, errs = [], []
        for role, g in slots:
            values = list(row.values(key_for(role, g, metric)).values())
            means.append(statistics.fmean(values) if values else 0.0)
            errs.append(statistics.stdev(values) if len(values) > 1 else 0.0)
        xs = [j + i * width for j in range(len(slots))]
        ax.bar(xs, means, width, yerr=errs, label=row.label, capsize=2)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(slots))])
    ax.set_xticklabels([f"{role} {g}" for role, g in slots])
    ax.set(title=f"{dataset}: head vs tail users", ylabel=metric)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def sweep_runs(runs: list[RunRecord], param: str) -> dict[float, list[RunRecord]]:
    """TP runs grouped by the value of ``tp.<param>``, the other swept parameters held at
    their most common value (a k × λ grid gives the k sweep at the usual λ, and so on)."""
    key = f"tp.{param}"
    tp = [r for r in runs if r.method == "tp" and key in r.params]
    if len({r.params[key] for r in tp}) < 2:
        return {}
    others = [
        k
        for k in {k for r in tp for k in r.params}
        if k.startswith("tp.") and k != key and len({r.params.get(k) for r in tp}) > 1
    ]
    for k in others:
        mode = Counter(r.params.get(k) for r in tp).most_common(1)[0][0]
        tp = [r for r in tp if r.params.get(k) == mode]
    out: dict[float, list[RunRecord]] = defaultdict(list)
    for r in tp:
        out[float(r.params[key])].append(r)
    return dict(sorted(out.items()))


def sweep_figure(
    runs: list[RunRecord], param: str, path: str | Path, metric: str = "HR@10"
) -> Path | None:
    """Fig. 6 (``k``) / Fig. 7 (``lambda_adv``): ``metric`` against the swept value."""
    groups = sweep_runs(runs, param)
    if not groups:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    values = list(groups)
    xs = list(range(len(values)))  # categorical: λ spans 0 and several decades
    for ax, role in zip(axes, ROLES, strict=True):
        for group in ("all", "tail"):
            key = key_for(role, group, metric)
            means, errs = [], []
            for v in values:
                vals = [r.metrics[key] for r in groups[v] if key in r.metrics]
                means.append(statistics.fmean(vals) if vals else float("nan"))
                errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            ax.errorbar(xs, means, yerr=errs, marker="o", capsize=3, label=f"{group} users")
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{v:g}" for v in values])
        ax.set(title=f"{role} users", xlabel=param, ylabel=metric)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, Path(path))


def experiment_figures(runs: list[RunRecord], rows: list[Row], out: str | Path) -> list[Path]:
    """Every figure the runs support, written into ``out``."""
    out = Path(out)
    written = []
    for dataset in sorted({r.dataset for r in rows}):
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", dataset)
        for path in (
            topn_figure(rows, dataset, out / f"fig4_topn_{safe}.png"),
            head_tail_figure(rows, dataset, out / f"fig5_head_tail_{safe}.png"),
        ):
            if path is not None:
                written.append(path)
        druns = [r for r in runs if r.dataset == dataset]
        for backbone in sorted({r.backbone for r in druns}):
            bruns = [r for r in druns if r.backbone == backbone]
            for fig, param in (("fig6", "k"), ("fig7", "lambda_adv")):
                path = sweep_figure(bruns, param, out / f"{fig}_{param}_{safe}_{backbone}.png")
                if path is not None:
                    written.append(path)
    return written
