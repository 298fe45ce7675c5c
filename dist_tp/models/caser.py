"""Caser sequence encoder: horizontal and vertical convolutions over the L x D window.

The window's embeddings form an ``L x D`` image (padding rows are zero, ``padding_idx=0``).
Horizontal filters of every height ``h = 1..L`` (``caser_nh`` each) slide over time, pass
through ReLU and are max-pooled over time; ``caser_nv`` vertical filters take weighted sums
of the L rows. Both are concatenated, dropped out and mapped to D by a ReLU layer.

The one deliberate change from the original Caser: there is no per-user embedding. φ is a
function of the window alone, so users unseen in training (who have no user vector) are
encoded the same way as known ones.

Speed: L separate convolutions (one per height) waste time on many tiny calls. Heights
are grouped into blocks of ``_GROUP`` consecutive heights; each block is one convolution
whose kernel is the tallest height of the block, shorter filters having their extra rows
held at zero by a fixed mask. The input is right-padded so the shortest height still gets
all of its positions, and positions past a filter's last valid one are zeroed before the
max-pool (all pooled values are >= 0 after ReLU, so a zero never changes the maximum).
This gives the same result as per-height convolutions at about twice their speed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_tp.config import ModelConfig
from dist_tp.models.layers import Dropout, share_table

_GROUP = 10
"""Heights per fused convolution; about 10 balances call count against wasted rows."""


class _HeightGroup(nn.Module):
    """The horizontal filters of heights ``lo..hi`` as one masked convolution."""

    def __init__(self, lo: int, hi: int, length: int, dim: int, nh: int) -> None:
        super().__init__()
        self.lo, self.hi = lo, hi
        heights = torch.arange(lo, hi + 1).repeat_interleave(nh)  # [C] height per filter
        channels = heights.shape[0]
        self.weight = nn.Parameter(torch.empty(channels, dim, hi))  # [C, D, hi]
        self.bias = nn.Parameter(torch.empty(channels))  # [C]
        rows = torch.arange(hi)  # [hi]
        row_mask = (rows.view(1, -1) < heights.view(-1, 1)).float()  # [C, hi]
        self.register_buffer("row_mask", row_mask.unsqueeze(1), persistent=False)
        steps = torch.arange(length - lo + 1)  # [P] output positions
        valid = (steps.view(1, -1) <= (length - heights).view(-1, 1)).float()  # [C, P]
        self.register_buffer("valid", valid, persistent=False)
        with torch.no_grad():
            # Conv-style uniform init with each filter's own fan-in h * D.
            bound = 1.0 / torch.sqrt(heights.float() * dim)  # [C]
            self.weight.uniform_(-1.0, 1.0).mul_(bound.view(-1, 1, 1))
            self.bias.uniform_(-1.0, 1.0).mul_(bound)
            self.weight.mul_(self.row_mask)

    def forward(self, x_t: Tensor) -> Tensor:
        """Max-pooled ReLU features: ``x_t [B, D, L]`` -> ``[B, C]``."""
        padded = F.pad(x_t, (0, self.hi - self.lo))  # [B, D, L + hi - lo]
        out = F.conv1d(padded, self.weight * self.row_mask, self.bias)  # [B, C, P]
        return (F.relu(out) * self.valid).amax(dim=2)  # [B, C]


class Caser(nn.Module):
    """Convolutional encoder of a whole window; it has no per-position (prefix) output."""

    supports_all_positions = False

    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding) -> None:
        super().__init__()
        share_table(self, item_emb)
        self.max_len = length = cfg.max_len
        dim = cfg.dim
        self.groups = nn.ModuleList(
            _HeightGroup(lo, min(lo + _GROUP - 1, length), length, dim, cfg.caser_nh)
            for lo in range(1, length + 1, _GROUP)
        )
        self.vertical = nn.Parameter(torch.empty(cfg.caser_nv, length))  # [nv, L]
        self.vertical_bias = nn.Parameter(torch.empty(cfg.caser_nv))  # [nv]
        bound = 1.0 / math.sqrt(length)
        nn.init.uniform_(self.vertical, -bound, bound)
        nn.init.uniform_(self.vertical_bias, -bound, bound)
        self.drop = Dropout(cfg.dropout)
        self.fc = nn.Linear(cfg.caser_nh * length + cfg.caser_nv * dim, dim)

    def forward(self, seq: Tensor) -> Tensor:
        """φ of each window: ``seq [B, L']`` (left-padded, ``L' <= max_len``) -> ``[B, D]``.

        Shorter windows are left-padded to ``max_len`` first: the filters are tied to L.
        """
        length = seq.shape[1]
        if length > self.max_len:
            raise ValueError(f"window length {length} exceeds max_len {self.max_len}")
        if length < self.max_len:
            seq = F.pad(seq, (self.max_len - length, 0))  # [B, L]
        x = self.item_emb(seq)  # [B, L, D]
        x_t = x.transpose(1, 2)  # [B, D, L]
        horizontal = torch.cat([g(x_t) for g in self.groups], dim=1)  # [B, nh * L]
        vertical = torch.einsum("vl,bld->bvd", self.vertical, x)  # [B, nv, D]
        vertical = vertical + self.vertical_bias.view(1, -1, 1)  # [B, nv, D]
        z = torch.cat([horizontal, vertical.flatten(1)], dim=1)  # [B, nh * L + nv * D]
        return F.relu(self.fc(self.drop(z)))  # [B, D]
