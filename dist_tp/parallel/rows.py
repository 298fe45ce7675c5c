"""Row-wise updates of the item tables (``train.item_updates=sparse``).

A step of a sampled loss reads a few thousand rows of a table of millions; a dense Adam step
still writes every row and both moments (three passes over 7 GB at 9.4M items × 64 dims).
Here the gradient of an item table is sparse (the rows a step touched and their values) and
:class:`RowAdam` updates those rows alone: "lazy" Adam, as TorchRec's fused row-wise
optimizers and TensorFlow's LazyAdam do. An untouched row and its moments stay as they are,
where dense Adam would keep moving the row on its momentum; the bias correction counts the
table's steps, as ``torch.optim.SparseAdam`` does.

A row whose gradient is exactly zero is not touched: the padding row, and under torchrun the
rows of a rank that stepped with weight 0 (its data spent), so W ranks take the same steps
as one process on the union of their batches.
"""

from __future__ import annotations

import torch
from torch import Tensor


def touched_rows(grad: Tensor) -> tuple[Tensor, Tensor]:
    """(row ids ``[U]`` ascending, their gradient ``[U, ...]``) of a sparse or dense gradient,
    duplicates summed, all-zero rows left out."""
    if grad.is_sparse:
        grad = grad.coalesce()
        rows, values = grad.indices()[0], grad.values()
    else:
        rows = torch.arange(grad.shape[0], device=grad.device)
        values = grad
    if len(rows) == 0:
        return rows, values
    keep = values.reshape(len(rows), -1).ne(0).any(1)
    if bool(keep.all()):
        return rows, values
    return rows[keep], values[keep]


def row_gradient(rows: Tensor, values: Tensor, shape: torch.Size) -> Tensor:
    """A sparse gradient of shape ``shape`` holding ``values`` at ``rows`` (summed where a row
    repeats)."""
    return torch.sparse_coo_tensor(
        rows.unsqueeze(0), values, shape, check_invariants=False
    ).coalesce()


class RowAdam(torch.optim.Optimizer):
    """Adam over the rows a step's gradients touch (sparse gradients; a dense one touches its
    non-zero rows). ``weight_decay`` adds L2 to the touched rows' gradients, as Adam's does."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                rows, grad = touched_rows(p.grad)
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                if len(rows) == 0:
                    continue
                step = float(state["step"])
                if group["weight_decay"]:
                    grad = grad + group["weight_decay"] * p.index_select(0, rows)
                m = state["exp_avg"].index_select(0, rows).lerp_(grad, 1 - beta1)
                v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2)
                v.addcmul_(grad, grad, value=1 - beta2)
                state["exp_avg"].index_copy_(0, rows, m)
                state["exp_avg_sq"].index_copy_(0, rows, v)
                denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
                p.index_add_(0, rows, m.div_(denom), alpha=-group["lr"] / (1 - beta1**step))
        return None


def clip_grad_norm(params: list[Tensor], max_norm: float) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a mix of dense and sparse gradients: the norm
    over all of them (a sparse one coalesced first), each scaled by max_norm / (norm + 1e-6)
    when that is below 1. Returns the norm."""
    squares = []
    for p in params:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            squares.append(p.grad.values().double().pow(2).sum())
        else:
            squares.append(p.grad.double().pow(2).sum())
    if not squares:
        return torch.zeros(())
    total = torch.stack(squares).sum().sqrt()
    coef = max_norm / (float(total) + 1e-6)
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return total
