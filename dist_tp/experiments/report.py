"""The paper's comparisons from tracked runs: Table 3 (backbone vs backbone-TP, mean ± std over
seeds, relative change, paired test across seeds) and the head/tail breakdown of Figure 5.

Runs are read from MLflow (finished runs tagged ``dist_tp.kind=train``, :func:`load_runs`) or
from run folders (:func:`dist_tp.experiments.folders.load_folders`) into the same plain
:class:`RunRecord` values; everything after that is plain Python, so it is tested without a
server. A *row* of a table is one model configuration: backbone, method, and the parameters
that vary between that model's runs other than the seed (a sweep's ``k=3 lambda_adv=0.1``).
"""

from __future__ import annotations

import csv
import functools
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dist_tp.config import Config, ConfigError, flatten, to_dict
from dist_tp.tracking import GROUPS, KIND_TAG, ROLES, key_for, open_client, resolve_uri

DISPLAY = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "caser": "Caser", "pop": "Pop"}
BACKBONE_ORDER = ["gru4rec", "caser", "sasrec", "pop"]
# ROLES, GROUPS and key_for live in dist_tp.tracking.names (the figures use them too)
# parameters that never make two runs different models
IGNORED_PARAMS = {
    "train.seed",
    "data.path",
    "train.progress",
    "train.threads",
    "train.prefetch",
    "train.compile",
    "train.device",
    "train.checkpoint_every",
    "tp.check_replicas_every",
    "eval.batch_size",
}


@dataclass
class RunRecord:
    run_id: str
    dataset: str
    backbone: str
    method: str
    seed: int
    params: dict[str, str] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    epochs: int | None = None  # epochs trained (None: not asked for, or nothing trained)


@dataclass
class Row:
    """One model configuration on one dataset, and its runs (one per seed)."""

    dataset: str
    backbone: str
    method: str
    variant: str
    runs: list[RunRecord]

    @property
    def label(self) -> str:
        name = DISPLAY.get(self.backbone, self.backbone) + ("-TP" if self.method == "tp" else "")
        return f"{name} {self.variant}".strip()

    @property
    def model_key(self) -> tuple:
        return (self.backbone, self.method, self.variant)

    def values(self, key: str) -> dict[int, float]:
        """seed → metric value, for the runs that have it."""
        return {r.seed: r.metrics[key] for r in self.runs if key in r.metrics}


def load_runs(experiment: str, uri: str = "", *, epochs: bool = False) -> list[RunRecord]:
    """Finished training runs of an MLflow experiment, oldest first; ``epochs``: also count
    each run's epochs (one more query per run)."""
    uri = resolve_uri(uri)
    client = open_client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise ConfigError(f"no MLflow experiment {experiment!r} at {uri} (there: {names})")
    records, token = [], None
    while True:
        page = client.search_runs(
            [exp.experiment_id],
            filter_string=f"tags.`{KIND_TAG}` = 'train' and attributes.status = 'FINISHED'",
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=token,
        )
        for run in page:
            tags, params = run.data.tags, run.data.params
            records.append(
                RunRecord(
                    run_id=run.info.run_id,
                    dataset=tags.get("dataset", "?"),
                    backbone=tags.get("backbone", params.get("model.name", "?")),
                    method=tags.get("method", params.get("train.method", "?")),
                    seed=int(tags.get("seed", params.get("train.seed", 0))),
                    params=dict(params),
                    metrics=dict(run.data.metrics),
                    epochs=_epochs(client, run.info.run_id) if epochs else None,
                )
            )
        token = page.token
        if not token:
            break
    return records


def _epochs(client, run_id: str) -> int | None:
    """Epochs a tracked run trained: its last per-epoch step + 1 (None for popularity)."""
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    return max(steps) + 1 if steps else None


SEEDED_PARAMS = ("train.init_from",)
"""Parameters whose value names the run's own seed (``sweep``'s ``{seed}``): runs of one
variant differ there only by their seed."""


@functools.cache
def _defaults() -> dict[str, str]:
    """Each config key's default as MLflow holds a param (``str``): the value of a run
    tracked before the key existed."""
    return {k: str(v) for k, v in flatten(to_dict(Config())).items()}


