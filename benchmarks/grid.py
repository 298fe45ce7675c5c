"""Run a grid of training runs (one at a time) and summarise them as mean ± std over seeds.

    .venv/bin/python benchmarks/grid.py run --out results/joint --data-root data \\
        --datasets amazon-music,ml-1m --backbones sasrec,gru4rec --losses ce,bce \\
        --seeds 0,1,2 --epochs amazon-music=30,ml-1m=8 --threads 1
    .venv/bin/python benchmarks/grid.py summary results/joint
    .venv/bin/python benchmarks/grid.py pairs results/joint results/tp-more
    .venv/bin/python benchmarks/grid.py finish results/joint   # after a deadline or a kill

``pairs`` sets each ``<backbone>-tp-<loss>`` beside its ``<backbone>-<loss>`` (found under any
of the roots, first root first) over the seeds both have: mean ± std, the relative change and
the paired t-test's p (``dist_tp.experiments.report.change``), per user group.

Each run is ``dist-tp train configs/<dataset>/<backbone>.yaml`` with the given overrides into
``OUT/<dataset>/<backbone>-<loss>/seed<k>``; a finished run (``metrics_nohist.json``
present) is skipped and an interrupted one (``last.pt``, no metrics) continues with resume,
so an interrupted grid resumes. Every run is also evaluated with ``eval.exclude_history``
off (``metrics_nohist.json``), from the same checkpoint. ``--experiment NAME`` tracks each run
in MLflow (``track.uri`` or ``MLFLOW_TRACKING_URI``) as ``dist-tp train`` does; without it
nothing is tracked. ``dist-tp sweep`` is the product's way to run a grid; this script keeps
the layout the figures of RESULTS.md were made with.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from dist_tp.config import load_config
from dist_tp.core.device import resolve_device
from dist_tp.core.files import write_json, write_text
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.run.loop import evaluate_run, load_run, run_training
from dist_tp.tracking import make_tracker

REPO = Path(__file__).resolve().parents[1]


def _pairs(text: str) -> dict[str, str]:
    return dict(p.split("=", 1) for p in text.split(",") if p) if text else {}


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    epochs = _pairs(args.epochs)
    extra = args.override or []
    for dataset in args.datasets.split(","):
        for backbone in args.backbones.split(","):
            for loss in args.losses.split(","):
                for seed in args.seeds.split(","):
                    folder = Path(args.out) / dataset / f"{backbone}-{loss}" / f"seed{seed}"
                    if (folder / "metrics_nohist.json").is_file():
                        continue
                    overrides = [
                        f"data.path={args.data_root}/{dataset}",
                        f"train.loss={loss}",
                        f"train.seed={seed}",
                        "train.progress=false",
                        *extra,
                    ]
                    if dataset in epochs:
                        overrides.append(f"train.epochs={epochs[dataset]}")
                    if args.experiment:
                        name = f"{dataset}/{backbone}-{loss}/seed{seed}"
                        overrides += [f"track.experiment={args.experiment}",
                                      f"track.run_name={name}"]  # fmt: skip
                    cfg = load_config(REPO / "configs" / dataset / f"{backbone}.yaml", overrides)
                    resume = (folder / "last.pt").is_file()  # an interrupted run goes on
                    tracker = (
                        make_tracker(cfg, folder, is_main=True, fresh=not resume)
                        if args.experiment
                        else None
                    )
                    t0 = time.perf_counter()
                    run_training(cfg, folder, resume=resume, tracker=tracker)
                    seconds = _write_nohist(folder, t0)
                    print(f"done {folder} in {seconds:.0f}s", flush=True)


def _write_nohist(folder: Path, t0: float) -> float:
    """Evaluate the run's best checkpoint without the history mask (``metrics_nohist.json``,
    which marks the run finished); returns the seconds since ``t0``."""
    model, cfg = load_run(folder)
    model.to(resolve_device("auto"))
    nohist = evaluate(
        model,
        cfg.data.path,
        max_len=cfg.model.max_len,
        ks=cfg.eval.ks,
        exclude_history=False,
        splits=("test",),
    )["test"]
    nohist["seconds"] = time.perf_counter() - t0
    write_json(folder / "metrics_nohist.json", nohist)
    return nohist["seconds"]


def finish(args: argparse.Namespace) -> None:
    """Runs stopped from outside (a deadline, a kill): evaluate each from its best checkpoint,
    as a finished run is, and mark it ``STOPPED``. A finished run is left alone. To train a
    stopped run further, delete its ``metrics*.json`` and ``STOPPED``, then ``run`` again."""
    for ckpt in sorted(Path(args.root).glob("*/*/seed*/checkpoint.pt")):
        folder = ckpt.parent
        if (folder / "metrics_nohist.json").is_file():
            continue
        t0 = time.perf_counter()
        if not (folder / "metrics.json").is_file():
            metrics, _ = evaluate_run(folder)
            write_json(folder / "metrics.json", metrics)
            epochs = len(json.loads((folder / "history.json").read_text()))
            write_text(
                folder / "STOPPED",
                f"stopped from outside after {epochs} epochs; best checkpoint evaluated\n",
            )
        _write_nohist(folder, t0)
        print(f"finished {folder}", flush=True)


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def summary(args: argparse.Namespace) -> None:
    root = Path(args.root)
    print(
        "| data | model-loss | seeds | epochs run | existing HR@10 | existing NDCG@10 | "
        "new HR@10 | new NDCG@10 | existing tail HR@10 | new tail HR@10 | "
        "existing HR@10, no history mask |"
    )
    print("| --- " * 11 + "|")
    for variant in sorted(p for p in root.glob("*/*") if p.is_dir()):
        runs = sorted(variant.glob("seed*/metrics_nohist.json"))
        if not runs:
            continue
        ms = [json.loads((r.parent / "metrics.json").read_text()) for r in runs]
        nh = [json.loads(r.read_text()) for r in runs]
        hist = [json.loads((r.parent / "history.json").read_text()) for r in runs]

        def col(fn, source=ms):
            return _mean_std([fn(m) for m in source])

        print(
            f"| {variant.parent.name} | {variant.name} | {len(runs)} | "
            f"{'/'.join(str(len(h)) for h in hist)} | "
            f"{col(lambda m: m['existing']['all']['HR@10'])} | "
            f"{col(lambda m: m['existing']['all']['NDCG@10'])} | "
            f"{col(lambda m: m['new']['all']['HR@10'])} | "
            f"{col(lambda m: m['new']['all']['NDCG@10'])} | "
            f"{col(lambda m: m['existing']['tail']['HR@10'])} | "
            f"{col(lambda m: m['new']['tail']['HR@10'])} | "
            f"{col(lambda m: m['existing']['all']['HR@10'], nh)} |"
        )


PAIR_COLUMNS = [
    ("existing", "all", "HR@10"),
    ("existing", "all", "NDCG@10"),
    ("existing", "head", "HR@10"),
    ("existing", "tail", "HR@10"),
    ("new", "all", "HR@10"),
    ("new", "all", "NDCG@10"),
    ("new", "head", "HR@10"),
    ("new", "tail", "HR@10"),
]


def _runs(roots: list[str], dataset: str, variant: str) -> dict[int, Path]:
    """seed → finished run folder of ``dataset/variant``, the first root that has it winning."""
    found: dict[int, Path] = {}
    for root in roots:
        for m in sorted((Path(root) / dataset / variant).glob("seed*/metrics_nohist.json")):
            found.setdefault(int(m.parent.name[4:]), m.parent)
    return found


def _figures(runs: dict[int, Path], seeds: list[int], role: str, group: str, metric: str):
    """seed → one test figure of each run."""
    return {
        s: json.loads((runs[s] / "metrics.json").read_text())[role][group][metric] for s in seeds
    }


def _epochs(runs: dict[int, Path], seeds: list[int]) -> str:
    return "/".join(str(len(json.loads((runs[s] / "history.json").read_text()))) for s in seeds)


def pairs(args: argparse.Namespace) -> None:
    from dist_tp.experiments.report import change

    variants = {(p.parent.name, p.name) for r in args.roots for p in Path(r).glob("*/*")}
    header = " | ".join(f"{r} {g} {m}" for r, g, m in PAIR_COLUMNS)
    print(f"| data | model | seeds | epochs (joint; TP) | {header} |")
    print("| --- " * (4 + len(PAIR_COLUMNS)) + "|")
    for dataset, variant in sorted(variants):
        backbone, _, loss = variant.rpartition("-")
        if not backbone.endswith("-tp"):
            continue
        base_runs = _runs(args.roots, dataset, f"{backbone[:-3]}-{loss}")
        tp_runs = _runs(args.roots, dataset, variant)
        seeds = sorted(set(base_runs) & set(tp_runs))
        if not seeds:
            continue

        cells = []
        for column in PAIR_COLUMNS:
            base, tp = _figures(base_runs, seeds, *column), _figures(tp_runs, seeds, *column)
            c = change(tp, base)
            p = "" if c.p_value is None else f", p {c.p_value:.2f}"
            cells.append(
                f"{_mean_std(list(base.values()))} → {_mean_std(list(tp.values()))} "
                f"({c.relative:+.1%}{p})"
            )
        print(
            f"| {dataset} | {backbone[:-3]} vs -TP, {loss} | {','.join(map(str, seeds))} | "
            f"{_epochs(base_runs, seeds)}; {_epochs(tp_runs, seeds)} | " + " | ".join(cells) + " |"
        )


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", required=True)
    p.add_argument("--data-root", default="data")
    p.add_argument("--datasets", required=True)
    p.add_argument("--backbones", default="sasrec,gru4rec,caser")
    p.add_argument("--losses", default="ce")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", default="", help="per dataset: name=N,name=N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--override", action="append", help="extra key=value for every run")
    p.add_argument(
        "--experiment", default="", help="track every run in this MLflow experiment (track.*)"
    )
    p.set_defaults(func=run)
    p = sub.add_parser("finish", help="evaluate runs stopped from outside (best checkpoint)")
    p.add_argument("root")
    p.set_defaults(func=finish)
    p = sub.add_parser("summary")
    p.add_argument("root")
    p.set_defaults(func=summary)
    p = sub.add_parser("pairs", help="backbone against backbone-TP over shared seeds")
    p.add_argument("roots", nargs="+")
    p.set_defaults(func=pairs)
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
