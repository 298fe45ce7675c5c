"""GRU4Rec sequence encoder: item embeddings -> dropout -> GRU -> last state.

Windows arrive left-padded with 0, but a GRU started from ``h = 0`` still moves on the
padding steps (its biases act even on zero inputs), so running it over the padded tensor
would make φ depend on how much padding there is. Instead each row is rotated so its real
items come first (left-aligned, padding at the end) and one dense ``nn.GRU`` call runs
over the whole batch. The GRU is causal, so the trailing padding cannot reach the states
at real positions; those states are exactly the ones of the unpadded sequence. This is
faster on CPU than packed sequences, and the rotation is a single ``gather``.

Assumes padding is only on the left: the real items of a row are one contiguous suffix.

Under ``torch.func.vmap`` (TP's lanes, test-time adaptation) ``nn.GRU`` has no batching rule
and falls back to one call per lane. With ``unrolled`` set (:func:`unrolled_rnns`) the same
GRU runs as plain tensor operations instead (:func:`gru_unrolled`: one input product for all
steps, then one hidden product and a few element-wise kernels per step), which vmap batches
over lanes: per-lane weights ``[M, 3H, D]`` become batched matrix products.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from dist_tp.config import ModelConfig
from dist_tp.models.layers import Dropout, share_table


def _alignment(seq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lengths and the rotation indices between left-padded and left-aligned layouts.

    Returns ``(lengths [B], to_aligned [B, L], to_padded [B, L])`` such that
    ``seq.gather(1, to_aligned)`` puts the real items first and
    ``aligned.gather(1, to_padded)`` moves per-position values back to ``seq``'s layout.
    """
    batch, length = seq.shape
    lengths = (seq != 0).sum(1)  # [B]
    shift = (length - lengths).unsqueeze(1)  # [B, 1] padding count
    steps = torch.arange(length, device=seq.device).unsqueeze(0)  # [1, L]
    to_aligned = (steps + shift) % length  # [B, L]
    to_padded = (steps - shift) % length  # [B, L]
    return lengths, to_aligned, to_padded


def gru_unrolled(gru: nn.GRU, x: Tensor) -> Tensor:
    """``gru(x)[0]`` (batch first, h_0 = 0) written out step by step with the module's own
    weights (r, z, n gates as ``nn.GRU`` orders them), inter-layer dropout included:
    ``x [B, L, D]`` -> ``[B, L, H]``."""
    for layer in range(gru.num_layers):
        w_ih = getattr(gru, f"weight_ih_l{layer}")  # [3H, D_in]
        w_hh = getattr(gru, f"weight_hh_l{layer}")  # [3H, H]
        b_ih = getattr(gru, f"bias_ih_l{layer}")
        b_hh = getattr(gru, f"bias_hh_l{layer}")
        inputs = F.linear(x, w_ih, b_ih)  # [B, L, 3H] every step's input part at once
        h = x.new_zeros(x.shape[0], gru.hidden_size)
        states = []
        for t in range(x.shape[1]):
            gi, gh = inputs[:, t], F.linear(h, w_hh, b_hh)  # [B, 3H]
            i_r, i_z, i_n = gi.chunk(3, 1)
            h_r, h_z, h_n = gh.chunk(3, 1)
            r, z = torch.sigmoid(i_r + h_r), torch.sigmoid(i_z + h_z)
            n = torch.tanh(i_n + r * h_n)
            h = (1 - z) * n + z * h
            states.append(h)
        x = torch.stack(states, 1)  # [B, L, H]
        if layer < gru.num_layers - 1 and gru.dropout > 0:
            x = F.dropout(x, gru.dropout, gru.training)
    return x


class GRU4Rec(nn.Module):
    """Recurrent encoder; φ is the GRU state after the last real item of the window.

    A ``Linear`` maps the hidden size to ``dim`` when the two differ. A window with no
    real item gets the initial (zero) state.
    """

    supports_all_positions = True
    unrolled = False
    """Run the GRU as plain tensor operations (:func:`gru_unrolled`), which ``vmap`` batches."""

    def __init__(self, cfg: ModelConfig, item_emb: nn.Embedding) -> None:
        super().__init__()
        share_table(self, item_emb)
        self.dropout = Dropout(cfg.dropout)
        self.gru = nn.GRU(
            input_size=cfg.dim,
            hidden_size=cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
        )
        self.proj: nn.Module = (
            nn.Linear(cfg.hidden_size, cfg.dim) if cfg.hidden_size != cfg.dim else nn.Identity()
        )

    def _run(self, seq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """GRU states on the left-aligned batch, plus lengths and the way back."""
        lengths, to_aligned, to_padded = _alignment(seq)
        aligned = seq.gather(1, to_aligned)  # [B, L] real items first
        x = self.dropout(self.item_emb(aligned))  # [B, L, D]
        states = gru_unrolled(self.gru, x) if self.unrolled else self.gru(x)[0]  # [B, L, H]
        return states, lengths, to_padded

    def forward(self, seq: Tensor) -> Tensor:
        """φ of each window: ``seq [B, L]`` (left-padded) -> ``[B, D]``."""
        states, lengths, _ = self._run(seq)  # [B, L, H]
        last = (lengths - 1).clamp(min=0)  # [B]
        idx = last.view(-1, 1, 1).expand(-1, 1, states.shape[2])  # [B, 1, H]
        h = states.gather(1, idx).squeeze(1)  # [B, H]
        h = h * (lengths > 0).unsqueeze(1).to(h.dtype)  # [B, H] empty window -> zero state
        return self.proj(h)  # [B, D]

    def forward_all(self, seq: Tensor) -> Tensor:
        """φ of the window ending at every position: ``[B, L]`` -> ``[B, L, D]``.

        Padding positions get the zero state (then projected).
        """
        states, _, to_padded = self._run(seq)  # [B, L, H]
        idx = to_padded.unsqueeze(2).expand(-1, -1, states.shape[2])  # [B, L, H]
        back = states.gather(1, idx)  # [B, L, H] in seq's layout
        back = back * (seq != 0).unsqueeze(2).to(back.dtype)  # [B, L, H]
        return self.proj(back)  # [B, L, D]