def _param(run: RunRecord, key: str) -> str | None:
    """``run``'s value of ``key`` (its default if the run has none: tracked before the key
    existed), its own seed written ``{seed}`` in ``SEEDED_PARAMS``."""
    value = run.params.get(key, _defaults().get(key))
    if key in SEEDED_PARAMS and value is not None:
        return re.sub(rf"seed{run.seed}(?!\d)", "seed{seed}", value)
    return value


EMPTY = '""'
"""How a variant's label shows a parameter that is empty (``train.init_from`` left out)."""


def make_rows(runs: list[RunRecord], ignore: tuple[str, ...] | list[str] = ()) -> list[Row]:
    """Group runs into rows: (dataset, backbone, method) and the parameters that vary within
    that group (besides the seed, and the keys in ``ignore``) name the variant. A row keeps
    one run per seed, the first given. Ordered like the paper's tables."""
    groups: dict[tuple, list[RunRecord]] = defaultdict(list)
    for r in runs:
        groups[(r.dataset, r.backbone, r.method)].append(r)
    rows = []
    ignored = IGNORED_PARAMS | set(ignore)
    for (dataset, backbone, method), members in groups.items():
        keys = sorted({k for r in members for k in r.params} - ignored)
        varying = [
            k
            for k in keys
            if len({_param(r, k) for r in members}) > 1 and not k.startswith("track.")
        ]
        by_variant: dict[str, dict[int, RunRecord]] = defaultdict(dict)
        for r in members:
            name = " ".join(f"{k.split('.')[-1]}={_param(r, k) or EMPTY}" for k in varying)
            by_variant[name].setdefault(r.seed, r)
        for variant, vruns in by_variant.items():
            rows.append(Row(dataset, backbone, method, variant, sorted(vruns.values(), key=_seed)))

    def order(row: Row) -> tuple:
        rank = BACKBONE_ORDER.index(row.backbone) if row.backbone in BACKBONE_ORDER else 99
        return (row.dataset, rank, row.backbone, row.method != "joint", _natural(row.variant))

    return sorted(rows, key=order)


def _seed(r: RunRecord) -> int:
    return r.seed


def _natural(text: str) -> tuple:
    """Sort ``k=10`` after ``k=9``: numbers compare as numbers."""
    parts = []
    for token in text.replace("=", " ").split():
        try:
            parts.append((0, float(token), ""))
        except ValueError:
            parts.append((1, 0.0, token))
    return tuple(parts)


def fixed_params(row: Row) -> dict[str, str]:
    """The parameters every run of a row shares."""
    first, *rest = row.runs
    return {k: v for k, v in first.params.items() if all(r.params.get(k) == v for r in rest)}


def baseline_of(row: Row, rows: list[Row]) -> Row | None:
    """The joint backbone a TP row is compared with (same dataset and backbone). Of several
    joint rows, the one that agrees with the TP row on most of the parameters telling them
    apart (``train.loss``, say), then the one without a variant, then the first."""
    if row.method != "tp":
        return None
    key = (row.dataset, row.backbone, "joint")
    joint = [r for r in rows if (r.dataset, r.backbone, r.method) == key]
    if len(joint) < 2:
        return joint[0] if joint else None
    fixed = [fixed_params(j) for j in joint]
    telling = {k for f in fixed for k in f if len({g.get(k) for g in fixed}) > 1}
    mine = fixed_params(row)
    distance = [sum(mine.get(k) != f.get(k) for k in telling) for f in fixed]
    best = min(range(len(joint)), key=lambda i: (distance[i], bool(joint[i].variant)))
    return joint[best]


@dataclass
class Cell:
    mean: float
    std: float
    n: int

    def text(self) -> str:
        if self.n == 0:
            return "-"
        if self.n == 1:
            return f"{self.mean:.4f} (1)"
        return f"{self.mean:.4f} ± {self.std:.4f} ({self.n})"

    def plain(self) -> str:
        """Without the seed count: ``0.1301 ± 0.0050``, or ``0.0310`` for one seed."""
        if self.n == 0:
            return "-"
        return f"{self.mean:.4f}" + (f" ± {self.std:.4f}" if self.n > 1 else "")


def cell(values: list[float]) -> Cell:
    if not values:
        return Cell(math.nan, math.nan, 0)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Cell(statistics.fmean(values), std, len(values))


