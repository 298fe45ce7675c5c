"""Joint training (the paper's backbones without TP): one epoch streams the existing users'
tasks from the prepared folder in pools of users; each pool's rows are shuffled and packed
into mini-batches of about ``batch_size`` windows, so a mini-batch mixes users; Adam.

Under torchrun the same epoch runs data-parallel on each rank's share of the users; the
optimizer host it is given (:mod:`dist_tp.parallel.host`: DDP, or a DeepSpeed engine) averages
the gradients, and this module never learns which.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dist_tp.algorithms.base import OnStep, StreamPosition, comm_and_host, register, step_lr
from dist_tp.config import Config
from dist_tp.core.device import module_device, to_device
from dist_tp.core.seeding import seed_step
from dist_tp.data.examples import Rows, training_rows
from dist_tp.data.prefetch import prefetched
from dist_tp.data.stream import PreparedData, UserStream, to_sequences
from dist_tp.models.saved import sparse_item_updates
from dist_tp.parallel.host import Host, OptimizerSpec

POOL_USERS = 512  # users whose rows are shuffled together before batching
PROGRESS_EVERY = 20  # steps between progress-bar loss updates (each one waits for the device)
NO_SUMS = {"total": 0.0, "count": 0, "seconds": 0.0}  # an epoch's loss sums before its first step


def batches(rows: Rows, batch_size: int, rng: np.random.Generator) -> Iterator[Rows]:
    """Shuffle rows and pack them into mini-batches of about ``batch_size`` windows."""
    order = rng.permutation(len(rows))
    windows = rows.windows[order]
    batch_id = (np.cumsum(windows) - 1) // batch_size
    bounds = np.flatnonzero(np.diff(batch_id)) + 1
    for chunk in np.split(order, bounds):
        yield rows.take(chunk)


@dataclass
class HostBatch:
    """A mini-batch ready for the device: its rows as CPU tensors (in pinned memory when
    the model is on a GPU, for an asynchronous copy) and its number of windows."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor | None
    windows: int

    @classmethod
    def of(cls, rows: Rows, pin: bool = False) -> HostBatch:
        def tensor(array: np.ndarray) -> torch.Tensor:
            t = torch.from_numpy(array)
            return t.pin_memory() if pin else t

        weights = None if rows.weights is None else tensor(rows.weights)
        return cls(tensor(rows.inputs), tensor(rows.targets), weights, int(rows.windows.sum()))


def rows_loss(
    model,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    kind: str,
    num_negatives: int,
    generator: torch.Generator | None,
    weights: torch.Tensor | None = None,
    sampling: str = "uniform",
    shared: bool = False,
) -> torch.Tensor:
    """Mean next-item loss over the windows of rows ``inputs``/``targets`` [R, L]; with
    ``weights`` [R, L], the mean of each window's loss times its weight; ``shared``: one set
    of negatives for all the windows (``train.shared_negatives``)."""
    if model.supports_all_positions:
        mask = targets > 0  # [R, L]
        emb = model.encode_all(inputs)[mask]  # [M, D]
        pos = targets[mask]  # [M]
        w = None if weights is None else weights[mask]  # [M]
    else:
        emb = model.encode(inputs)  # [R, D]
        pos = targets[:, -1]  # [R]
        w = None if weights is None else weights[:, -1]  # [R]
    kw = dict(
        kind=kind,
        num_negatives=num_negatives,
        generator=generator,
        sampling=sampling,
        shared=shared,
    )
    if w is None:
        return model.loss(emb, pos, **kw)
    return (model.loss(emb, pos, reduction="none", **kw) * w).mean()


def batch_loss(model, rows: Rows, cfg: Config, generator: torch.Generator) -> torch.Tensor:
    device = module_device(model)
    return rows_loss(
        model,
        to_device(rows.inputs, device),
        to_device(rows.targets, device),
        kind=cfg.train.loss,
        num_negatives=cfg.train.num_negatives,
        generator=generator,
        weights=None if rows.weights is None else to_device(rows.weights, device),
        sampling=cfg.train.negatives,
        shared=cfg.train.shared_negatives,
    )


