"""One TP epoch: sample lanes × k inner mini-batches, run the inner loops, apply the outer
update; as many windows per epoch as a joint epoch. Tracks the discriminator (loss,
accuracy, AUC) like the model. The outer step's optimizer comes from the optimizer host
(:mod:`dist_tp.parallel.host`), which averages the pseudo-gradients over ranks."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import torch
from tqdm import tqdm

from dist_tp.algorithms.base import OnStep, comm_and_host, register, step_lr
from dist_tp.algorithms.tp.disc_metrics import disc_figures, discriminator_metrics
from dist_tp.algorithms.tp.discriminator import Discriminator
from dist_tp.algorithms.tp.lanes import InnerLoop, bucketing
from dist_tp.algorithms.tp.pool import UserPools
from dist_tp.algorithms.tp.sampler import LaneBatch, TaskSampler, load_part
from dist_tp.config import Config
from dist_tp.core.device import module_device
from dist_tp.core.seeding import seed_step
from dist_tp.data.prefetch import prefetched
from dist_tp.data.stream import PreparedData
from dist_tp.models.saved import sparse_item_updates
from dist_tp.parallel.comm import check_replicas
from dist_tp.parallel.host import Host, OptimizerSpec

log = logging.getLogger(__name__)
EMPTY_EPOCH = {  # an epoch's figures before its first step
    "losses": [],
    "dlosses": [],
    "logits": torch.zeros(0),
    "labels": torch.zeros(0),
    "seconds": 0.0,
}


@register("tp")
class TPStepper:
    """Holds the discriminator, the task sampler, the inner loop and the outer optimizer.

    ``host`` defaults to the one ``train.engine`` names over ``comm``, ``comm`` to the host's,
    ``data`` to the folder ``data.path``; ``sampler`` (tests) replaces this rank's users.
    With ``tp.pool_users`` (and no ``sampler``) the rank's users come from ``pools``
    (:mod:`.pool`), one pool at a time, and ``sampler`` is None."""

    def __init__(
        self,
        model,
        cfg: Config,
        comm=None,
        *,
        host: Host | None = None,
        data: PreparedData | str | None = None,
        sampler: TaskSampler | None = None,
    ):
        self.model, self.cfg = model, cfg
        self.comm, host = comm_and_host(cfg, comm, host)
        self._data = data  # opened when first needed: a given sampler needs no folder
        tp = cfg.tp
        self.disc = None
        if tp.discriminator:
            # initialised from its own seed, so having a discriminator or not leaves the global
            # RNG stream (dropout in the inner steps) exactly the same
            with torch.random.fork_rng():
                torch.manual_seed(cfg.train.seed + 7919)
                self.disc = Discriminator(cfg.model.dim, tp.disc_hidden)
            self.disc.to(module_device(model))
        self.pools: UserPools | None = None
        if sampler is None and tp.pool_users:
            self.pools = self._open_pools()
            windows = self.pools.epoch_windows(0)
        else:
            sampler = self._rank_sampler(sampler)
            windows = sampler.total_windows
        self.sampler = sampler
        self.lane_users: list[np.ndarray] | None = None  # tests: pin lanes to user subsets
        self._partial: tuple | None = None  # the running epoch's figures, for a checkpoint
        self._carried: dict | None = None  # the same, restored from a mid-epoch checkpoint
        sparse = sparse_item_updates(cfg, model.num_items)
        self.inner = InnerLoop(
            model,
            self.disc,
            loss=cfg.train.loss,
            inner_lr=tp.inner_lr,
            lambda_adv=tp.lambda_adv,
            sampling=cfg.train.negatives,
            row_tables=sparse,
            normalize=tp.normalize,
            query=tp.outer_gradient == "query",
            bucketing=bucketing(tp.buckets, module_device(model)),
        )
        self.params = list(model.parameters()) + (
            [] if self.disc is None else list(self.disc.parameters())
        )
        # train.lr (tp.outer_lr, when given, equals it), after train.lr_scaling
        self.lr = step_lr(cfg, self.comm.world_size, "tp")
        # the host starts every rank from rank 0's parameters and averages the steps' input
        self.outer = host.pseudo_gradient_optimizer(
            self.modules(),
            OptimizerSpec(
                lr=self.lr,
                kind=tp.outer_optimizer,
                compress=tp.compress,
                sparse_rows=tuple(f"model.{n}" for n in self.inner.row_tables),
            ),
        )
        self._negative_cdf = None  # popularity negatives: cumulative q over items 1..N
        if cfg.train.negatives != "uniform":
            model.set_item_popularity(self.data.training_counts())
            self._negative_cdf = model.neg_cdf.cpu().numpy()
        # lanes × k × users × K, whatever train.method says (benchmarks time TP on a joint config)
        self.windows_per_step = cfg.step_windows("tp")
        # an epoch = as many windows as a joint epoch over all ranks' users
        total = self.comm.all_reduce_sum(torch.tensor(float(windows), dtype=torch.float64))
        self.steps_per_epoch = math.ceil(
            float(total) / (self.windows_per_step * self.comm.world_size)
        )
        self.steps_per_pass = self.steps_per_epoch  # what the pools' refills are spread over
        if cfg.train.epoch_steps:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.train.epoch_steps)

    def _rank_sampler(self, sampler: TaskSampler | None) -> TaskSampler:
        """This rank's whole share of the existing users (of ``sampler`` when given)."""
        rank, world = self.comm.rank, self.comm.world_size
        if sampler is None:  # this rank's users only
            sampler, loads = load_part(
                self.data, max_len=self.cfg.model.max_len, rank=rank, world_size=world
            )
        elif world > 1:
            parts = sampler.partition(world)
            loads = [int(sampler.n_windows[p].sum()) for p in parts]
            sampler = sampler.subset(parts[rank])
        if world > 1:
            log.info(
                "rank %d: %d users, %d windows; imbalance max/mean %.4f",
                rank,
                len(sampler),
                loads[rank],
                max(loads) / (sum(loads) / len(loads)),
            )
        return sampler

    def _open_pools(self) -> UserPools:
        """This rank's pools of ``tp.pool_users`` users, from its own row groups."""
        pools = UserPools(
            self.data,
            pool_users=self.cfg.tp.pool_users,
            max_len=self.cfg.model.max_len,
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            seed=self.cfg.train.seed,
        )
        log.info(
            "rank %d: pools of about %d users from %d row groups (%d windows in epoch 0)",
            self.comm.rank,
            self.cfg.tp.pool_users,
            len(pools.units(0)),
            pools.epoch_windows(0),
        )
        return pools

    def sampler_at(self, epoch: int, step: int) -> TaskSampler:
        """The users outer step ``step`` of ``epoch`` draws from: this rank's share, or the
        pool serving that step (read when the step is the pool's first)."""
        if self.pools is None:
            return self.sampler
        return self.pools.pool_at(epoch, step, self.steps_per_pass).sampler

    @property
    def data(self) -> PreparedData:
        """The prepared folder (``data.path`` unless one was given)."""
        if not isinstance(self._data, PreparedData):
            self._data = PreparedData.of(
                self._data if self._data is not None else self.cfg.data.path
            )
        return self._data

    def _num_negatives(self) -> int:
        """Sampled negatives per window: bce and sampled softmax; none for ce, in-batch."""
        train = self.cfg.train
        sampled = train.loss == "bce" or (
            train.loss == "sampled_softmax" and train.negatives != "in_batch"
        )
        return train.num_negatives if sampled else 0

    def modules(self) -> dict:
        return {"model": self.model, **({"disc": self.disc} if self.disc is not None else {})}

    def sample_step(self, sampler: TaskSampler, epoch: int, step: int) -> LaneBatch:
        """The lane batch of outer step ``step`` of ``epoch``, drawn from ``sampler``.

        Lane m of rank r draws from its own generator seeded by (seed, epoch, step, r·M + m),
        so W ranks × M lanes sample exactly what one process with W·M lanes would, and the
        batch depends on nothing else: it can be drawn ahead, on another thread."""
        tp, train = self.cfg.tp, self.cfg.train
        first_lane = self.comm.rank * tp.lanes
        rngs = [
            np.random.default_rng([train.seed, epoch, step, first_lane + m])
            for m in range(tp.lanes)
        ]
        return sampler.sample(
            rngs,
            k=tp.k,
            users_per_step=tp.users_per_step,
            inner_batch=tp.inner_batch,
            num_negatives=self._num_negatives(),
            num_items=self.model.num_items,
            all_positions=self.model.supports_all_positions,
            lane_users=self.lane_users,
            user_power=tp.power,
            negative_cdf=self._negative_cdf if train.negatives == "popularity" else None,
            shared_negatives=train.shared_negatives,
            same_user=tp.same_user,
            distinct=tp.distinct_windows,
            disjoint_steps=tp.outer_gradient == "query",
        )

    def outer_step(self, epoch: int, step: int, batch: LaneBatch | None = None):
        """One outer step on ``batch`` (None: :meth:`sample_step` of the step's users);
        returns the inner loop's stats."""
        tp, train = self.cfg.tp, self.cfg.train
        seed_step(train.seed, epoch, step, self.comm.rank)  # dropout: exact mid-epoch resume
        if batch is None:
            batch = self.sample_step(self.sampler_at(epoch, step), epoch, step)
        grads, dgrads, stats = self.inner.pseudo_gradients(batch)
        ordered = [grads[n] for n, _ in self.model.named_parameters()]
        if self.disc is not None:
            ordered += [dgrads[n] for n, _ in self.disc.named_parameters()]
        self.outer.step(ordered)
        every = tp.check_replicas_every
        if every and (step + 1) % every == 0:
            check_replicas(self.params, self.comm, step=step)
        return stats

    def lane_batches(self, epoch: int, start_step: int = 0) -> Iterator[LaneBatch | None]:
        """The lane batches of steps ``start_step..`` of the epoch, drawn ``train.prefetch``
        ahead on a thread (:func:`~dist_tp.data.prefetch.prefetched`), so a GPU does not wait
        on the sampling; with ``tp.pool_users``, None for each step (drawn in the step from the
        pool serving it, which is read on the training thread)."""
        steps = range(start_step, self.steps_per_epoch)
        if self.pools is not None:
            return iter([None] * len(steps))
        draw = functools.partial(self.sample_step, self.sampler, epoch)
        return prefetched(iter(steps), self.cfg.train.prefetch, draw)

    def run_epoch(self, epoch: int, start_step: int = 0, on_step: OnStep | None = None) -> dict:
        """Outer steps ``start_step..`` of the epoch; ``on_step(step, figures)`` after each
        one, with the inner loop's mean prediction (``loss``) and discriminator (``disc_loss``)
        losses. A resumed epoch (``load_state_dict`` of a mid-epoch state) adds the figures of
        the steps before the checkpoint, so its record is that of the whole epoch."""
        self.model.train()
        started = time.perf_counter()
        carried = self._carried if start_step and self._carried else EMPTY_EPOCH
        self._carried = None
        losses, dlosses = list(carried["losses"]), list(carried["dlosses"])
        logits, labels = [carried["logits"]], [carried["labels"]]
        show = self.cfg.train.progress and self.comm.is_main
        steps = range(start_step, self.steps_per_epoch)
        bar = tqdm(steps, desc=f"tp epoch {epoch}", disable=not show, leave=False)
        with contextlib.closing(self.lane_batches(epoch, start_step)) as batches:
            for step, batch in zip(bar, batches):
                stats = self.outer_step(epoch, step, batch)
                losses.append(stats.pred_loss)
                dlosses.append(stats.disc_loss)
                logits.append(stats.disc_logits)
                labels.append(stats.labels)
                seconds = carried["seconds"] + time.perf_counter() - started
                self._partial = (losses, dlosses, logits, labels, seconds)
                if on_step is not None:
                    on_step(step, {"loss": stats.pred_loss, "disc_loss": stats.disc_loss})
                done = (step + 1 - start_step) * self.windows_per_step * self.comm.world_size
                rate = done / (seconds - carried["seconds"])  # all ranks' windows, as joint's
                bar.set_postfix(loss=f"{np.mean(losses):.4f}", win_s=f"{rate:,.0f}", refresh=False)
        self._partial = None
        seconds = carried["seconds"] + time.perf_counter() - started
        windows = len(losses) * self.windows_per_step * self.comm.world_size  # all ranks
        record = {
            "loss": float(np.mean(losses)),
            "windows": windows,
            "windows_per_s": windows / seconds,
            "seconds": seconds,
        }
        if self.disc is not None:
            record["disc_loss"] = float(np.mean(dlosses))
            record.update(disc_figures(torch.cat(logits), torch.cat(labels)))
        return record

    def final_metrics(self) -> dict:
        """The discriminator on the existing users' test inputs (accuracy, AUC, majority)."""
        if self.disc is None:
            return {}
        figures = discriminator_metrics(
            self.model, self.disc, self.data, max_len=self.cfg.model.max_len, comm=self.comm
        )
        return {"discriminator": figures}

    def restart_optimizer(self, lr_scale: float) -> None:
        self.outer.restart(self.lr * lr_scale)

    def state_dict(self) -> dict:
        """The outer optimizer's state; mid-epoch also this rank's figures of the epoch so far
        (rank 0's are what ``history.json`` records); with pools, where each rank's pool in
        use began (gathered: a collective, called on every rank; complete on rank 0)."""
        state = {"outer": self.outer.state_dict()}
        if self.pools is not None:
            state["pools"] = self.comm.gather_object(self.pools.state_dict())
        if self._partial is not None:
            losses, dlosses, logits, labels, seconds = self._partial
            state["epoch_figures"] = {
                "losses": list(losses),
                "dlosses": list(dlosses),
                "logits": torch.cat(logits),
                "labels": torch.cat(labels),
                "seconds": seconds,
            }
        return state

    def load_state_dict(self, state: dict) -> None:
        self.outer.load_state_dict(state["outer"])
        self._carried = state.get("epoch_figures")  # None: an epoch's end, or an older last.pt
        if self.pools is not None:
            self.pools.load_state_dict(self._own_pool(state.get("pools")))

    def _own_pool(self, saved: list | None) -> dict | None:
        """This rank's pool of a checkpoint's ``pools`` (one per rank); None when there is no
        such list (the run's pool is then found again from its epoch's start, reading only)."""
        if saved is None or len(saved) != self.comm.world_size:
            return None
        return saved[self.comm.rank]