@dataclass
class Change:
    """TP vs its backbone on one metric: relative change of the means and a paired t-test
    over the seeds both have (None when fewer than two pairs or no variation)."""

    relative: float
    p_value: float | None
    pairs: int

    def text(self) -> str:
        if math.isnan(self.relative):
            return "-"
        p = "n/a" if self.p_value is None else f"{self.p_value:.3f}"
        return f"{self.relative:+.1%} (p={p}, {self.pairs} pairs)"

    def short(self) -> str:
        """``+2.6%, p 0.60`` (no p without a test)."""
        if math.isnan(self.relative):
            return "-"
        p = "" if self.p_value is None else f", p {self.p_value:.2f}"
        return f"{self.relative:+.1%}{p}"


def change(tp: dict[int, float], base: dict[int, float]) -> Change:
    if not tp or not base:
        return Change(math.nan, None, 0)
    base_mean = statistics.fmean(base.values())
    rel = (statistics.fmean(tp.values()) - base_mean) / base_mean if base_mean else math.nan
    seeds = sorted(set(tp) & set(base))
    p = None
    if len(seeds) >= 2:
        diffs = [tp[s] - base[s] for s in seeds]
        if statistics.pstdev(diffs) > 0:
            from scipy import stats

            p = float(stats.ttest_rel([tp[s] for s in seeds], [base[s] for s in seeds]).pvalue)
    return Change(rel, p, len(seeds))


def compare_tables(rows: list[Row], metrics: list[str]) -> tuple[str, list[dict]]:
    """Markdown (Table 3 per metric, then the head/tail breakdown) and the CSV records."""
    datasets = sorted({r.dataset for r in rows})
    models = []
    for r in rows:
        if r.model_key not in models:
            models.append(r.model_key)
    index = {(r.dataset, r.model_key): r for r in rows}
    out, records = [], []
    for metric in metrics:
        out.append(f"### Test {metric}, all users (mean ± std over seeds, (n) = seeds)\n")
        header = ["model"] + [f"{d} {role}" for d in datasets for role in ROLES]
        out.append("| " + " | ".join(header) + " |")
        out.append("|" + " --- |" * len(header))
        for mk in models:
            label, cells, deltas = None, [], []
            for d in datasets:
                row = index.get((d, mk))
                for role in ROLES:
                    if row is None:
                        cells.append("-")
                        deltas.append("-")
                        continue
                    label = row.label
                    key = key_for(role, "all", metric)
                    c = cell(list(row.values(key).values()))
                    cells.append(c.text())
                    base = baseline_of(row, rows)
                    ch = change(row.values(key), base.values(key)) if base else None
                    deltas.append(ch.text() if ch else "-")
                    for group in ("all", *GROUPS):
                        gkey = key_for(role, group, metric)
                        gc = cell(list(row.values(gkey).values()))
                        gch = change(row.values(gkey), base.values(gkey)) if base else None
                        records.append(
                            {
                                "dataset": d,
                                "model": row.label,
                                "role": role,
                                "group": group,
                                "metric": metric,
                                "mean": gc.mean,
                                "std": gc.std,
                                "seeds": gc.n,
                                "relative_change": "" if gch is None else gch.relative,
                                "p_value": "" if gch is None or gch.p_value is None
                                else gch.p_value,
                            }
                        )  # fmt: skip
            out.append(f"| {label} | " + " | ".join(cells) + " |")
            if any(x != "-" for x in deltas):
                out.append(f"| Δ {label} vs backbone | " + " | ".join(deltas) + " |")
        out.append("")
    metric = metrics[0]
    out.append(f"### Head and tail users, test {metric} (Figure 5)\n")
    header = ["dataset", "model"] + [f"{role} {g}" for role in ROLES for g in GROUPS]
    out.append("| " + " | ".join(header) + " |")
    out.append("|" + " --- |" * len(header))
    for row in rows:
        cells = [
            cell(list(row.values(key_for(role, g, metric)).values())).text()
            for role in ROLES
            for g in GROUPS
        ]
        out.append(f"| {row.dataset} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n", records


def write_csv(path: str | Path, records: list[dict]) -> None:
    from dist_tp.core.files import write_text

    if not records:
        raise ConfigError("nothing to write: no finished runs matched")
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    write_text(path, buf.getvalue())
