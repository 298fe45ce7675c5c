"""One TP epoch: sample lanes × k inner mini-batches, run the inner loops, apply the outer
update; as many windows per epoch as a joint epoch. Tracks the discriminator (loss,
accuracy, AUC) like the model."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
from tqdm import tqdm

from dist_tp.algorithms.tp.discriminator import Discriminator, auc
from dist_tp.algorithms.tp.lanes import InnerLoop
from dist_tp.algorithms.tp.outer import OuterUpdate
from dist_tp.algorithms.tp.sampler import TaskSampler, load_part
from dist_tp.config import Config, ConfigError
from dist_tp.core.device import module_device
from dist_tp.core.seeding import seed_step
from dist_tp.parallel.comm import LocalComm, broadcast_module, check_replicas

log = logging.getLogger(__name__)


def disc_figures(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Accuracy, AUC and the majority share (accuracy of always guessing the majority)."""
    if len(labels) == 0:
        return {"disc_acc": float("nan"), "disc_auc": float("nan"), "disc_majority": float("nan")}
    head = float(labels.mean())
    return {
        "disc_acc": float(((logits > 0).float() == labels).float().mean()),
        "disc_auc": auc(logits, labels),
        "disc_majority": max(head, 1 - head),
    }


class TPStepper:
    """Holds the discriminator, the task sampler, the inner loop and the outer optimizer."""

    def __init__(self, model, cfg: Config, *, comm=None, sampler: TaskSampler | None = None):
        self.model, self.cfg, self.comm = model, cfg, comm or LocalComm()
        tp = cfg.tp
        self.disc = None
        if tp.discriminator:
            # initialised from its own seed, so having a discriminator or not leaves the global
            # RNG stream (dropout in the inner steps) exactly the same
            with torch.random.fork_rng():
                torch.manual_seed(cfg.train.seed + 7919)
                self.disc = Discriminator(cfg.model.dim, tp.disc_hidden)
            self.disc.to(module_device(model))
        rank, world = self.comm.rank, self.comm.world_size
        if sampler is None:  # this rank's users only
            sampler, loads = load_part(
                cfg.data.path, max_len=cfg.model.max_len, rank=rank, world_size=world
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
            broadcast_module(model, self.comm)
            if self.disc is not None:
                broadcast_module(self.disc, self.comm)
        self.sampler = sampler
        self.lane_users: list[np.ndarray] | None = None  # tests: pin lanes to user subsets
        self.inner = InnerLoop(
            model,
            self.disc,
            loss=cfg.train.loss,
            inner_lr=tp.inner_lr,
            lambda_adv=tp.lambda_adv,
        )
        self.params = list(model.parameters()) + (
            [] if self.disc is None else list(self.disc.parameters())
        )
        if cfg.train.engine == "deepspeed":
            from dist_tp.parallel.deepspeed_engine import EngineOuter

            if tp.outer_optimizer != "adam" or tp.compress != "none":
                raise ConfigError(
                    "train.engine=deepspeed hosts an Adam outer step with DeepSpeed's own "
                    "reduction: it needs tp.outer_optimizer=adam and tp.compress=none "
                    "(DeepSpeed's communication_data_type sets the wire dtype)"
                )
            self.outer = EngineOuter(
                self.modules(), path=cfg.train.deepspeed, lr=tp.outer_lr, comm=self.comm
            )
        else:
            self.outer = OuterUpdate(
                self.params,
                optimizer=tp.outer_optimizer,
                lr=tp.outer_lr,
                comm=self.comm,
                compress=tp.compress,
            )
        self.windows_per_step = tp.lanes * tp.k * tp.users_per_step * tp.inner_batch
        # an epoch = as many windows as a joint epoch over all ranks' users
        total = self.comm.all_reduce_sum(torch.tensor(float(sampler.total_windows)))
        self.steps_per_epoch = math.ceil(
            float(total) / (self.windows_per_step * self.comm.world_size)
        )

    def modules(self) -> dict:
        return {"model": self.model, **({"disc": self.disc} if self.disc is not None else {})}

    def outer_step(self, epoch: int, step: int):
        """One outer step; returns the inner loop's stats.

        Lane m of rank r draws from its own generator seeded by (seed, epoch, step, r·M + m),
        so W ranks × M lanes sample exactly what one process with W·M lanes would.
        """
        tp, train = self.cfg.tp, self.cfg.train
        seed_step(train.seed, epoch, step, self.comm.rank)  # dropout: exact mid-epoch resume
        first_lane = self.comm.rank * tp.lanes
        rngs = [
            np.random.default_rng([train.seed, epoch, step, first_lane + m])
            for m in range(tp.lanes)
        ]
        batch = self.sampler.sample(
            rngs,
            k=tp.k,
            users_per_step=tp.users_per_step,
            inner_batch=tp.inner_batch,
            num_negatives=train.num_negatives if train.loss == "bce" else 0,
            num_items=self.model.num_items,
            all_positions=self.model.supports_all_positions,
            lane_users=self.lane_users,
            by_windows=tp.user_sampling == "windows",
        )
        grads, dgrads, stats = self.inner.pseudo_gradients(batch)
        ordered = [grads[n] for n, _ in self.model.named_parameters()]
        if self.disc is not None:
            ordered += [dgrads[n] for n, _ in self.disc.named_parameters()]
        self.outer.step(ordered)
        every = tp.check_replicas_every
        if every and (step + 1) % every == 0:
            check_replicas(self.params, self.comm, step=step)
        return stats

    def run_epoch(self, epoch: int, start_step: int = 0, on_step=None) -> dict:
        """Outer steps ``start_step..`` of the epoch; ``on_step(step, stats)`` after each one."""
        self.model.train()
        started = time.perf_counter()
        losses, dlosses, logits, labels = [], [], [], []
        show = self.cfg.train.progress and self.comm.is_main
        steps = range(start_step, self.steps_per_epoch)
        bar = tqdm(steps, desc=f"tp epoch {epoch}", disable=not show, leave=False)
        for step in bar:
            stats = self.outer_step(epoch, step)
            if on_step is not None:
                on_step(step, stats)
            losses.append(stats.pred_loss)
            dlosses.append(stats.disc_loss)
            logits.append(stats.disc_logits)
            labels.append(stats.labels)
            rate = len(losses) * self.windows_per_step / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{np.mean(losses):.4f}", win_s=f"{rate:,.0f}", refresh=False)
        seconds = time.perf_counter() - started
        windows = len(steps) * self.windows_per_step
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

    def state_dict(self) -> dict:
        return {"outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.outer.load_state_dict(state["outer"])
