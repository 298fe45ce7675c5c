"""The run: build the model, fit it (joint epochs from ``dist_tp.algorithms.joint``, TP
epochs from ``dist_tp.algorithms.tp``), keep the best checkpoint, evaluate, and write the run
folder (rank 0 writes; all ranks evaluate).

Validation NDCG@10 after each epoch drives early stopping; the best model is kept and finally
evaluated on the test targets of existing and new users.

Run folder: ``config.yaml`` (resolved), ``checkpoint.pt`` (best model), ``last.pt`` (resume
point: each epoch's end, and every ``train.checkpoint_every`` steps), ``history.json``
(per-epoch figures) and ``metrics.json``. Each stepper seeds its random streams per step from
(seed, epoch, step, rank), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import yaml

from dist_tp.algorithms.joint import JointStepper
from dist_tp.config import Config, ConfigError, apply_overrides, from_dict, to_dict
from dist_tp.core.device import module_device, resolve_device, to_device, warn_if_oversubscribed
from dist_tp.core.files import (
    load_checkpoint,
    save_checkpoint,
    write_json,
    write_text,
)
from dist_tp.data.examples import eval_queries
from dist_tp.data.stream import (
    UserStream,
    concat_ranges,
    open_prepared,
    stream_sequences,
    to_sequences,
)
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.models import Popularity, build_model
from dist_tp.parallel.comm import LocalComm
from dist_tp.tracking import (
    NullTracker,
    epoch_metrics,
    finish_run,
    metrics_to_flat,
    start_run,
    step_metrics,
)

log = logging.getLogger(__name__)
DISC_BATCH = 1024  # users encoded at once for the discriminator's final figures
DISC_KEYS = ("disc_acc", "disc_auc", "disc_majority")  # what ``disc_figures`` returns


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))


def training_counts(path: str, num_items: int) -> np.ndarray:
    """[N+1] how often each item is a training item (leave-last-two-out) of an existing user;
    streamed, one row group at a time."""
    counts = np.zeros(num_items + 1, dtype=np.int64)
    for seqs in stream_sequences(path, roles=["existing"]):
        position = concat_ranges(seqs.lengths)  # [nnz] index within the user
        is_train = position < np.repeat(seqs.lengths - 2, seqs.lengths)
        counts += np.bincount(seqs.items[is_train], minlength=num_items + 1)
    return counts


def build(cfg: Config, num_items: int, path: str):
    """The model named by the config; popularity is counted from the training items."""
    if cfg.model.name == "pop":
        return Popularity(training_counts(path, num_items))
    return build_model(cfg.model, num_items)


def _eval_kwargs(cfg: Config) -> dict:
    return {
        "max_len": cfg.model.max_len,
        "ks": cfg.eval.ks,
        "exclude_history": cfg.eval.exclude_history,
        "batch_size": cfg.eval.batch_size,
    }


def _final_metrics(model, cfg: Config, comm=None) -> dict:
    result = evaluate(model, cfg.data.path, comm=comm, **_eval_kwargs(cfg))
    test = result["test"]
    return {**test, "validation": result["validation"]}


def make_stepper(model, cfg: Config, comm):
    if cfg.train.method == "tp":
        from dist_tp.algorithms.tp.trainer import TPStepper

        return TPStepper(model, cfg, comm=comm)
    return JointStepper(model, cfg, comm)


def run_training(
    cfg: Config, out: str | Path, *, resume: bool = False, comm=None, tracker=None
) -> dict:
    """Train (or count, for popularity), evaluate, and write the run folder (rank 0 writes).

    ``tracker`` (``dist_tp.tracking.Tracker``, rank 0) receives params, per-epoch and final
    metrics and the run's files; the CLI makes one, the Python API tracks nothing by default.
    """

    comm = comm or LocalComm()
    tracker = tracker or NullTracker()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads > 0:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if comm.is_main and device.type == "cpu":
        warn_if_oversubscribed()
    set_seed(cfg.train.seed)
    prepared = open_prepared(cfg.data.path)
    if comm.is_main:
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        start_run(tracker, cfg, out, prepared.meta, world_size=comm.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model = build(cfg, prepared.num_items, cfg.data.path).to(device)
    if isinstance(model, Popularity):
        if cfg.train.method != "joint":
            raise ConfigError("model 'pop' has nothing to train: use train.method=joint")
        metrics = _final_metrics(model, cfg, comm)
        if comm.is_main:
            save_checkpoint(out / "checkpoint.pt", _ckpt({"model": model}, cfg, 0, []))
    else:
        metrics = _fit(make_stepper(model, cfg, comm), cfg, out, resume, comm, tracker)
    metrics["dataset"] = {"path": cfg.data.path, "sha256": prepared.meta["source"]["sha256"]}
    if comm.is_main:
        write_json(out / "metrics.json", metrics)
        finish_run(tracker, cfg, out, metrics)
    return metrics


def _ckpt(modules: dict, cfg: Config, epoch: int, history: list, **extra) -> dict:
    return {
        **{name: m.state_dict() for name, m in modules.items()},
        "config": to_dict(cfg),
        "epoch": epoch,
        "history": history,
        **extra,
    }


def _check_mid_epoch_world(state: dict, path: Path, world_size: int) -> None:
    """A mid-epoch ``last.pt`` resumes only with the ranks that wrote it: each rank's share of
    the epoch's users (and so the steps already taken) depends on their number."""
    written = state.get("world_size", world_size)
    if written != world_size:
        raise ConfigError(
            f"{path}: written in the middle of epoch {state['epoch']} by {written} rank(s); "
            f"this run has {world_size}. Resume it with {written}, or from an epoch's end."
        )


