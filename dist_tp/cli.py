"""The ``dist-tp`` command line: synth, prepare, stats, train, evaluate, recommend, table,
mlflow-sync, compare, sweep, finish, plot.

Every user-facing failure (bad data, bad config) ends as one ``error: ...`` line on stderr and
exit status 2 — never a traceback from deep inside.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from dist_tp.config import ConfigError
from dist_tp.data.errors import DataError

log = logging.getLogger("dist_tp")


def _parse_columns(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    out = {}
    for part in text.split(","):
        if "=" not in part:
            raise DataError(f"--columns: {part!r} is not of the form role=column")
        key, value = part.split("=", 1)
        out[key.strip()] = value.strip()
    return out


@contextlib.contextmanager
def _exits_cleanly():
    """A DataError: one ``error:`` line and status 2; Ctrl-C: status 130; both through
    ``leave_if_cli`` in the dist-tp process (see ``cmd_prepare``), re-raised elsewhere."""
    from dist_tp.data.prepare import leave_if_cli

    try:
        yield
    except DataError as exc:
        leave_if_cli(f"error: {exc}", 2)
        raise
    except KeyboardInterrupt:
        leave_if_cli("interrupted", 130)
        raise


def cmd_prepare(args: argparse.Namespace) -> int:
    from dist_tp.data.prepare import check_output, leave_if_cli, prepare
    from dist_tp.data.protocol import ProtocolOptions
    from dist_tp.data.registry import get_spec, resolve_input

    # Every exit of the dist-tp process goes through leave_if_cli: after pyarrow's reader
    # threads ran, a normal interpreter exit can abort (134) instead of giving the status.
    with _exits_cleanly():
        fmt, path = args.format, args.input
        check_output(args.output)  # before a dataset is downloaded or read
        if args.name is not None:
            spec = get_spec(args.name)
            fmt = fmt or spec.format
            if path is None:
                path, _ = resolve_input(args.name)
        if path is None or fmt is None:
            raise DataError("give a dataset name, or --input PATH with --format FORMAT")
        options = ProtocolOptions(
            min_item_count=args.min_item_count,
            min_user_count=args.min_user_count,
            new_user_fraction=args.new_user_fraction,
            head_fraction=args.head_fraction,
            seed=args.seed,
        )
        meta = prepare(
            input_path=path,
            fmt=fmt,
            output=args.output,
            options=options,
            columns=_parse_columns(args.columns),
            on_bad_lines=args.on_bad_lines,
            num_shards=args.shards,
            row_group_size=args.row_group_size,
            force=args.force,
            dataset=args.name,
            encoding=args.encoding,
            yambda=_yambda_options(args) if fmt == "yambda" else None,
            engine=args.engine,
            memory_limit=args.memory_limit,
            workers=args.workers,
        )
    skipped = meta["source"]["skipped_rows"]
    if skipped:
        print(f"skipped {skipped} bad lines of {meta['source']['raw_rows']}", file=sys.stderr)
    print(format_stats(meta))
    leave_if_cli(None, 0)
    return 0


def _yambda_options(args: argparse.Namespace):
    from dist_tp.data.readers import YambdaOptions

    events = tuple(e.strip() for e in args.events.split(",") if e.strip())
    return YambdaOptions(events=events, min_played_ratio=args.min_played_ratio)


def _count(text: str) -> int:
    """1000000, 1_000_000, 1e6, 1M, 2.5B: a count."""
    raw = text.strip().replace("_", "")
    scale = {"k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}.get(raw[-1:].lower(), 1)
    try:
        value = float(raw[:-1] if scale > 1 else raw) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (e.g. 1e6, 1M)") from None
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole count")
    return int(value)


def cmd_synth(args: argparse.Namespace) -> int:
    from dist_tp.data.prepare import leave_if_cli
    from dist_tp.data.synth import SynthOptions, synthesize

    with _exits_cleanly():
        options = SynthOptions(
            events=args.events,
            users=args.users,
            items=args.items,
            seed=args.seed,
            schema=args.schema,
            item_exponent=args.item_exponent,
            user_exponent=args.user_exponent,
            clusters=args.clusters,
            p_next=args.p_next,
            p_stay=args.p_stay,
            rows_per_file=args.rows_per_file,
            workers=args.workers,
        )
        summary = synthesize(options, args.output)
    rate = summary["events"] / max(summary["seconds"], 1e-9)
    print(
        f"{summary['events']:,} events, {summary['users']:,} users, {summary['items']:,} items "
        f"in {len(summary['files'])} files under {args.output} "
        f"({summary['seconds']:.1f} s, {rate / 1e6:.1f}M events/s)"
    )
    if args.schema == "yambda":
        print(f"prepare it with: dist-tp prepare --input {args.output} --format yambda ...")
    else:
        print(
            f"prepare it with: dist-tp prepare --input {args.output} --format parquet "
            "--columns user=user,item=item,timestamp=timestamp ..."
        )
    leave_if_cli(None, 0)
    return 0


def format_stats(meta: dict) -> str:
    s = meta["stats"]
    rows = [
        ("users", f"{s['users']:,}"),
        ("items", f"{s['items']:,}"),
        ("interactions", f"{s['interactions']:,}"),
        ("records/user", f"{s['records_per_user']:.2f}"),
        ("records/item", f"{s['records_per_item']:.2f}"),
        ("density", f"{s['density']:.4%}"),
        (
            "existing users (head/tail)",
            f"{s['existing_users']:,} ({s['existing_head']:,}/{s['existing_tail']:,})",
        ),
        ("new users (head/tail)", f"{s['new_users']:,} ({s['new_head']:,}/{s['new_tail']:,})"),
        (
            "head threshold (existing/new)",
            f"{s['head_threshold']['existing']}/{s['head_threshold']['new']}",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def cmd_stats(args: argparse.Namespace) -> int:
    from dist_tp.data.stream import open_prepared

    meta = open_prepared(args.dir).meta
    if args.json:
        print(json.dumps(meta["stats"]))
    else:
        print(format_stats(meta))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from dist_tp.config import load_config
    from dist_tp.run.lifecycle import exit_process, run

    cfg = load_config(args.config, args.overrides)
    out = args.output or f"runs/{Path(args.config).stem}-seed{cfg.train.seed}"
    outcome = run(cfg, out, resume=args.resume, overwrite=args.overwrite)
    if outcome.metrics is not None and outcome.is_main:
        print(format_metrics(outcome.metrics))
        print(f"run folder: {out}")
        if outcome.tracking:
            print(outcome.tracking)
    return exit_process(outcome.code)


def cmd_mlflow_sync(args: argparse.Namespace) -> int:
    from dist_tp.tracking import sync

    failed = 0
    for folder in args.runs:  # one folder's failure is one error line; the others go on
        try:
            sent, run_id, uri = sync(folder, args.uri)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{folder}: {sent} events sent to run {run_id or '?'} at {uri}")
    return 2 if failed else 0


def _split(values: list[str] | None) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [v.strip() for value in values or [] for v in value.split(",") if v.strip()]


def _experiment_runs(args: argparse.Namespace, *, epochs: bool = False) -> list:
    """The finished runs of ``--experiment`` (MLflow) or of the run folders given, less those
    ``--where`` leaves out."""
    if bool(args.experiment) == bool(args.runs):
        raise ConfigError("give run folders (or folders above them), or --experiment NAME")
    if args.experiment:
        from dist_tp.experiments.report import load_runs

        runs = load_runs(args.experiment, args.uri or "", epochs=epochs)
        if not runs:
            raise ConfigError(f"experiment {args.experiment!r} has no finished training runs")
    else:
        from dist_tp.experiments.folders import load_folders

        runs = load_folders(args.runs)
    for spec in args.where or []:
        key, sep, value = spec.partition("=")
        if not sep:
            raise ConfigError(f"--where {spec!r} is not of the form key=value")
        wanted = {value, *value.split(",")}  # a,b: either
        if key in ("dataset", "backbone", "method", "seed"):
            runs = [r for r in runs if str(getattr(r, key)) in wanted]
        else:
            runs = [r for r in runs if r.params.get(key) in wanted]
    if not runs:
        raise ConfigError(f"no finished run has {' and '.join(args.where)}")
    return runs


def cmd_compare(args: argparse.Namespace) -> int:
    from dist_tp.experiments.report import compare_tables, make_rows, write_csv

    runs = _experiment_runs(args)
    rows = make_rows(runs, _split(args.ignore))
    text, records = compare_tables(rows, args.metric or ["HR@10", "NDCG@10"])
    print(text)
    if args.csv:
        write_csv(args.csv, records)
        print(f"CSV: {args.csv}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from dist_tp.experiments.report import make_rows
    from dist_tp.tracking import log_figures
    from dist_tp.tracking.plots import experiment_figures

    runs = _experiment_runs(args)
    paths = experiment_figures(runs, make_rows(runs, _split(args.ignore)), args.out)
    for path in paths:
        print(path)
    if paths and args.experiment and not args.no_log:
        run_id = log_figures(args.experiment, paths, args.uri or "")
        print(f"logged as artifacts of MLflow run {run_id} ('plots')")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from dist_tp.experiments.folders import parse_extra_eval
    from dist_tp.experiments.sweep import execute, plan

    extras = [parse_extra_eval(text) for text in args.extra_eval or []]
    experiment = args.experiment or f"{Path(args.config).stem}-sweep"
    out = args.out or f"runs/sweep/{experiment}"
    runs = plan(
        args.config,
        args.grid or [],
        args.seeds,
        out=out,
        experiment=experiment,
        overrides=args.overrides,
    )
    status = execute(args.config, runs, parallel=args.parallel, extras=extras)
    for name, result in status.items():
        print(f"{name}: {result}")
    failed = [n for n, r in status.items() if "failed" in r or r.startswith(("stopped", "not"))]
    print(f"{len(status) - len(failed)}/{len(status)} runs done; experiment {experiment!r}")
    return 1 if failed else 0


def cmd_finish(args: argparse.Namespace) -> int:
    from dist_tp.experiments.folders import finish, parse_extra_eval

    extras = [parse_extra_eval(text) for text in args.extra_eval or []]
    status = finish(args.runs, extras)
    for folder, result in status.items():
        print(f"{folder}: {result}")
    return 1 if any(r.startswith("failed") for r in status.values()) else 0


def _read_sequences(source: str) -> list[list[str]]:
    """One sequence per line (items separated by spaces or commas, oldest first); ``-`` is
    standard input. An empty line is kept (its output line is the cold-start fallback), with
    a warning."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{source}: cannot read: {exc}") from None
    sequences = [line.replace(",", " ").split() for line in text.splitlines()]
    for number, sequence in enumerate(sequences, 1):
        if not sequence:
            print(
                f"warning: {source}:{number}: empty line: its recommendations are the most "
                "popular training items",
                file=sys.stderr,
            )
    return sequences


