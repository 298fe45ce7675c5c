"""Tables over seeds, made from :class:`~dist_tp.experiments.report.Row` values whether their
runs came from MLflow or from run folders:

- :func:`mean_table`: every model, mean ± std over its seeds, with the epochs each seed ran;
- :func:`pairs_table`: each -TP model beside its joint backbone over the seeds both have: the
  two means, the relative change and the paired t-test's p;
- :func:`reference_table`: every model of a dataset against one reference model, the change
  and p over the seeds both have.

The statistics are those of Table 3 (:func:`~dist_tp.experiments.report.cell`,
:func:`~dist_tp.experiments.report.change`). A column is one figure of the test split (or of
an extra evaluation, ``nohist/existing/all/HR@10``) for one user group.
"""

from __future__ import annotations

from dataclasses import dataclass

from dist_tp.config import ConfigError
from dist_tp.experiments.report import Row, RunRecord, baseline_of, cell, change
from dist_tp.tracking import GROUPS, ROLES, key_for


@dataclass(frozen=True)
class Column:
    role: str
    group: str
    metric: str
    split: str = "test"

    @property
    def key(self) -> str:
        return key_for(self.role, self.group, self.metric, self.split)

    @property
    def header(self) -> str:
        text = f"{self.role} {self.group} {self.metric}"
        return text if self.split == "test" else f"{text} ({self.split})"


def _columns(*specs: str) -> list[Column]:
    return [Column(*spec.split()) for spec in specs]


PRESETS = {
    # the six figures of the backbone tables in RESULTS.md
    "summary": _columns(
        "existing all HR@10", "existing all NDCG@10", "new all HR@10", "new all NDCG@10",
        "existing tail HR@10", "new tail HR@10",
    ),
    # every group, HR@10 and NDCG@10 of all users (the pairs table)
    "pairs": _columns(
        "existing all HR@10", "existing all NDCG@10", "existing head HR@10",
        "existing tail HR@10", "new all HR@10", "new all NDCG@10", "new head HR@10",
        "new tail HR@10",
    ),
    # all and tail users, HR@10 and NDCG@10
    "main": _columns(
        "existing all HR@10", "existing all NDCG@10", "existing tail HR@10", "new all HR@10",
        "new all NDCG@10", "new tail HR@10",
    ),
    # HR@10 of every group
    "groups": [Column(r, g, "HR@10") for r in ROLES for g in ("all", *GROUPS)],
}  # fmt: skip


def parse_columns(specs: list[str]) -> list[Column]:
    """Each spec a preset name (``summary``, ``pairs``, ``main``, ``groups``) or one column,
    ``ROLE/GROUP/METRIC`` (``new/tail/NDCG@20``) or ``SPLIT/ROLE/GROUP/METRIC`` for an extra
    evaluation (``nohist/existing/all/HR@10``)."""
    out: list[Column] = []
    for spec in specs:
        if spec in PRESETS:
            out += PRESETS[spec]
            continue
        parts = spec.split("/")
        if len(parts) == 3:
            parts = ["test", *parts]
        if len(parts) != 4 or parts[1] not in ROLES or parts[2] not in ("all", *GROUPS):
            raise ConfigError(
                f"--column {spec!r}: give a preset ({', '.join(PRESETS)}) or "
                "[SPLIT/]ROLE/GROUP/METRIC, e.g. existing/tail/HR@10 or nohist/new/all/NDCG@10"
            )
        split, role, group, metric = parts
        out.append(Column(role, group, metric, split))
    return out


def extra_splits(runs: list[RunRecord]) -> list[str]:
    """The extra evaluations (``nohist``, ...) some of ``runs`` have, sorted (their test
    figures; ``<tag>_valid``, their validation, is a column only when asked for)."""
    skip = {"test", "best_valid", "valid", "train", "step"}
    found = set()
    for r in runs:
        for key in r.metrics:
            split, _, rest = key.partition("/")
            if split not in skip and not split.endswith("_valid") and rest.split("/")[0] in ROLES:
                found.add(split)
    return sorted(found)