class JointLoss(torch.nn.Module):
    """The joint loss as a module's ``forward``: what the optimizer host wraps (DDP and
    DeepSpeed both hook ``forward``). The model is its only submodule, so parameters are
    shared, not copied."""

    def __init__(self, model, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.kind, self.num_negatives = cfg.train.loss, cfg.train.num_negatives
        self.sampling, self.shared = cfg.train.negatives, cfg.train.shared_negatives
        self._loss = self._rows_loss
        if cfg.train.compile != "none":  # train.compile: the same arithmetic, compiled
            self._loss = torch.compile(self._rows_loss, dynamic=True, mode=cfg.train.compile)

    def forward(self, inputs, targets, generator=None, weights=None) -> torch.Tensor:
        return self._loss(inputs, targets, generator, weights)

    def _rows_loss(self, inputs, targets, generator, weights) -> torch.Tensor:
        return rows_loss(
            self.model,
            inputs,
            targets,
            kind=self.kind,
            num_negatives=self.num_negatives,
            generator=generator,
            weights=weights,
            sampling=self.sampling,
            shared=self.shared,
        )


def _idle_rows(max_len: int, weighted: bool) -> Rows:
    """One valid row for a rank that has run out of mini-batches (its loss weight is 0)."""
    inputs = np.zeros((1, max_len), dtype=np.int64)
    inputs[0, -1] = 1
    weights = inputs.astype(np.float32) if weighted else None  # the same graph as the others
    return Rows(inputs, inputs.copy(), weights)


@register("joint")
class JointStepper:
    """The baseline: mini-batches of about ``batch_size`` windows mixing users, Adam.

    Under torchrun each rank streams its own row groups of the existing users
    (``UserStream`` deals them out per epoch), and the optimizer host starts every rank from
    rank 0's parameters and averages gradients. Each step all-reduces the ranks' window
    counts n_r and weights rank r's mean loss by W·n_r / Σn, so one step equals one
    single-process step on the union of the ranks' mini-batches. A rank that has run out of
    mini-batches steps on with weight 0 until every rank is done: all ranks take the same
    number of steps (DDP needs that) and no window is dropped.

    ``host`` defaults to the one ``train.engine`` names over ``comm``; ``comm`` to the host's
    (it only decides this rank's share of the data when both are given); ``data`` to the
    folder ``data.path``.
    """

    def __init__(
        self,
        model,
        cfg: Config,
        comm=None,
        *,
        host: Host | None = None,
        data: PreparedData | str | None = None,
    ) -> None:
        self.model, self.cfg = model, cfg
        self.comm, host = comm_and_host(cfg, comm, host)
        train = cfg.train
        # an epoch ends when every rank's users are used up, or after train.epoch_steps
        self.steps_per_epoch = train.epoch_steps or None
        sparse = sparse_item_updates(cfg, model.num_items)
        model.set_sparse_items(sparse)  # before the host wraps it (DDP reads the tables' flag)
        self.lr = step_lr(cfg, self.comm.world_size, "joint")
        self.opt = host.gradient_optimizer(
            JointLoss(model, cfg),
            OptimizerSpec(
                lr=self.lr,
                weight_decay=train.weight_decay,
                grad_clip=train.grad_clip,
                sparse_rows=tuple(f"model.{n}" for n in model.item_table_names()) if sparse else (),
            ),
        )
        self.device = module_device(model)  # where the host put it (DeepSpeed may move it)
        self.gen = torch.Generator(device=self.device)  # negative sampling, seeded per step
        prepared = PreparedData.of(data if data is not None else cfg.data.path)
        if train.negatives != "uniform":
            model.set_item_popularity(prepared.training_counts())
        self._partial: dict | None = None  # the running epoch's loss sums, for a checkpoint
        self._carried: dict | None = None  # the same, restored from a mid-epoch checkpoint
        self._carried_position: StreamPosition | None = None  # this rank's stream then
        self.stream = UserStream(
            prepared,
            rank=self.comm.rank,
            world_size=self.comm.world_size,
            seed=cfg.train.seed,
            batch_rows=POOL_USERS,
            columns=["user", "role", "is_head", "items"],
            roles=["existing"],
        )

    def modules(self) -> dict:
        return {"model": self.model}

    def epoch_batches(self, epoch: int) -> Iterator[Rows]:
        """This rank's mini-batches of epoch ``epoch``, in order."""
        for mb, _ in self.positioned_batches(epoch):
            yield mb

    def positioned_batches(
        self, epoch: int, position: StreamPosition | None = None
    ) -> Iterator[tuple[Rows, StreamPosition]]:
        """This rank's mini-batches of epoch ``epoch``, in order, each with the position just
        past it (:class:`StreamPosition`). Given such a ``position``, the epoch goes on from
        there and reads only the row groups from that pool on (a mid-epoch resume)."""
        cfg = self.cfg
        self.stream.set_epoch(epoch)
        first, skip = 0, 0
        if position is not None:
            first, skip = position.pool, position.done
            self.stream.load_state_dict(
                {
                    "epoch": epoch,
                    "unit": position.unit,
                    "row": position.row,
                    "seed": self.stream.seed,
                }
            )
        for pool_index, batch in enumerate(self.stream, start=first):
            at = self.stream.state_dict()
            unit, row = at["unit"], at["row"] - batch.num_rows  # where this pool starts
            rows = training_rows(
                to_sequences(batch),
                max_len=cfg.model.max_len,
                all_positions=self.model.supports_all_positions,
                balance=cfg.train.balance,
                power=cfg.train.balance_power,
                stride=cfg.train.row_stride,
            )
            rng = np.random.default_rng([cfg.train.seed, epoch, pool_index])
            for done, mb in enumerate(batches(rows, cfg.train.batch_size, rng), start=1):
                if pool_index == first and done <= skip:
                    continue  # done before the checkpoint
                yield mb, StreamPosition(unit, row, pool_index, done)

    def host_batches(
        self, positioned: Iterator[tuple[Rows, StreamPosition]]
    ) -> Iterator[tuple[HostBatch, StreamPosition]]:
        """``positioned_batches`` as :class:`HostBatch` es, made ``train.prefetch`` mini-batches
        ahead on a background thread (the same ones, in the same order)."""
        pin = self.device.type == "cuda"
        return prefetched(
            positioned, self.cfg.train.prefetch, lambda item: (HostBatch.of(item[0], pin), item[1])
        )

    def _autocast(self) -> torch.autocast:
        """bfloat16 autocast of the forward and loss when ``train.precision`` is bf16 (the
        backward follows the forward's dtypes; parameters and Adam stay float32)."""
        return torch.autocast(
            self.device.type, dtype=torch.bfloat16, enabled=self.cfg.train.precision == "bf16"
        )

    def run_epoch(self, epoch: int, start_step: int = 0, on_step: OnStep | None = None) -> dict:
        """Steps ``start_step..`` of the epoch; ``on_step(step, {})`` after each one.

        A resumed epoch goes on from the stream position the checkpoint carried over
        (``load_state_dict``): it re-reads only the pool of users it was in and skips that
        pool's mini-batches already done (they are a function of seed, epoch and rank). It
        adds the carried loss sums to its own.
        """
        cfg, comm = self.cfg, self.comm
        world = comm.world_size
        self.model.train()
        carried = self._carried if start_step and self._carried else dict(NO_SUMS)
        self._carried = None
        # the loss sum stays on the device: reading it each step would stall a GPU
        total = torch.full((), carried["total"], dtype=torch.float64, device=self.device)
        count, step, started = carried["count"], start_step, time.perf_counter()
        show = cfg.train.progress and comm.is_main
        bar = tqdm(desc=f"epoch {epoch}", unit="win", disable=not show, leave=False)
        position = self._carried_position if start_step else None
        self._carried_position = None
        mbs = self.positioned_batches(epoch, position)
        if start_step and position is None:  # a last.pt from before positions were kept
            for _ in range(start_step):
                next(mbs, None)
        mbs = self.host_batches(mbs)
        while self.steps_per_epoch is None or step < self.steps_per_epoch:
            item = next(mbs, None)  # a spent rank keeps its last position: nothing follows it
            mb, position = item if item is not None else (None, position)
            n = 0 if mb is None else mb.windows
            weight = 1.0
            if world > 1:
                n_all = int(comm.all_reduce_sum(torch.tensor([n], dtype=torch.int64)))
                if n_all == 0:
                    break
                weight = world * n / n_all  # the gradient average becomes window-weighted
                mb = (
                    mb
                    if mb is not None
                    else HostBatch.of(_idle_rows(cfg.model.max_len, cfg.train.balance != "window"))
                )
            elif mb is None:
                break
            (negatives,) = seed_step(cfg.train.seed, epoch, step, comm.rank, extra=1)
            self.gen.manual_seed(negatives)
            inputs, targets = to_device(mb.inputs, self.device), to_device(mb.targets, self.device)
            weights = None if mb.weights is None else to_device(mb.weights, self.device)
            with self._autocast():
                loss = self.opt(inputs, targets, generator=self.gen, weights=weights)
            self.opt.update(loss * weight)  # the host averages the gradients over ranks
            if n:
                total, count = total + loss.detach().double() * n, count + n
                bar.update(n)
                if show and step % PROGRESS_EVERY == 0:
                    rate = (count - carried["count"]) / max(time.perf_counter() - started, 1e-9)
                    mean = float(total) / count
                    bar.set_postfix(loss=f"{mean:.4f}", win_s=f"{rate:,.0f}", refresh=False)
            self._partial = {
                "total": total,
                "count": count,
                "seconds": carried["seconds"] + time.perf_counter() - started,
                "position": position,
            }
            if on_step is not None:  # the loss stays on the device until it is logged
                on_step(step, {"loss": loss.detach()} if n else {})
            step += 1
        mbs.close()  # a capped epoch: the prefetching thread stops
        self._partial = None
        bar.close()
        total = float(total)  # waits for the device's last step
        seconds = carried["seconds"] + time.perf_counter() - started
        if world > 1:  # the epoch's figures over all ranks (carried sums sit on rank 0 only)
            total, count = comm.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64))
            total, count = float(total), int(count)
        return {
            "loss": total / max(count, 1),
            "windows": count,
            "windows_per_s": count / seconds,
            "seconds": seconds,
            "steps": step,
        }

    def final_metrics(self) -> dict:
        return {}

    def restart_optimizer(self, lr_scale: float) -> None:
        self.opt.restart(self.lr * lr_scale)

    def state_dict(self) -> dict:
        """The optimizer's (or engine's) state; mid-epoch (called from ``on_step``, on every
        rank at once) also the epoch's loss sums so far, summed over ranks, and each rank's
        stream position (``positioned_batches``), so a resume reads on from there."""
        state = self.opt.state_dict()
        if self._partial is not None:
            sums = torch.tensor(
                [float(self._partial["total"]), self._partial["count"]], dtype=torch.float64
            )
            if self.comm.world_size > 1:
                sums = self.comm.all_reduce_sum(sums)
            state["epoch_sums"] = {
                "total": float(sums[0]),
                "count": int(sums[1]),
                "seconds": self._partial["seconds"],
            }
            position = self._partial["position"]
            state["positions"] = self.comm.gather_object(
                None if position is None else position.to_list()
            )
        return state

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
        sums = state.get("epoch_sums")
        if sums is not None and not self.comm.is_main:  # rank 0 carries the ranks' sums
            sums = {**sums, "total": 0.0, "count": 0}
        self._carried = sums
        positions = state.get("positions")  # one per rank, in rank order
        mine = None if positions is None else positions[self.comm.rank]
        self._carried_position = None if mine is None else StreamPosition.from_list(mine)