def cmd_recommend(args: argparse.Namespace) -> int:
    from dist_tp.evaluation.recommend import Predictor

    if args.n < 1:
        raise ConfigError(f"-n must be >= 1, got {args.n}")
    if bool(args.items) == bool(args.input):
        raise ConfigError("give the items of one sequence, or --input FILE (one per line)")
    sequences = _read_sequences(args.input) if args.input else [args.items]
    predictor = Predictor.from_run(args.run)
    results = predictor.recommend_results(
        sequences, args.n, exclude_history=not args.include_history, adapt_steps=args.adapt_steps
    )
    for number, (sequence, result) in enumerate(zip(sequences, results), 1):
        where = f"{args.input}:{number}" if args.input else "the sequence"
        if result.fallback and sequence:
            print(
                f"warning: {where}: no known item ({result.unknown} unknown ids): the most "
                "popular training items instead",
                file=sys.stderr,
            )
        elif result.unknown:
            print(f"warning: {where}: {result.unknown} unknown ids left out", file=sys.stderr)
        if args.json:
            record = {"items": result.items, "fallback": result.fallback}
            print(json.dumps({**record, "unknown": result.unknown}))
        else:
            print(" ".join(str(item) for item in result.items))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dist_tp.core.files import write_json
    from dist_tp.run.folder_lock import run_folder_held
    from dist_tp.run.saved import evaluate_run

    run = Path(args.run)
    held = contextlib.nullcontext()
    if not args.out and not args.overrides and run.exists():  # rewrites the run's metrics.json
        held = run_folder_held(run if run.is_dir() else run.parent, "pass --out FILE")
    with held:
        metrics, folder = evaluate_run(args.run, args.overrides)
        target = Path(args.out) if args.out else None
        if target is None and not args.overrides:
            target = folder / "metrics.json"
        if target is not None:
            write_json(target, metrics)
    print(format_metrics(metrics))
    if target is None:
        print("(not written: these differ from the run's own settings; pass --out FILE)")
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    import json

    from dist_tp.experiments.folders import run_folders

    if args.mean + args.pairs + (args.reference is not None) > 1:
        raise ConfigError("choose one of --mean, --pairs and --reference")
    if args.mean or args.pairs or args.reference is not None:
        return _seed_table(args)
    if args.experiment:
        raise ConfigError(
            "--experiment makes tables over seeds: add --mean, --pairs or --reference"
        )
    if not args.runs:
        raise ConfigError("give run folders (with metrics.json), or folders above them")
    rows = []
    for given in args.runs:
        for folder in run_folders([given], finished=True):
            path = folder / "metrics.json"
            try:
                metrics = json.loads(path.read_text())
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
            rows.append((given if folder == Path(given) else str(folder), metrics))
    k = args.k
    head = (
        f"| run | existing HR@{k} | NDCG@{k} | tail HR@{k} | new HR@{k} | NDCG@{k} | tail HR@{k} |"
    )
    print(head)
    print("| --- " * 7 + "|")
    for run, m in rows:
        e, n = m["existing"], m["new"]
        cells = [
            e["all"][f"HR@{k}"],
            e["all"][f"NDCG@{k}"],
            e["tail"][f"HR@{k}"],
            n["all"][f"HR@{k}"],
            n["all"][f"NDCG@{k}"],
            n["tail"][f"HR@{k}"],
        ]
        print(f"| {run} | " + " | ".join(f"{c:.4f}" for c in cells) + " |")
    return 0


