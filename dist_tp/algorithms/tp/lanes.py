"""The inner loop of TP for M lanes at once, and the pseudo-gradient Θ − θ_k it yields.

Every lane starts from the same Θ (the model and the discriminator), takes k plain SGD steps
(lr α) on its own users' mini-batches, and ends at its own θ_k. Lanes are vectorised with
``torch.func``: per-lane parameters, ``functional_call`` + ``grad`` + ``vmap``, so one inner
step of M lanes is one batched forward/backward.

Item tables are not copied M times. A plain SGD step changes only the rows that the lane's
mini-batches touch (input items, positives, sampled negatives), so each lane carries just
those rows: a small per-lane table ``[M, T, D]`` gathered from Θ, indexed by local ids. At
the end the row deltas are scattered back into a dense pseudo-gradient. Memory therefore
grows with M × touched rows, not M × items. With the full-softmax ``ce`` loss every row is
touched and the lanes are dense.

The lanes run the model's own code on their parameters (``functional_call``): its encoder,
its loss (``Recommender.loss`` through ``forward(task="loss")``) and its list of item-row
parameters, so a change to the model reaches TP as it reaches joint training.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from dist_tp.algorithms.tp.discriminator import disc_loss, grad_reverse
from dist_tp.algorithms.tp.sampler import LaneBatch
from dist_tp.core.device import module_device, to_device
from dist_tp.models.layers import unrolled_rnns
from dist_tp.parallel.rows import row_gradient


@dataclass(frozen=True)
class BucketCost:
    """Time of one vmapped inner step of n lanes on ``[R, C]`` rows, in units of one lane's
    row cell: ``call + per_column·C + n·R·C·(1 + per_cell_column·C)`` (plus a per-lane
    part that no grouping changes). Fitted by least squares on 80 (n, R, C) shapes, one
    thread, d = 64: SASRec's fixed call cost is that of ~800 cells and attention adds ~1%
    per column; GRU4Rec's recurrence costs ~80 cells per time step per call."""

    call: float
    per_column: float = 0.0
    per_cell_column: float = 0.0

    def __call__(self, n: int, rows: int, cols: int) -> float:
        return (
            self.call
            + self.per_column * cols
            + n * rows * cols * (1.0 + self.per_cell_column * cols)
        )


BUCKET_COSTS = {
    "SASRec": BucketCost(call=800.0, per_cell_column=0.01),
    "GRU4Rec": BucketCost(call=800.0, per_column=80.0),
}
DEFAULT_BUCKET_COST = BucketCost(call=800.0)


def plan_buckets(
    rows: np.ndarray, cols: np.ndarray, cost: BucketCost
) -> list[tuple[np.ndarray, int, int]]:
    """Group lanes of shapes ``(rows[m], cols[m])`` into buckets ``(lanes, R, C)``, R and C
    the largest in the bucket, with the least total ``cost``. Deterministic (a function of
    the shapes only), so seeded runs stay reproducible.

    Lanes are put in a few orders (rows then columns, columns then rows, padded size); for
    each, the best split into consecutive runs is found by dynamic programming, and the
    cheapest plan wins. Buckets come out in ascending lane order within each bucket.
    """
    lanes = len(rows)
    index = np.arange(lanes)
    orders = [
        np.lexsort((index, cols, rows)),
        np.lexsort((index, rows, cols)),
        np.lexsort((index, rows * cols)),
    ]
    split = split_python if lanes <= VECTOR_DP_FROM else split_numpy
    best, best_plan = float("inf"), None
    for order in orders:
        value, cut = split(rows[order], cols[order], cost)
        if value < best:
            best, plan, j = value, [], lanes
            while j > 0:
                i = cut[j]
                members = np.sort(order[i:j])
                plan.append((members, int(rows[members].max()), int(cols[members].max())))
                j = i
            best_plan = plan[::-1]
    return best_plan


def bucketing(choice: str, device: torch.device) -> bool:
    """Whether lanes of different shapes run in cost-planned buckets (``tp.buckets``): ``cost``
    yes, ``one`` no (one padded call per inner step), ``auto`` on a CPU only."""
    return choice == "cost" or (choice == "auto" and device.type != "cuda")