def _fit(stepper, cfg: Config, out: Path, resume: bool, comm, tracker) -> dict:
    modules, model = stepper.modules(), stepper.model
    history: list[dict] = []
    start, start_step, best, since_best = 0, 0, -math.inf, 0
    if resume and (out / "last.pt").is_file():
        state = load_checkpoint(out / "last.pt")
        for name, module in modules.items():
            module.load_state_dict(state[name])
        stepper.load_state_dict(state["stepper"])
        history = state["history"]
        best, since_best = state["best"], state["since_best"]
        if state.get("epoch_done", True):
            start = state["epoch"] + 1
        else:
            _check_mid_epoch_world(state, out / "last.pt", comm.world_size)
            start, start_step = state["epoch"], state["next_step"]
        log.info("resumed from %s at epoch %d, step %d", out / "last.pt", start, start_step)
    elif resume:
        log.warning("nothing to resume: %s has no last.pt; training starts from scratch", out)

    def save_last(epoch: int, next_step: int, epoch_done: bool) -> None:
        stepper_state = stepper.state_dict()  # every rank: ZeRO gathers its partitions here
        if comm.is_main:
            extra = {
                "best": best,
                "since_best": since_best,
                "stepper": stepper_state,
                "next_step": next_step,
                "epoch_done": epoch_done,
                "world_size": comm.world_size,
            }
            save_checkpoint(out / "last.pt", _ckpt(modules, cfg, epoch, history, **extra))
        comm.barrier()  # rank 0's files are complete before anyone reads them

    every, log_every = cfg.train.checkpoint_every, cfg.track.log_every
    window: list = []  # TP inner-loop stats since the last step metrics
    for epoch in range(start, cfg.train.epochs):
        tracked: dict = {}  # this epoch's validation figures of every group, for MLflow

        def on_step(step: int, stats=None, epoch: int = epoch) -> None:
            if every and (step + 1) % every == 0:
                save_last(epoch, step + 1, epoch_done=False)
            if log_every and stats is not None:
                window.append(stats)
                if len(window) == log_every:
                    tracker.log_metrics(
                        step_metrics(window), step=epoch * stepper.steps_per_epoch + step
                    )
                    window.clear()

        first = start_step if epoch == start else 0
        record = {"epoch": epoch, **stepper.run_epoch(epoch, start_step=first, on_step=on_step)}
        validate = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        if validate:
            t0 = time.perf_counter()
            val = evaluate(
                model, cfg.data.path, splits=("validation",), comm=comm, **_eval_kwargs(cfg)
            )
            ndcg = val["validation"]["existing"]["all"]["NDCG@10"]
            record.update(valid_ndcg10=ndcg, eval_seconds=time.perf_counter() - t0)
            record["valid_hr10"] = val["validation"]["existing"]["all"]["HR@10"]
            tracked = metrics_to_flat(val["validation"], "valid")
            if ndcg > best:
                best, since_best = ndcg, 0
                if comm.is_main:
                    save_checkpoint(out / "checkpoint.pt", _ckpt(modules, cfg, epoch, history))
            else:
                since_best += 1
        history.append(record)
        log.info(
            "epoch %d  loss %.4f  %s windows/s%s%s",
            epoch,
            record["loss"],
            f"{record['windows_per_s']:,.0f}",
            f"  valid NDCG@10 {record['valid_ndcg10']:.4f}" if validate else "",
            f"  disc acc {record['disc_acc']:.3f} auc {record['disc_auc']:.3f}"
            if "disc_acc" in record
            else "",
        )
        if comm.is_main:
            write_json(out / "history.json", history)
            tracker.log_metrics({**epoch_metrics(record), **tracked}, step=epoch)
        save_last(epoch, 0, epoch_done=True)
        if validate and since_best >= cfg.train.patience:
            log.info("early stop: no better validation NDCG@10 for %d evaluations", since_best)
            break
    if (out / "checkpoint.pt").is_file():
        state = load_checkpoint(out / "checkpoint.pt")
        for name, module in modules.items():
            module.load_state_dict(state[name])
    metrics = _final_metrics(model, cfg, comm)
    if "disc" in modules:
        metrics["discriminator"] = discriminator_metrics(model, modules["disc"], cfg, comm)
    return metrics