def default_columns(runs: list[RunRecord], preset: str) -> list[Column]:
    """A preset, then existing users' HR@10 of every extra evaluation the runs have."""
    return PRESETS[preset] + [Column("existing", "all", "HR@10", s) for s in extra_splits(runs)]


def _table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "| --- " * len(header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return "\n".join(out)


def _seeds(seeds) -> str:
    return ",".join(str(s) for s in sorted(seeds))


def _epochs(row: Row, seeds=None) -> str:
    runs = [r for r in row.runs if seeds is None or r.seed in seeds]
    return "/".join("-" if r.epochs is None else str(r.epochs) for r in runs)


def _values(row: Row, column: Column, seeds=None) -> dict[int, float]:
    values = row.values(column.key)
    return {s: v for s, v in values.items() if seeds is None or s in seeds}


def mean_table(rows: list[Row], columns: list[Column]) -> str:
    """Every model: its seeds, the epochs each ran, mean ± std of each column."""
    lines = [
        [row.dataset, row.label, _seeds(r.seed for r in row.runs), _epochs(row)]
        + [cell(list(_values(row, c).values())).plain() for c in columns]
        for row in rows
    ]
    return _table(["data", "model", "seeds", "epochs run"] + [c.header for c in columns], lines)


def pairs_table(rows: list[Row], columns: list[Column]) -> str:
    """Each -TP model beside its backbone (:func:`~dist_tp.experiments.report.baseline_of`)
    over the seeds both have: ``backbone → TP (relative change, p)``."""
    lines = []
    for row in rows:
        base = baseline_of(row, rows)
        if base is None:
            continue
        seeds = {r.seed for r in row.runs} & {r.seed for r in base.runs}
        if not seeds:
            continue
        cells = []
        for c in columns:
            tp, ref = _values(row, c, seeds), _values(base, c, seeds)
            ch = change(tp, ref)
            text = f"{cell(list(ref.values())).plain()} → {cell(list(tp.values())).plain()}"
            cells.append(text + ("" if ch.short() == "-" else f" ({ch.short()})"))
        lines.append(
            [row.dataset, f"{base.label} → {row.label}", _seeds(seeds),
             f"{_epochs(base, seeds)}; {_epochs(row, seeds)}", *cells]
        )  # fmt: skip
    if not lines:
        raise ConfigError("no -TP model with a joint backbone over shared seeds to pair")
    header = ["data", "backbone → TP", "seeds", "epochs (joint; TP)"]
    return _table(header + [c.header for c in columns], lines)


def reference_table(rows: list[Row], columns: list[Column], reference: str) -> str:
    """Per dataset, the model labelled ``reference`` first, then every other model with its
    change against the reference and the paired p over the seeds both have."""
    lines, missing = [], []
    for dataset in dict.fromkeys(r.dataset for r in rows):
        drows = [r for r in rows if r.dataset == dataset]
        ref = next((r for r in drows if r.label.lower() == reference.lower()), None)
        if ref is None:
            missing.append(dataset)
            continue
        for row in [ref, *[r for r in drows if r is not ref]]:
            cells = []
            for c in columns:
                text = cell(list(_values(row, c).values())).plain()
                if row is not ref:
                    seeds = {r.seed for r in row.runs} & {r.seed for r in ref.runs}
                    ch = change(_values(row, c, seeds), _values(ref, c, seeds))
                    text += "" if ch.short() == "-" else f" ({ch.short()})"
                cells.append(text)
            lines.append([dataset, row.label, _seeds(r.seed for r in row.runs), *cells])
    if not lines:
        labels = ", ".join(sorted({r.label for r in rows}))
        raise ConfigError(f"--reference {reference!r}: no such model (there: {labels})")
    text = _table(["data", "model", "seeds"] + [c.header for c in columns], lines)
    if missing:
        text += f"\n\n(no {reference!r} in: {', '.join(missing)}; left out)"
    return text