VECTOR_DP_FROM = 32
"""Lane counts above this run the split's inner loop in numpy (the same plans, tested). One
split (plan_buckets runs three per inner step), one thread, ``benchmarks/bucket_planner.py``:
Python 0.05 / 0.17 / 0.66 / 14 / 206 ms at M = 16 / 32 / 64 / 256 / 1024 lanes, numpy
0.11 / 0.21 / 0.42 / 2.1 / 11 ms."""


def split_python(rows: np.ndarray, cols: np.ndarray, cost: BucketCost) -> tuple[float, list]:
    """Least total cost of cutting lanes (in this order) into consecutive buckets:
    (cost, cut), ``cut[j]`` the start of the last bucket of the first j lanes."""
    r, c = rows.tolist(), cols.tolist()
    lanes = len(r)
    total = [0.0] + [float("inf")] * lanes  # total[j]: best cost of the first j lanes
    cut = [0] * (lanes + 1)
    for j in range(1, lanes + 1):
        big_r = big_c = 0
        for i in range(j - 1, -1, -1):  # bucket = lanes i..j-1
            big_r, big_c = max(big_r, r[i]), max(big_c, c[i])
            value = total[i] + cost(j - i, big_r, big_c)
            if value < total[j]:
                total[j], cut[j] = value, i
    return total[lanes], cut


def split_numpy(rows: np.ndarray, cols: np.ndarray, cost: BucketCost) -> tuple[float, list]:
    """``split_python`` with each j's candidates evaluated at once; ties go to the latest
    start, as there, and the arithmetic is the same, so the plans are identical."""
    lanes = len(rows)
    rows, cols = rows.astype(np.int64), cols.astype(np.int64)
    total = np.full(lanes + 1, np.inf)
    total[0] = 0.0
    cut = [0] * (lanes + 1)
    for j in range(1, lanes + 1):
        # candidates i = j-1, j-2, ..., 0: the bucket's largest rows and columns so far
        big_r = np.maximum.accumulate(rows[j - 1 :: -1])
        big_c = np.maximum.accumulate(cols[j - 1 :: -1])
        n = np.arange(1, j + 1)
        values = total[j - 1 :: -1] + (
            cost.call
            + cost.per_column * big_c
            + n * big_r * big_c * (1.0 + cost.per_cell_column * big_c)
        )
        k = int(np.argmin(values))  # first minimum in this order = the largest i, as above
        total[j], cut[j] = values[k], j - 1 - k
    return float(total[lanes]), cut


@dataclass
class InnerStats:
    """What the inner steps saw: prediction and discriminator losses, discriminator logits."""

    pred_loss: float
    disc_loss: float
    disc_logits: Tensor  # [M·k·B]
    labels: Tensor  # [M·k·B]
    touched_rows: int  # T, rows per lane table (M·T·D floats per row table)