def discriminator_metrics(model, disc, cfg: Config, comm=None) -> dict:
    """The discriminator on the existing users' test inputs: accuracy, AUC, majority share.

    Users are streamed (each rank its own row groups, ``DISC_BATCH`` at a time); the ranks'
    logits meet on rank 0, which computes the figures and sends them to every rank."""
    from dist_tp.algorithms.tp.trainer import disc_figures

    comm = comm or LocalComm()
    stream = UserStream(
        cfg.data.path,
        rank=comm.rank,
        world_size=comm.world_size,
        shuffle=False,
        roles=["existing"],
        batch_rows=DISC_BATCH,
        columns=["user", "role", "is_head", "items"],
    )
    device = module_device(model)
    model.eval()
    logits, labels = [torch.zeros(0)], [torch.zeros(0)]
    with torch.no_grad():
        for batch in stream:
            q = eval_queries(to_sequences(batch), max_len=cfg.model.max_len, offset=1)
            logits.append(disc(model.encode(to_device(q.inputs, device))).float().cpu())
            labels.append(torch.from_numpy(q.is_head.astype(np.float32)))
    mine = (torch.cat(logits), torch.cat(labels))
    if comm.world_size == 1:
        return disc_figures(*mine)
    gathered = comm.gather_object(mine)
    figures = torch.zeros(3, dtype=torch.float64)
    if comm.is_main:
        result = disc_figures(*(torch.cat(parts) for parts in zip(*gathered, strict=True)))
        figures = torch.tensor([result[key] for key in DISC_KEYS], dtype=torch.float64)
    comm.broadcast_(figures, src=0)
    return dict(zip(DISC_KEYS, figures.tolist(), strict=True))


def evaluate_run(path: str | Path, overrides: Sequence[str] = ()) -> tuple[dict, Path]:
    """Recompute a run's metrics from its checkpoint: (metrics, run folder). ``overrides``
    change ``eval.*`` keys only (e.g. ``eval.exclude_history=false``). A TP run's
    discriminator figures are recomputed too."""
    model, cfg, state = _load_run(path)
    if overrides:
        bad = [o for o in overrides if not o.startswith("eval.")]
        if bad:
            raise ConfigError(
                f"{bad[0]!r}: only eval.* keys can change when evaluating a saved run"
            )
        cfg = from_dict(Config, apply_overrides(to_dict(cfg), list(overrides)))
    device = resolve_device("auto")
    model.to(device)
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    metrics = _final_metrics(model, cfg)
    if "disc" in state:
        from dist_tp.algorithms.tp.discriminator import Discriminator

        disc = Discriminator(cfg.model.dim, cfg.tp.disc_hidden)
        disc.load_state_dict(state["disc"])
        metrics["discriminator"] = discriminator_metrics(model, disc.to(device).eval(), cfg)
    metrics["dataset"] = {
        "path": cfg.data.path,
        "sha256": open_prepared(cfg.data.path).meta["source"]["sha256"],
    }
    return metrics, folder


def load_run(path: str | Path):
    """(model on the CPU, config) from a run folder or a checkpoint file."""
    model, cfg, _ = _load_run(path)
    return model, cfg


def _load_run(path: str | Path):
    """(model on the CPU, config, the checkpoint's whole state)."""
    path = Path(path)
    ckpt_path = path / "checkpoint.pt" if path.is_dir() else path
    state = load_checkpoint(ckpt_path)
    cfg = from_dict(Config, state["config"])
    prepared = open_prepared(cfg.data.path)
    model = build(cfg, prepared.num_items, cfg.data.path)
    if not isinstance(model, Popularity):
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as exc:  # keys or shapes differ: another version or config
            first = str(exc).splitlines()[1].strip() if "\n" in str(exc) else str(exc)
            raise ConfigError(
                f"{ckpt_path}: the checkpoint does not fit the model its config describes "
                f"(written by another version of dist_tp?): {first}"
            ) from None
    model.eval()
    return model, cfg, state
