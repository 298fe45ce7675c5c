"""The run loop: build the model and the method, fit it epoch by epoch, keep the best
checkpoint, evaluate, and write the run folder (rank 0 writes; all ranks evaluate).

The loop owns the run's state: epochs, validation after each (``train.eval_every``), early
stopping on validation NDCG@10 (or, ``train.lr_decays`` times, a lower learning rate from the
best weights instead), checkpoints (:mod:`dist_tp.run.checkpoints`) and what is
reported to the tracker. The method is a :class:`dist_tp.algorithms.Stepper`; the optimizer
host (:func:`dist_tp.parallel.host.build_host`) and the prepared data are built here once and
handed down. Each stepper seeds its random streams per step from (seed, epoch, step, rank),
so a resumed run continues exactly as an uninterrupted one.

Run folder: ``config.yaml`` (resolved), ``checkpoint.pt`` (best model), ``last.pt`` (resume
point), ``history.json`` (per-epoch figures) and ``metrics.json``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from dist_tp.algorithms import Stepper, make_stepper
from dist_tp.config import Config, ConfigError, to_dict
from dist_tp.core.device import resolve_device, set_threads, warn_if_oversubscribed
from dist_tp.core.files import WriteError, write_json, write_text
from dist_tp.data.stream import PreparedData
from dist_tp.evaluation.adapt import Adaptation
from dist_tp.evaluation.evaluate import evaluate
from dist_tp.models import Popularity
from dist_tp.models.saved import build, check_loss_fits, initial_weights, load_initial_weights
from dist_tp.parallel.comm import LocalComm
from dist_tp.parallel.host import build_host
from dist_tp.run.checkpoints import Progress, RunCheckpoints
from dist_tp.tracking import (
    NullTracker,
    epoch_metrics,
    finish_run,
    metrics_to_flat,
    start_run,
    step_metrics,
)

log = logging.getLogger(__name__)


def set_seed(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))


def eval_kwargs(cfg: Config) -> dict:
    """The ``eval.*`` settings as :func:`dist_tp.evaluation.evaluate.evaluate` takes them."""
    return {
        "max_len": cfg.model.max_len,
        "ks": cfg.eval.ks,
        "exclude_history": cfg.eval.exclude_history,
        "batch_size": cfg.eval.batch_size,
        "item_chunk": cfg.eval.item_chunk,
        "max_users": cfg.eval.max_users,
        "sample_seed": cfg.eval.sample_seed,
        "adapt_steps": cfg.eval.adapt_steps,
        "adapt_lr": cfg.eval.adapt_lr,
        "adapt_params": cfg.eval.adapt_params,
        "adapt_windows": cfg.eval.adapt_windows,
        "loss": cfg.train.loss,
        "num_negatives": cfg.train.num_negatives,
        "negatives": cfg.train.negatives,
    }


def test_metrics(model, cfg: Config, data: PreparedData, comm=None) -> dict:
    """Test metrics of existing and new users, with the validation figures beside them;
    ``adapt`` says how users were adapted first (``eval.adapt_steps`` > 0)."""
    result = evaluate(model, data, comm=comm, **eval_kwargs(cfg))
    metrics = {**result["test"], "validation": result["validation"]}
    if cfg.eval.max_users:
        metrics["sample"] = {"max_users": cfg.eval.max_users, "seed": cfg.eval.sample_seed}
    if cfg.eval.adapt_steps and not isinstance(model, Popularity):
        metrics["adapt"] = Adaptation.from_config(cfg).record()
    return metrics


def run_training(
    cfg: Config,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    comm=None,
    tracker=None,
) -> dict:
    """Train (or count, for popularity), evaluate, and write the run folder (rank 0 writes).

    ``resume`` continues the run in ``out`` from its ``last.pt`` (refused when the config
    changes what the run is); a fresh run refuses a folder holding another run's files unless
    ``overwrite``.

    ``tracker`` (``dist_tp.tracking.Tracker``, rank 0) receives params, per-epoch and final
    metrics and the run's files; :func:`dist_tp.run.lifecycle.run` makes one, the Python API
    tracks nothing by default.
    """
    comm = comm or LocalComm()
    tracker = tracker or NullTracker()
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WriteError(f"{out}: cannot create the run folder: {exc.strerror or exc}") from None
    checkpoints = RunCheckpoints(out, cfg, comm)
    checkpoints.check_start(resume=resume, overwrite=overwrite)
    set_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    if comm.is_main and device.type == "cpu":
        warn_if_oversubscribed()
    set_seed(cfg.train.seed)
    data = PreparedData.of(cfg.data.path)  # opened once, handed to every reader of the run
    init = initial_weights(cfg, data) if cfg.train.init_from and not resume else None
    if comm.is_main:
        write_text(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
        start_run(tracker, cfg, out, data.meta, world_size=comm.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    check_loss_fits(cfg, data.num_items)
    model = build(cfg, data).to(device)
    if isinstance(model, Popularity):
        if cfg.train.method != "joint":
            raise ConfigError("model 'pop' has nothing to train: use train.method=joint")
        metrics = test_metrics(model, cfg, data, comm)
        checkpoints.save_best({"model": model}, 0, [])
    else:
        if init is not None:
            load_initial_weights(model, init)
        stepper = make_stepper(model, cfg, host=build_host(cfg.train, comm), data=data)
        progress = checkpoints.resume(stepper) if resume else Progress()
        fit(stepper, cfg, progress, checkpoints, data=data, comm=comm, tracker=tracker)
        checkpoints.restore_best(stepper.modules())
        metrics = test_metrics(model, cfg, data, comm)
        metrics.update(stepper.final_metrics())
    metrics["dataset"] = {"path": cfg.data.path, "sha256": data.sha256}
    if comm.is_main:
        write_json(out / "metrics.json", metrics)
        finish_run(tracker, cfg, out, metrics)
    return metrics


def fit(
    stepper: Stepper,
    cfg: Config,
    progress: Progress,
    checkpoints: RunCheckpoints,
    *,
    data: PreparedData,
    comm,
    tracker,
) -> None:
    """Epochs ``progress.epoch..`` (the first from step ``progress.step``) until
    ``train.epochs`` or early stopping; ``progress`` is updated as it goes."""
    every, log_every = cfg.train.checkpoint_every, cfg.track.log_every
    window: list = []  # per-step figures since the last step metrics
    for epoch in range(progress.epoch, cfg.train.epochs):
        first_step = progress.step if epoch == progress.epoch else 0
        progress.epoch, progress.step = epoch, first_step

        def on_step(step: int, figures, epoch: int = epoch) -> None:
            if every and (step + 1) % every == 0:
                progress.step = step + 1
                checkpoints.save_last(stepper, progress, epoch_done=False)
            if log_every and figures:
                window.append(figures)
                if len(window) == log_every:
                    step_no = epoch * (stepper.steps_per_epoch or 0) + step
                    tracker.log_metrics(step_metrics(window), step=step_no)
                    window.clear()

        lr = cfg.effective_lr(comm.world_size, cfg.train.method) * _lr_factor(cfg, progress)
        record = {"epoch": epoch, **stepper.run_epoch(epoch, first_step, on_step), "lr": lr}
        validate = (epoch + 1) % cfg.train.eval_every == 0 or epoch + 1 == cfg.train.epochs
        tracked: dict = {}  # this epoch's validation figures of every group, for MLflow
        if validate:
            tracked = _validate(stepper, cfg, data, comm, record, progress, checkpoints)
        progress.history.append(record)
        _log_epoch(record, validate)
        if comm.is_main:
            write_json(checkpoints.out / "history.json", progress.history)
            tracker.log_metrics({**epoch_metrics(record), **tracked}, step=epoch)
        stalled = validate and progress.since_best >= cfg.train.patience
        if stalled and progress.decays < cfg.train.lr_decays:
            _lower_lr(stepper, cfg, progress, checkpoints)
            stalled = False
        progress.step = 0
        checkpoints.save_last(stepper, progress, epoch_done=True)
        if stalled:
            log.info(
                "early stop: no better validation NDCG@10 for %d evaluations", progress.since_best
            )
            break


def _lr_factor(cfg: Config, progress: Progress) -> float:
    """The factor on the learning rate after the decays so far (``train.lr_decays``)."""
    return cfg.train.lr_decay**progress.decays


def _lower_lr(
    stepper: Stepper, cfg: Config, progress: Progress, checkpoints: RunCheckpoints
) -> None:
    """Validation ran out of patience with a decay left: the best weights come back and the
    optimizer starts afresh at the next lower rate; patience counts again."""
    progress.decays += 1
    progress.since_best = 0
    checkpoints.restore_best(stepper.modules())
    stepper.restart_optimizer(_lr_factor(cfg, progress))
    log.info(
        "no better validation NDCG@10 for %d evaluations: the best weights so far go on at "
        "learning rate x %g (decay %d of %d)",
        cfg.train.patience,
        _lr_factor(cfg, progress),
        progress.decays,
        cfg.train.lr_decays,
    )


def _validate(
    stepper: Stepper,
    cfg: Config,
    data: PreparedData,
    comm,
    record: dict,
    progress: Progress,
    checkpoints: RunCheckpoints,
) -> dict:
    """Validation figures into ``record``; a better NDCG@10 saves the best checkpoint.
    Returns every group's figures, flattened for the tracker."""
    t0 = time.perf_counter()
    # model selection: unadapted (eval.adapt_steps applies to the final evaluation only)
    kwargs = {**eval_kwargs(cfg), "adapt_steps": 0}
    val = evaluate(stepper.model, data, splits=("validation",), comm=comm, **kwargs)
    ndcg = val["validation"]["existing"]["all"]["NDCG@10"]
    record.update(valid_ndcg10=ndcg, eval_seconds=time.perf_counter() - t0)
    record["valid_hr10"] = val["validation"]["existing"]["all"]["HR@10"]
    if ndcg > progress.best:
        progress.best, progress.since_best = ndcg, 0
        checkpoints.save_best(stepper.modules(), record["epoch"], progress.history)
    else:
        progress.since_best += 1
    return metrics_to_flat(val["validation"], "valid")


def _log_epoch(record: dict, validated: bool) -> None:
    log.info(
        "epoch %d  loss %.4f  %s windows/s%s%s",
        record["epoch"],
        record["loss"],
        f"{record['windows_per_s']:,.0f}",
        f"  valid NDCG@10 {record['valid_ndcg10']:.4f}" if validated else "",
        f"  disc acc {record['disc_acc']:.3f} auc {record['disc_auc']:.3f}"
        if "disc_acc" in record
        else "",
    )