class InnerLoop:
    """k SGD steps in M lanes from the current parameters; returns Θ − θ_k (or, with
    ``query``, θ_{k−1} − θ_k) averaged over lanes."""

    def __init__(
        self,
        model: nn.Module,
        disc: nn.Module | None,
        *,
        loss: str,
        inner_lr: float,
        lambda_adv: float,
        bucketing: bool = True,
        sampling: str = "uniform",
        row_tables: bool = False,
        normalize: bool = False,
        query: bool = False,
        unroll_rnns: bool | None = None,
    ) -> None:
        """``row_tables``: the item tables' pseudo-gradients come back sparse (the lanes'
        touched rows), for a row-wise outer step (``train.item_updates=sparse``).
        ``normalize``: the pseudo-gradients are (Θ − θ_k) / α (``tp.normalize``).
        ``query``: the pseudo-gradients are the last step's alone, θ_{k−1} − θ_k
        (``tp.outer_gradient=query``, first-order MAML).
        ``unroll_rnns``: recurrent encoders run as plain tensor operations, which vmap
        batches over lanes (:func:`~dist_tp.models.layers.unrolled_rnns`); False: their
        native kernels, one call per lane; None: unrolled on a GPU only (on two CPU threads
        the unrolled GRU4Rec-TP step took 2.1-2.5x the native one, 4 and 16 lanes: the
        per-lane native calls are cheap there, the unrolled step's many small ops are not)."""
        self.model, self.disc = model, disc
        self.loss, self.lr, self.lam = loss, inner_lr, lambda_adv
        self.scale = 1.0 / inner_lr if normalize else 1.0
        self.query = query
        self.sampling = sampling
        self.row_names = model.item_row_names()  # the parameters a lane keeps rows of
        self.sparse = loss != "ce"
        self.row_tables = set(model.item_table_names()) if row_tables and self.sparse else set()
        self.all_positions = bool(getattr(model, "supports_all_positions", False))
        # buckets only pay off where lanes differ in shape: all-positions encoders
        self.bucketing = bucketing and self.all_positions
        encoder = getattr(model, "encoder", model)
        self.bucket_cost = BUCKET_COSTS.get(type(encoder).__name__, DEFAULT_BUCKET_COST)
        self.has_rnn = any(isinstance(m, nn.RNNBase) for m in model.modules())
        self.unroll_rnns = unroll_rnns
        lane_grad = grad(self._lane_loss, argnums=(0, 1), has_aux=True)
        self._weighted: Callable = vmap(lane_grad, randomness="different")
        unweighted = (0,) * 9 + (None,)  # the weights argument is None: the plain mean
        self._unweighted: Callable = vmap(lane_grad, in_dims=unweighted, randomness="different")

    def _step(self, *args):
        """One vmapped inner step of a bucket's lanes: (grads, dgrads), aux."""
        return (self._unweighted if args[-1] is None else self._weighted)(*args)

    def _lane_loss(
        self, params, dparams, rows, slot_row, slot_pos, targets, negatives, labels, log_q, weights
    ):
        """One lane's objective on one mini-batch: prediction loss + BCE_d through the GRL.
        ``log_q``: the popularity of the lane's rows (logQ-corrected losses), else unused.
        ``weights`` (None: the plain mean): each window's weight in both losses' means."""
        if self.all_positions:
            out = functional_call(self.model, params, (rows,), {"all_positions": True})  # [R, L, D]
            emb = out[slot_row, slot_pos]  # [B, D]
        else:
            emb = functional_call(self.model, params, (rows,))[slot_row]  # [B, D]
        # the model's own loss, on this lane's parameters (its rows, with local item ids)
        kwargs = {"task": "loss", "kind": self.loss, "negatives": negatives}
        if weights is not None:
            kwargs["reduction"] = "none"
        if self.loss == "sampled_softmax":
            kwargs["sampling"] = self.sampling
            if self.sampling == "in_batch":
                kwargs["negatives"] = None  # the other positives of the lane's mini-batch
            if self.sampling != "uniform":
                kwargs["log_q"] = log_q
        pred = functional_call(self.model, params, (emb, targets), kwargs)
        if weights is not None:
            pred = (pred * weights).sum() / weights.sum()
        if self.disc is None:
            zero = pred.detach() * 0
            return pred, (pred.detach(), zero, zero.expand(labels.shape))
        logits = functional_call(self.disc, dparams, (grad_reverse(emb, self.lam),))  # [B]
        adv = disc_loss(logits, labels, weights)
        return pred + adv, (pred.detach(), adv.detach(), logits.detach())

    def _kernels(self) -> contextlib.AbstractContextManager:
        """Kernels that ``vmap`` can batch: recurrences unrolled into plain tensor operations
        (``unroll_rnns``); on a GPU also the math attention (the fused ones have no batching
        rule; the per-lane fallback is slow and gave NaNs) and, for RNNs left native, the
        native GRU (cuDNN's packs the weights by address, which vmapped weights do not have)."""
        stack = contextlib.ExitStack()
        unroll = self.unroll_rnns
        if unroll is None:
            unroll = module_device(self.model).type == "cuda"
        if self.has_rnn and unroll:
            stack.enter_context(unrolled_rnns(self.model))
        if module_device(self.model).type != "cuda":
            return stack
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        if self.has_rnn:
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        return stack

    def _tensor(self, array: np.ndarray) -> Tensor:
        """A sampled array on the model's device."""
        return to_device(array, module_device(self.model))

    def _row_tables(self, batch: LaneBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-lane touched rows ``[M, T]`` (sorted, row 0 first) and local ids of the batch."""
        inputs = self._tensor(batch.rows)  # [M, k, R, L]
        targets = self._tensor(batch.targets)  # [M, k, B]
        negatives = self._tensor(batch.negatives)  # [M, k, B, n]
        lanes = inputs.shape[0]
        ids = torch.cat(
            [inputs.reshape(lanes, -1), targets.reshape(lanes, -1), negatives.reshape(lanes, -1)],
            dim=1,
        )  # [M, X]
        touched = lane_unique(torch.cat([ids, ids.new_zeros(lanes, 1)], dim=1))

        def local(x: Tensor) -> Tensor:
            flat = x.reshape(lanes, -1)
            return torch.searchsorted(touched, flat).reshape(x.shape)

        return touched, local(inputs), local(targets), local(negatives)

    def _lane_log_q(self, touched: Tensor | None, lanes: int) -> Tensor:
        """Each lane's rows of the model's log-popularity (its local item ids index them);
        zeros where no logQ-corrected loss needs it."""
        full = getattr(self.model, "log_q", None)
        if full is None or self.sampling == "uniform":
            device = module_device(self.model)
            width = 1 if touched is None else touched.shape[1]
            return torch.zeros(lanes, width, device=device)
        if touched is None:
            return full.unsqueeze(0).expand(lanes, *full.shape)
        return full[touched]  # [M, T]

    def _plans(self, batch: LaneBatch) -> list[list[tuple[np.ndarray, int, int]]]:
        """Per inner step, the buckets ``(lanes, rows R, real columns C)`` to run."""
        lanes, k, n_rows, width = batch.rows.shape
        if not self.bucketing:
            return [[(np.arange(lanes), n_rows, width)]] * k
        real = batch.rows != 0  # [M, k, R, L]
        # rows are packed at the front and each has a real item; padding is on the left
        used_rows = np.maximum(real.any(-1).sum(-1), 1)  # [M, k]
        used_cols = np.maximum(real.sum(-1).max(-1), 1)  # [M, k]
        return [plan_buckets(used_rows[:, s], used_cols[:, s], self.bucket_cost) for s in range(k)]

    def _merge(self, name: str, shape: torch.Size, calls: list, which: int) -> Tensor:
        """One parameter of all lanes after the step: each bucket's θ − α g at its lanes."""
        out = None
        for idx, sub, dsub, ((g, dg), _) in calls:
            old, grad_ = (sub[name], g[name]) if which == 0 else (dsub[name], dg[name])
            new = old - self.lr * grad_
            if out is None:
                out = new.new_empty(shape)
            out.index_copy_(0, idx, new)
        return out

    def pseudo_gradients(self, batch: LaneBatch) -> tuple[dict, dict, InnerStats]:
        """(model pseudo-gradients, discriminator pseudo-gradients, stats), lane-averaged."""
        params = {n: p.detach() for n, p in self.model.named_parameters()}
        dparams = (
            {} if self.disc is None else {n: p.detach() for n, p in self.disc.named_parameters()}
        )
        lanes, k = batch.targets.shape[:2]
        if batch.negatives is None:
            batch.negatives = batch.targets[..., None] * 0 + 1  # unused by ce; keeps shapes
        if self.sparse:
            touched, inputs, targets, negatives = self._row_tables(batch)
        else:
            touched = None
            inputs = self._tensor(batch.rows)
            targets = self._tensor(batch.targets)
            negatives = self._tensor(batch.negatives)
        labels = self._tensor(batch.labels)  # [M, k, B]
        log_q = self._lane_log_q(touched, lanes)  # [M, T] or [M, N+1]
        slot_row = self._tensor(batch.slot_row)  # [M, k, B]
        slot_pos = self._tensor(batch.slot_pos)  # [M, k, B]
        weights = None if batch.weights is None else self._tensor(batch.weights)  # [M, k, B]

        def per_lane(name: str, p: Tensor) -> Tensor:
            if touched is not None and name in self.row_names:
                return p[touched]  # [M, T, ...] the lane's rows only
            return p.unsqueeze(0).expand(lanes, *p.shape)  # [M, ...] no copy until updated

        start = {n: per_lane(n, p) for n, p in params.items()}
        dstart = {n: p.unsqueeze(0).expand(lanes, *p.shape) for n, p in dparams.items()}
        lane, dlane = dict(start), dict(dstart)
        plans = self._plans(batch)
        width = inputs.shape[-1]
        preds, advs, logits = [], [], []
        with self._kernels():  # once per outer step: vmap-batchable kernels on a GPU
            for s in range(k):
                if self.query and s == k - 1:  # the outer step starts from θ_{k−1}
                    start, dstart = lane, dlane
                calls = []
                for members, n_rows, n_cols in plans[s]:
                    idx = None if len(members) == lanes else self._tensor(members)
                    drop = width - n_cols  # all-padding columns on the left
                    sub = {n: _take(v, idx) for n, v in lane.items()}
                    dsub = {n: _take(v, idx) for n, v in dlane.items()}
                    out = self._step(
                        sub,
                        dsub,
                        _take(inputs[:, s], idx)[:, :n_rows, drop:],
                        _take(slot_row[:, s], idx),
                        _take(slot_pos[:, s], idx) - drop,
                        _take(targets[:, s], idx),
                        _take(negatives[:, s], idx),
                        _take(labels[:, s], idx),
                        _take(log_q, idx),
                        None if weights is None else _take(weights[:, s], idx),
                    )
                    calls.append((idx, sub, dsub, out))
                if len(calls) == 1:  # every lane in one call, in order
                    _, _, _, ((g, dg), (pred, adv, logit)) = calls[0]
                    lane = {n: lane[n] - self.lr * g[n] for n in lane}
                    dlane = {n: dlane[n] - self.lr * dg[n] for n in dlane}
                else:  # each bucket's lanes updated, written back to their places
                    lane = {n: self._merge(n, lane[n].shape, calls, 0) for n in lane}
                    dlane = {n: self._merge(n, dlane[n].shape, calls, 1) for n in dlane}
                    parts = [[(c[0], c[3][1][i]) for c in calls] for i in range(3)]
                    pred, adv, logit = (_scatter(p) for p in parts)
                preds.append(pred)
                advs.append(adv)
                logits.append(logit)
        grads = {}
        for n, p in params.items():
            delta = start[n] - lane[n]  # [M, ...] Θ − θ_k (query: θ_{k−1} − θ_k) per lane
            if self.scale != 1.0:
                delta = delta * self.scale
            if touched is not None and n in self.row_tables:
                rows = row_gradient(touched.reshape(-1), delta.flatten(0, 1), p.shape)
                grads[n] = rows / lanes  # sparse: the touched rows alone
            elif touched is not None and n in self.row_names:
                dense = torch.zeros_like(p).index_add_(0, touched.reshape(-1), delta.flatten(0, 1))
                grads[n] = dense / lanes
            else:
                grads[n] = delta.mean(0)
        dgrads = {n: (dstart[n] - dlane[n]).mean(0) * self.scale for n in dparams}
        stats = InnerStats(
            pred_loss=float(torch.stack(preds).mean()),
            disc_loss=float(torch.stack(advs).mean()),
            disc_logits=torch.stack(logits, 1).reshape(-1).cpu(),
            labels=labels.reshape(-1).cpu(),
            touched_rows=0 if touched is None else touched.shape[1],
        )
        return grads, dgrads, stats


def lane_unique(ids: Tensor) -> Tensor:
    """Each lane's distinct ids, sorted, ``[M, T]`` (T the most any lane has), a lane with
    fewer padded by repeating its largest (stays sorted; the copies are never referenced).
    One sort over all lanes, not a ``unique`` per lane (each of which waits for a GPU)."""
    ordered = ids.sort(dim=1).values  # [M, X]
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # the first of each run of equal ids
    slot = first.cumsum(1) - 1  # [M, X] where each distinct id goes in its lane's row
    width = int(slot[:, -1].max()) + 1
    out = ordered[:, -1:].expand(len(ids), width).clone()
    return out.scatter_(1, slot, ordered)  # a run's copies all write the same id


def _take(x: Tensor, idx: Tensor | None) -> Tensor:
    """Lanes ``idx`` of a per-lane tensor (all of them for None). A tensor expanded over
    lanes (Θ before its first update) stays an expansion, without a copy."""
    if idx is None:
        return x
    if x.shape[0] > 1 and x.stride(0) == 0:
        return x[:1].expand(len(idx), *x.shape[1:])
    return x.index_select(0, idx)


def _scatter(parts: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Per-bucket values ``[n_b, ...]`` written back to their lanes: ``[M, ...]``."""
    lanes = sum(len(idx) for idx, _ in parts)
    first = parts[0][1]
    out = first.new_empty((lanes, *first.shape[1:]))
    for idx, value in parts:
        out.index_copy_(0, idx, value)
    return out
