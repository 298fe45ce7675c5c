"""SASRec sequence encoder: causal self-attention over the window's item embeddings.

Input is ``item_emb * sqrt(D)`` with dropout, then ``num_layers`` pre-LayerNorm blocks
(causal multi-head attention, point-wise ReLU feed-forward, residuals, dropout) and a final
LayerNorm; φ is the output at the last position.

Positions are learned, but as a per-head, per-layer attention bias indexed by the offset
``t - s`` between the query ``t`` and the key ``s`` (relative positions) instead of an
absolute embedding added to the input. That choice is what makes ``forward_all`` exact:
the output at ``t`` depends only on the items up to ``t`` and their distances to ``t``, so
it equals φ of the window ending at ``t``, and extra left padding (masked as keys) leaves
φ unchanged. With absolute positions, a prefix read inside a longer window would see other
position indices than the same prefix read as a window of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_tp.config import ModelConfig
from dist_tp.models.layers import Dropout, share_table


class _Block(nn.Module):
    """Pre-LN transformer block with a learned relative-position attention bias."""

    def __init__(self, dim: int, heads: int, dropout: float, max_len: int) -> None:
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"model.dim ({dim}) must be divisible by num_heads ({heads})")
        self.heads = heads
        self.attn_dropout = dropout
        self.ln_attn = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_out = nn.Linear(dim, dim)
        self.ln_ff = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, dim), nn.ReLU(), Dropout(dropout), nn.Linear(dim, dim)
        )
        self.drop = Dropout(dropout)
        # rel_bias[h, k]: logit bonus of head h for a key k steps before the query.
        self.rel_bias = nn.Parameter(torch.zeros(heads, max_len))

    def forward(self, x: Tensor, mask: Tensor, offsets: Tensor) -> Tensor:
        """One block: ``x [B, L, D]``, additive ``mask [B, 1, L, L]``, ``offsets [L, L]``."""
        batch, length, dim = x.shape
        h = self.ln_attn(x)  # [B, L, D]
        qkv = self.qkv(h).view(batch, length, 3, self.heads, dim // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H, L, D/H]
        bias = self.rel_bias[:, offsets]  # [H, L, L]
        attn = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask + bias.unsqueeze(0),  # [B, H, L, L]
            dropout_p=self.attn_dropout if self.training else 0.0,
        )  # [B, H, L, D/H]
        attn = attn.transpose(1, 2).reshape(batch, length, dim)  # [B, L, D]
        x = x + self.drop(self.attn_out(attn))  # [B, L, D]
        x = x + self.drop(self.ff(self.ln_ff(x)))  # [B, L, D]
        return x


class SASRec(nn.Module):
    """Self-attentive encoder; one pass gives φ for every prefix window of a sequence."""

    supports_all_positions = True

    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding) -> None:
        super().__init__()
        share_table(self, item_emb)
        self.max_len = cfg.max_len
        self.scale = math.sqrt(cfg.dim)
        self.drop = Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            _Block(cfg.dim, cfg.num_heads, cfg.dropout, cfg.max_len) for _ in range(cfg.num_layers)
        )
        self.final_ln = nn.LayerNorm(cfg.dim)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def _masks(self, seq: Tensor) -> tuple[Tensor, Tensor]:
        """Additive attention mask ``[B, 1, L, L]`` and key offsets ``t - s`` ``[L, L]``.

        A query may attend to itself and to real items at or before it. Letting padding
        queries see themselves keeps every softmax row finite; their outputs are zeroed.
        """
        length = seq.shape[1]
        steps = torch.arange(length, device=seq.device)  # [L]
        offsets = steps.view(-1, 1) - steps.view(1, -1)  # [L, L] query t, key s
        causal = offsets >= 0  # [L, L]
        real_key = (seq != 0).view(seq.shape[0], 1, 1, length)  # [B, 1, 1, L]
        allowed = causal & (real_key | torch.eye(length, dtype=torch.bool, device=seq.device))
        zero = torch.zeros((), dtype=self.item_emb.weight.dtype, device=seq.device)
        # out of place (torch.where), so the encoder also runs under torch.func.vmap
        mask = torch.where(allowed, zero, float("-inf"))  # [B, 1, L, L]
        return mask, offsets.clamp(min=0)

    def forward_all(self, seq: Tensor) -> Tensor:
        """φ of the window ending at every position: ``[B, L]`` -> ``[B, L, D]``.

        Padding positions output zeros.
        """
        if seq.shape[1] > self.max_len:
            raise ValueError(f"window length {seq.shape[1]} exceeds max_len {self.max_len}")
        mask, offsets = self._masks(seq)
        real = (seq != 0).unsqueeze(2)  # [B, L, 1]
        x = self.drop(self.item_emb(seq) * self.scale) * real  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask, offsets) * real  # [B, L, D]
        return self.final_ln(x) * real  # [B, L, D]

    def forward(self, seq: Tensor) -> Tensor:
        """φ of each window: ``seq [B, L]`` (left-padded) -> ``[B, D]`` (last position)."""
        return self.forward_all(seq)[:, -1]  # [B, D]