def _seed_table(args: argparse.Namespace) -> int:
    """``dist-tp table --mean|--pairs|--reference``: tables over seeds, from run folders or
    from an MLflow experiment (one implementation, :mod:`dist_tp.experiments.tables`)."""
    from dist_tp.experiments.report import make_rows
    from dist_tp.experiments.tables import (
        PRESETS,
        default_columns,
        mean_table,
        pairs_table,
        parse_columns,
        reference_table,
    )

    runs = _experiment_runs(args, epochs=True)
    rows = make_rows(runs, _split(args.ignore))
    columns = parse_columns(_split(args.column)) if args.column else None
    if args.mean:
        print(mean_table(rows, columns or default_columns(runs, "summary")))
    elif args.pairs:
        print(pairs_table(rows, columns or PRESETS["pairs"]))
    else:
        print(reference_table(rows, columns or PRESETS["main"], args.reference))
    return 0


def _add_sources(p: argparse.ArgumentParser, *, folders: str) -> None:
    """Runs from folders or from MLflow, and which of them make a model."""
    p.add_argument("runs", nargs="*", help=folders)
    p.add_argument("--experiment", help="read the finished runs of this MLflow experiment instead")
    p.add_argument("--uri", help="tracking URI (default: MLFLOW_TRACKING_URI or MLflow's)")
    p.add_argument(
        "--where",
        action="append",
        metavar="KEY=VALUE",
        help="only runs with this config value (train.loss=ce) or dataset/backbone/method/seed; "
        "a,b: either (repeatable: all of them)",
    )
    p.add_argument(
        "--ignore",
        action="append",
        metavar="KEY",
        help="runs that differ only in these config keys (train.epochs,train.patience) are one "
        "model; of two runs with one seed, the first found is kept (repeatable)",
    )


