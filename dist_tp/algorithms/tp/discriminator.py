"""The head/tail discriminator f_d and the gradient-reversal layer between φ and f_d."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """Identity forward; gradient multiplied by −λ on the way back.

    Written with ``detach`` instead of a custom autograd Function so that it also works
    under ``torch.func`` transforms (grad, vmap). The forward value is exactly ``x``:
    ``x - x.detach()`` is exactly zero.
    """
    return x.detach() + (-lam) * (x - x.detach())


class Discriminator(nn.Module):
    """MLP on the sequence embedding → logit of P(head user)."""

    def __init__(self, dim: int, hidden: list[int]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = dim
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, emb: Tensor) -> Tensor:
        return self.net(emb).squeeze(-1)  # [B] logits


def disc_loss(logits: Tensor, labels: Tensor, weights: Tensor | None = None) -> Tensor:
    """BCE_d = −[R log f_d + (1 − R) log(1 − f_d)], mean over the batch (weighted by
    ``weights`` when given)."""
    if weights is None:
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)
    each = nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (each * weights).sum() / weights.sum()


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney, ties counted half); NaN with one class."""
    labels = labels.bool()
    pos, neg = int(labels.sum()), int((~labels).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = torch.argsort(scores.double())
    ranks = torch.empty(len(scores), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    # average ranks over ties
    uniq, inverse = torch.unique(scores.double(), return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.bincount(inverse, minlength=len(uniq)).double()
    ranks = (sums / counts)[inverse]
    return float((ranks[labels].sum() - pos * (pos + 1) / 2) / (pos * neg))