_EXTRA_EVAL = (
    "also evaluate each finished run's best checkpoint with other eval.* settings into "
    "RUN/metrics_TAG.json, once: 'TAG KEY=VALUE ...', e.g. "
    "'nohist eval.exclude_history=false' (repeatable)"
)


def format_metrics(metrics: dict, ks: tuple[int, ...] | None = None) -> str:
    """A small table: rows role/group, columns HR@k and NDCG@k (default: N = 10, or every N
    measured when 10 is not)."""
    if ks is None:
        first = next(iter(metrics.get("existing", {}).values()), {})
        measured = sorted(int(key[3:]) for key in first if re.fullmatch(r"HR@\d+", key))
        ks = (10,) if 10 in measured or not measured else tuple(measured)
    lines = ["| users | group | n | " + " | ".join(f"HR@{k} | NDCG@{k}" for k in ks) + " |"]
    lines.append("| --- " * (3 + 2 * len(ks)) + "|")
    for role in ("existing", "new"):
        for group, values in metrics.get(role, {}).items():
            cells = " | ".join(f"{values[f'HR@{k}']:.4f} | {values[f'NDCG@{k}']:.4f}" for k in ks)
            lines.append(f"| {role} | {group} | {values['users']} | {cells} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from dist_tp.data.prepare import AUTO_FACTOR, DEFAULT_MEMORY_LIMIT, ENGINES
    from dist_tp.data.readers import FORMATS

    parser = argparse.ArgumentParser(
        prog="dist-tp", description="Sequential recommenders for tail and new users."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="raw interaction log -> prepared user-task parquet")
    p.add_argument("name", nargs="?", help="a known dataset (ml-100k, ml-1m, ...)")
    p.add_argument(
        "--input",
        help="raw file, folder or glob (local, or any fsspec URL such as s3://b/events/*.parquet)",
    )
    p.add_argument("--format", choices=FORMATS, help="layout of --input")
    p.add_argument("--output", required=True, help="folder to write")
    p.add_argument("--columns", help="for csv/parquet: user=COL,item=COL[,timestamp=COL]")
    p.add_argument("--on-bad-lines", choices=("error", "skip"), default="error")
    p.add_argument("--min-item-count", type=int, default=5)
    p.add_argument("--min-user-count", type=int, default=10)
    p.add_argument("--new-user-fraction", type=float, default=0.2)
    p.add_argument("--head-fraction", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0, help="seed of the existing/new split")
    p.add_argument("--shards", type=int, default=4, help="number of user shard files")
    p.add_argument("--row-group-size", type=int, default=1024, help="users per row group")
    p.add_argument(
        "--force", action="store_true", help="replace an existing prepared folder at --output"
    )
    p.add_argument(
        "--encoding",
        default="utf-8",
        help="of a text/csv/json input (default utf-8; e.g. latin-1 for such an export)",
    )
    p.add_argument(
        "--engine",
        choices=ENGINES,
        default="auto",
        help="memory: read the whole log at once (fastest for small logs); out-of-core: "
        "stream it through buckets of users spilled to disk, memory bounded by "
        "--memory-limit, on every core; auto (default): out-of-core when the input's size "
        f"on disk x {AUTO_FACTOR} exceeds --memory-limit (inputs over 125 MB at 2GB). Both "
        "engines write the same folder.",
    )
    p.add_argument(
        "--memory-limit",
        default=DEFAULT_MEMORY_LIMIT,
        help=f"memory budget of the out-of-core engine (default {DEFAULT_MEMORY_LIMIT}), "
        "e.g. 512MB, 4GB, 8GiB",
    )
    p.add_argument("--workers", type=int, help="processes of the out-of-core engine (all cores)")
    p.add_argument(
        "--events",
        default="listen",
        help="yambda: which events count, comma-separated from listen, like, dislike, unlike, "
        "undislike (default listen)",
    )
    p.add_argument(
        "--min-played-ratio",
        type=int,
        default=50,
        help="yambda: a listen counts when played_ratio_pct >= this (default 50; 0: all)",
    )
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "synth",
        help="generate an industrial-like interaction log (Parquet) for tests and benchmarks",
        description="Long-tailed users, Zipf item popularity, items in latent clusters with "
        "planted successors (a sequential signal a model can learn), timestamps. "
        "Deterministic by seed whatever --workers; memory bounded (chunks of users).",
    )
    p.add_argument("--events", type=_count, required=True, help="total events (e.g. 100M)")
    p.add_argument("--users", type=_count, required=True)
    p.add_argument("--items", type=_count, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", required=True, help="folder to write (absent or empty)")
    p.add_argument(
        "--schema",
        choices=("generic", "yambda"),
        default="generic",
        help="generic: part-*.parquet with user, item, timestamp (int64); yambda: Yambda's "
        "flat schema, listens/ and likes/",
    )
    p.add_argument("--item-exponent", type=float, default=1.1, help="Zipf exponent of items")
    p.add_argument(
        "--user-exponent", type=float, default=1.5, help="tail index of user activity (Lomax)"
    )
    p.add_argument("--clusters", type=int, help="latent item clusters (default ~sqrt(items))")
    p.add_argument("--p-next", type=float, default=0.3, help="P(planted successor)")
    p.add_argument("--p-stay", type=float, default=0.5, help="P(same cluster)")
    p.add_argument("--rows-per-file", type=_count, default=5_000_000)
    p.add_argument("--workers", type=int, help="processes (default: all cores)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("stats", help="print the Table-2 summary of a prepared folder")
    p.add_argument("dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("train", help="train a model from a YAML config")
    p.add_argument("config", help="YAML file, e.g. configs/ml-100k/sasrec.yaml")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=3")
    p.add_argument("--output", help="run folder (default: runs/<config>-seed<seed>)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last.pt")
    p.add_argument(
        "--overwrite", action="store_true", help="replace the run the output folder holds"
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "table",
        help="test metrics of run folders side by side; with --mean, --pairs or --reference, "
        "tables over seeds from run folders or an MLflow experiment",
    )
    _add_sources(p, folders="run folders (with metrics.json), or folders above them")
    p.add_argument("--k", type=int, default=10, help="N of the per-run table (default 10)")
    p.add_argument("--mean", action="store_true", help="every model: mean ± std over seeds")
    p.add_argument(
        "--pairs",
        action="store_true",
        help="each -TP model beside its backbone over shared seeds: change and paired p",
    )
    p.add_argument(
        "--reference",
        metavar="MODEL",
        help="every model against this one (a label of the --mean table, e.g. 'SASRec-TP k=2')",
    )
    p.add_argument(
        "--column",
        action="append",
        help="[SPLIT/]ROLE/GROUP/METRIC (new/tail/HR@10, nohist/existing/all/HR@10; the "
        "validation figures: best_valid/new/all/NDCG@10, an extra evaluation's "
        "nohist_valid/...) or a preset: summary, pairs, main, groups (repeatable, or "
        "comma-separated)",
    )
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("evaluate", help="recompute metrics.json from a saved run")
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("overrides", nargs="*", help="eval.key=value (e.g. eval.exclude_history=false)")
    p.add_argument(
        "--out", help="write the metrics here (default: RUN/metrics.json, if no overrides)"
    )
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "recommend", help="top-n original item ids after item sequences, from a saved run"
    )
    p.add_argument("run", help="run folder or checkpoint file")
    p.add_argument("items", nargs="*", help="one sequence's original item ids, oldest first")
    p.add_argument("-n", type=int, default=10, help="recommendations per sequence (default 10)")
    p.add_argument(
        "--input",
        help="a file with one sequence per line (ids split by spaces or commas); - = stdin",
    )
    p.add_argument(
        "--include-history", action="store_true", help="allow items already in the sequence"
    )
    p.add_argument(
        "--adapt-steps",
        type=int,
        help="test-time adaptation: SGD steps on each sequence's own windows before scoring "
        "(default: the run's eval.adapt_steps)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help='one JSON object per line: {"items": [...], "fallback": true when the sequence '
        'had no known item (the most popular items), "unknown": ids left out}',
    )
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("mlflow-sync", help="replay a run folder's spooled MLflow events")
    p.add_argument("runs", nargs="+", help="run folders (with mlflow/spool.jsonl)")
    p.add_argument("--uri", help="tracking URI (default: the one the run started with)")
    p.set_defaults(func=cmd_mlflow_sync)

    p = sub.add_parser(
        "compare", help="Table 3 and the head/tail breakdown, from MLflow or run folders"
    )
    _add_sources(p, folders="run folders, or folders above them (instead of --experiment)")
    p.add_argument("--metric", action="append", help="HR@10, NDCG@10, HR@20, ... (repeatable)")
    p.add_argument("--csv", help="also write the long-format table here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sweep", help="a grid of runs x seeds into one MLflow experiment")
    p.add_argument("config")
    p.add_argument(
        "overrides",
        nargs="*",
        help="key=value for every run; {seed} in a value is the run's seed (e.g. "
        "train.init_from=runs/sasrec_seed{seed})",
    )
    p.add_argument("--grid", action="append", help="key=v1,v2,... (repeatable: the product)")
    p.add_argument(
        "--seeds",
        default="3",
        help="for every grid point: N (seeds 0..N-1, default 3), a list (1,2) or a range (3-5)",
    )
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--experiment", help="MLflow experiment (default: <config>-sweep)")
    p.add_argument("--out", help="runs go to OUT/<name> (default: runs/sweep/<experiment>)")
    p.add_argument("--extra-eval", action="append", metavar="'TAG KEY=VALUE ...'", help=_EXTRA_EVAL)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "finish",
        help="runs stopped from outside (a deadline, a kill): evaluate their best checkpoints",
    )
    p.add_argument("runs", nargs="+", help="run folders, or folders above them")
    p.add_argument("--extra-eval", action="append", metavar="'TAG KEY=VALUE ...'", help=_EXTRA_EVAL)
    p.set_defaults(func=cmd_finish)

    p = sub.add_parser("plot", help="the paper's figures from an MLflow experiment or run folders")
    _add_sources(p, folders="run folders, or folders above them (instead of --experiment)")
    p.add_argument("--out", required=True, help="folder for the PNG files")
    p.add_argument("--no-log", action="store_true", help="do not log the figures to MLflow")
    p.set_defaults(func=cmd_plot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        code = args.func(args)
    except (DataError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
