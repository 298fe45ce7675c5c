"""Shared model parts: the item tables, the scorer, the training losses, and Popularity.

Every backbone is a sequence encoder φ that maps a window of item ids to one vector; the
:class:`Recommender` owns the item input table (which the encoder reads), optionally a
separate output table with a per-item bias, and scores a sequence embedding against items
by dot product. Keeping the scorer and losses here means all backbones are trained and
evaluated the same way.

Item ids are ``1..N``; id 0 is padding and every table has ``N + 1`` rows, row 0 zero.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dist_tp.config import ModelConfig

LOSS_KINDS = ("ce", "bce", "sampled_softmax")
SAMPLINGS = ("uniform", "popularity", "in_batch")
TASKS = ("encode", "encode_all", "loss")  # what ``Recommender.forward`` runs by name


def negatives_from_draws(draws, pos):
    """Negatives from uniform draws in ``1..N-1`` (numpy or torch, ``[..., K]``) for positives
    ``pos`` (``[...]``): draws at or above the positive move up by one, so every item but the
    positive is equally likely. The one definition of a uniform negative, used by joint
    training (a torch generator on the device) and by TP's sampler (one numpy generator per
    lane)."""
    return draws + (draws >= pos[..., None])


def sample_negatives(
    pos: Tensor,
    num_negatives: int,
    num_items: int,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw ``num_negatives`` items per positive, uniform over ``1..N`` minus the positive.

    Uses the shift trick rather than rejection: draw ``r`` uniform in ``1..N-1`` and map
    ``r >= pos`` to ``r + 1``. That hits every item except ``pos`` with equal probability
    in one vectorised pass, with no resampling loop.

    Args:
        pos: positive item ids ``[M]`` in ``1..num_items``.
        num_negatives: negatives per positive, ``K >= 1``.
        num_items: N, the number of real items (must be at least 2).
        generator: optional RNG, for reproducible sampling.

    Returns:
        LongTensor ``[M, K]`` of negative ids, never equal to the row's positive.
    """
    if num_items < 2:
        raise ValueError("sampling negatives needs at least 2 items")
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    shape = (pos.shape[0], num_negatives)
    r = torch.randint(1, num_items, shape, generator=generator, device=pos.device)  # [M, K]
    return negatives_from_draws(r, pos)  # [M, K] in 1..N, != pos


class Recommender(nn.Module):
    neg_cdf: Tensor | None = None  # set_item_popularity
    log_q: Tensor | None = None
    """A sequence encoder plus the item tables and the dot-product scorer.

    The input table ``item_emb`` is shared with the encoder. Scoring uses that same table
    (weight tying, fewer parameters) unless ``cfg.output_table`` is set, in which case a
    separate output table and a per-item bias are learned.
    """

    def __init__(self, cfg: ModelConfig, num_items: int, encoder_cls: type[nn.Module]) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1, got {num_items}")
        self.cfg = cfg
        self.num_items = num_items
        self.item_emb = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
        self.encoder = encoder_cls(cfg, self.item_emb)
        self.out_emb: nn.Embedding | None = None
        self.out_bias: nn.Parameter | None = None
        if cfg.output_table:
            self.out_emb = nn.Embedding(num_items + 1, cfg.dim, padding_idx=0)
            self.out_bias = nn.Parameter(torch.zeros(num_items + 1))
        self.init_weights()

    @property
    def supports_all_positions(self) -> bool:
        """Whether :meth:`encode_all` works (one pass yields every prefix window)."""
        return bool(getattr(self.encoder, "supports_all_positions", False))

    def init_weights(self) -> None:
        """Small normal item tables (std 0.02) with a zero padding row; zero biases.

        A small scale keeps initial logits near zero for both the softmax and the sigmoid
        losses. Encoder-internal layers keep their own initialisation.
        """
        tables = [self.item_emb] + ([self.out_emb] if self.out_emb is not None else [])
        with torch.no_grad():
            for table in tables:
                nn.init.normal_(table.weight, mean=0.0, std=0.02)
                table.weight[0].zero_()
            if self.out_bias is not None:
                self.out_bias.zero_()

    def _table(self) -> tuple[Tensor, Tensor | None]:
        """The output item weights ``[N+1, D]`` and bias ``[N+1]`` (or None)."""
        if self.out_emb is not None:
            return self.out_emb.weight, self.out_bias
        return self.item_emb.weight, None

    def encode(self, seq: Tensor) -> Tensor:
        """Sequence embedding of each left-padded window ``[B, L]`` -> ``[B, D]``."""
        return self.encoder(seq)  # [B, D]

    def forward(self, *args, all_positions: bool = False, task: str | None = None, **kwargs):
        """:meth:`encode` (:meth:`encode_all` with ``all_positions``), or the method ``task``
        names (one of ``TASKS``, e.g. ``"loss"``). ``torch.func.functional_call`` runs
        ``forward``, so this is how per-lane parameters (TP) reach the model's own code."""
        if task is None:
            task = "encode_all" if all_positions else "encode"
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        return getattr(self, task)(*args, **kwargs)

    def item_row_names(self) -> list[str]:
        """The names (as in ``named_parameters``) of the parameters indexed by item id, whose
        row i belongs to item i: the item tables and the output bias."""
        rows = [self.item_emb.weight]
        if self.out_emb is not None:
            rows += [self.out_emb.weight, self.out_bias]
        ids = {id(p) for p in rows}
        return [name for name, p in self.named_parameters() if id(p) in ids]

    def item_table_names(self) -> list[str]:
        """The item tables' names (``[N+1, D]`` weights): the parameters that
        ``train.item_updates=sparse`` updates row-wise (the output bias stays dense)."""
        tables = {id(self.item_emb.weight)}
        if self.out_emb is not None:
            tables.add(id(self.out_emb.weight))
        return [name for name, p in self.named_parameters() if id(p) in tables]

    def encode_all(self, seq: Tensor) -> Tensor:
        """Embeddings of every prefix window, ``[B, L]`` -> ``[B, L, D]``.

        Position ``t`` holds φ of the window ending at ``t``; raises for encoders that
        only see whole windows (Caser).
        """
        if not self.supports_all_positions:
            name = type(self.encoder).__name__
            raise NotImplementedError(f"{name} encodes whole windows only; use encode()")
        if seq.shape[1] > self.cfg.max_len:  # a later position would read more than L items
            name = type(self.encoder).__name__
            raise ValueError(
                f"{name} reads rows of at most model.max_len = {self.cfg.max_len} items, "
                f"got {seq.shape[1]}"
            )
        return self.encoder.forward_all(seq)  # [B, L, D]

    @property
    def sparse_items(self) -> bool:
        """Whether item-table lookups give sparse (row) gradients (:meth:`set_sparse_items`)."""
        return self.item_emb.sparse

    def set_sparse_items(self, on: bool) -> None:
        """Make every lookup into the item tables give a sparse gradient, holding only the
        rows it read (``train.item_updates=sparse``): the encoder's input lookups and the
        loss's rows of the output table. A full-softmax or full-ranking product still gives a
        dense one. The bias, when there is one, keeps a dense gradient (one float per item)."""
        self.item_emb.sparse = on
        if self.out_emb is not None:
            self.out_emb.sparse = on

    def _rows(self, items: Tensor, weight: Tensor) -> Tensor:
        """Rows ``items`` of an item table, with a sparse gradient under
        :meth:`set_sparse_items`."""
        return F.embedding(items, weight, sparse=self.sparse_items)

    def score_items(self, emb: Tensor, items: Tensor) -> Tensor:
        """Scores of chosen items: ``emb [..., D]`` against ``items [..., C]`` -> ``[..., C]``."""
        weight, bias = self._table()
        vecs = self._rows(items, weight)  # [..., C, D]
        scores = (vecs * emb.unsqueeze(-2)).sum(-1)  # [..., C]
        if bias is not None:
            scores = scores + bias[items]  # [..., C]
        return scores

    def score_all(self, emb: Tensor) -> Tensor:
        """Scores of every item, ``emb [B, D]`` -> ``[B, N+1]``; column 0 is padding."""
        weight, bias = self._table()
        scores = emb @ weight.t()  # [B, N+1]
        if bias is not None:
            scores = scores + bias  # [B, N+1]
        return scores

    @property
    def num_columns(self) -> int:
        """Columns of :meth:`score_all`: the items and padding, N+1."""
        return self._table()[0].shape[0]

    def score_range(self, emb: Tensor, lo: int, hi: int) -> Tensor:
        """Scores of items ``lo..hi-1``, ``emb [B, D]`` -> ``[B, hi-lo]``: the columns
        ``lo:hi`` of :meth:`score_all` without the others."""
        weight, bias = self._table()
        scores = emb @ weight[lo:hi].t()  # [B, hi-lo]
        if bias is not None:
            scores = scores + bias[lo:hi]  # [B, hi-lo]
        return scores

    def set_item_popularity(self, counts: np.ndarray) -> None:
        """The popularity q of each item, from training counts ``[N+1]`` (add-one smoothed):
        the distribution of ``popularity`` negatives and the logQ correction of sampled
        softmax. Plain tensors on the item table's device, neither parameters nor buffers:
        never saved (they follow from the data) nor broadcast by DDP; set once the model is
        on its device."""
        q = np.asarray(counts, dtype=np.float64).copy()
        if q.shape != (self.num_items + 1,):
            raise ValueError(f"counts must have N+1 = {self.num_items + 1} entries")
        q[0] = 0.0
        q[1:] += 1.0
        q /= q.sum()
        device = self._table()[0].device
        cdf = torch.as_tensor(np.cumsum(q[1:]), dtype=torch.float64, device=device)
        log_q = torch.as_tensor(np.log(np.maximum(q, 1e-30)), dtype=torch.float32, device=device)
        self.neg_cdf = cdf  # [N] cumulative q over items 1..N
        self.log_q = log_q  # [N+1]

    def sample_popular(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None
    ) -> Tensor:
        """Items ``1..N`` drawn in proportion to their popularity (``set_item_popularity``)."""
        cdf = self.neg_cdf
        if cdf is None:
            raise RuntimeError("popularity negatives need set_item_popularity(counts) first")
        u = torch.rand(shape, generator=generator, device=cdf.device, dtype=torch.float64)
        return (torch.searchsorted(cdf, u * cdf[-1], right=True) + 1).clamp_(max=len(cdf))

    def loss(
        self,
        emb: Tensor,
        pos: Tensor,
        *,
        kind: str,
        num_negatives: int = 1,
        generator: torch.Generator | None = None,
        negatives: Tensor | None = None,
        sampling: str = "uniform",
        log_q: Tensor | None = None,
        reduction: str = "mean",
        shared: bool = False,
    ) -> Tensor:
        """Mean next-item loss of sequence embeddings ``emb [M, D]`` for targets ``pos [M]``
        (``reduction="none"``: the ``[M]`` losses). The one training loss: joint training
        calls it directly, TP's inner steps through ``forward(task="loss")``.

        ``ce``: softmax cross-entropy over the real items ``1..N`` (padding column left
        out, so it never takes probability mass). ``bce``: sigmoid loss of the positive
        against ``num_negatives`` uniform negatives per positive (``negatives [M, K]`` when
        given, else drawn with ``generator``), ``-log σ(s+) - Σ log(1 - σ(s-))``, averaged
        over positives. ``sampled_softmax``: softmax cross-entropy of the positive against
        ``num_negatives`` negatives (``sampling``: ``uniform``, or ``popularity`` with each
        logit corrected by ``- log q(item)``) or against the other positives of the batch
        (``in_batch``, logQ-corrected too); a negative equal to the row's positive is left
        out. ``log_q`` (``[N+1]``, indexed like the item ids given) defaults to the model's
        (``set_item_popularity``); TP's lanes pass their own rows of it. ``shared``
        (``sampled_softmax``, or ``negatives`` given as ``[K]``): one set of ``num_negatives``
        negatives for every window, scored by one matrix product (:meth:`_shared_softmax`).
        """
        if kind == "sampled_softmax" and (
            shared or (negatives is not None and negatives.dim() == 1)
        ):
            return self._shared_softmax(
                emb, pos, num_negatives, generator, negatives, sampling, log_q, reduction
            )
        if kind == "sampled_softmax":
            return self._sampled_softmax(
                emb, pos, num_negatives, generator, negatives, sampling, log_q, reduction
            )
        if kind == "ce":
            weight, bias = self._table()
            logits = emb @ weight[1:].t()  # [M, N]
            if bias is not None:
                logits = logits + bias[1:]  # [M, N]
            return F.cross_entropy(logits, pos - 1, reduction=reduction)
        if kind == "bce":
            neg = negatives  # [M, K]
            if neg is None:
                neg = sample_negatives(pos, num_negatives, self.num_items, generator)
            items = torch.cat([pos.unsqueeze(1), neg], dim=1)  # [M, 1+K]
            scores = self.score_items(emb, items)  # [M, 1+K]
            # -log σ(s) = softplus(-s); -log(1 - σ(s)) = softplus(s): stable forms.
            per_pos = F.softplus(-scores[:, 0]) + F.softplus(scores[:, 1:]).sum(1)  # [M]
            return per_pos if reduction == "none" else per_pos.mean()
        raise ValueError(f"loss kind must be one of {LOSS_KINDS}, got {kind!r}")

    def _log_q(self, sampling: str, log_q: Tensor | None) -> Tensor | None:
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if sampling != "uniform" and log_q is None:
            log_q = self.log_q
            if log_q is None:
                raise RuntimeError(f"{sampling} negatives need set_item_popularity(counts)")
        return log_q

    def _shared_softmax(
        self, emb, pos, num_negatives, generator, negatives, sampling, log_q, reduction
    ) -> Tensor:
        """Softmax of each window's positive against one set of negatives ``[K]`` shared by
        the whole batch (uniform over ``1..N``, or by popularity with logQ correction); a
        negative equal to the window's positive is left out of that window's softmax."""
        log_q = self._log_q(sampling, log_q)
        if sampling == "in_batch":
            raise ValueError("shared negatives are uniform or popularity, not in_batch")
        neg = negatives  # [K]
        if neg is None:
            if sampling == "popularity":
                neg = self.sample_popular((num_negatives,), generator)
            else:
                neg = torch.randint(
                    1, self.num_items + 1, (num_negatives,), generator=generator, device=pos.device
                )
        weight, bias = self._table()
        positive = (self._rows(pos, weight) * emb).sum(-1, keepdim=True)  # [M, 1]
        others = emb @ self._rows(neg, weight).t()  # [M, K]
        if bias is not None:
            positive, others = positive + bias[pos, None], others + bias[neg]
        if sampling == "popularity":
            positive, others = positive - log_q[pos, None], others - log_q[neg]
        others = others.masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), float("-inf"))
        logits = torch.cat([positive, others], 1)  # [M, 1+K]
        return F.cross_entropy(logits, torch.zeros_like(pos), reduction=reduction)

    def _sampled_softmax(
        self, emb, pos, num_negatives, generator, negatives, sampling, log_q, reduction
    ) -> Tensor:
        log_q = self._log_q(sampling, log_q)
        if sampling == "in_batch":
            weight, bias = self._table()
            vecs = self._rows(pos, weight)  # [M, D]
            logits = emb @ vecs.t()  # [M, M]: row i against every positive of the batch
            if bias is not None:
                logits = logits + bias[pos]
            logits = logits - log_q[pos]
            eye = torch.eye(len(pos), dtype=torch.bool, device=pos.device)  # [M, M]
            clash = (pos.unsqueeze(0) == pos.unsqueeze(1)) & ~eye  # the same item elsewhere
            logits = logits.masked_fill(clash, float("-inf"))
            target = torch.arange(len(pos), device=pos.device)
            return F.cross_entropy(logits, target, reduction=reduction)
        neg = negatives  # [M, K]
        if neg is None:
            if sampling == "popularity":
                neg = self.sample_popular((pos.shape[0], num_negatives), generator)
            else:
                neg = sample_negatives(pos, num_negatives, self.num_items, generator)
        items = torch.cat([pos.unsqueeze(1), neg], dim=1)  # [M, 1+K]
        logits = self.score_items(emb, items)  # [M, 1+K]
        if sampling == "popularity":
            logits = logits - log_q[items]
        hit = torch.cat(
            [torch.zeros_like(pos, dtype=torch.bool).unsqueeze(1), neg == pos[:, None]], 1
        )
        logits = logits.masked_fill(hit, float("-inf"))  # [M, 1+K]
        target = torch.zeros_like(pos)
        return F.cross_entropy(logits, target, reduction=reduction)


class Popularity(nn.Module):
    """Most-popular baseline: every user gets the same scores, the training item counts.

    It has no parameters; ``encode`` returns a dummy ``[B, 1]`` tensor so the evaluation
    code that calls ``score_all(encode(seq))`` works unchanged.
    """

    supports_all_positions = False

    def __init__(self, counts: np.ndarray | Tensor) -> None:
        super().__init__()
        counts_t = torch.as_tensor(np.asarray(counts), dtype=torch.float32)  # [N+1]
        if counts_t.dim() != 1 or counts_t.shape[0] < 2:
            raise ValueError("counts must be a 1-D array of length N + 1")
        self.register_buffer("counts", counts_t)
        self.num_items = counts_t.shape[0] - 1

    def encode(self, seq: Tensor) -> Tensor:
        """Dummy sequence embedding ``[B, 1]``; popularity ignores the history."""
        return seq.new_zeros((seq.shape[0], 1), dtype=torch.float32)  # [B, 1]

    def forward(self, seq: Tensor) -> Tensor:
        return self.encode(seq)  # [B, 1]

    def score_all(self, emb: Tensor) -> Tensor:
        """The item counts repeated for each row: ``[B, ...]`` -> ``[B, N+1]`` float."""
        return self.counts.unsqueeze(0).repeat(emb.shape[0], 1)  # [B, N+1]

    @property
    def num_columns(self) -> int:
        return self.counts.shape[0]

    def score_range(self, emb: Tensor, lo: int, hi: int) -> Tensor:
        return self.counts[lo:hi].unsqueeze(0).repeat(emb.shape[0], 1)  # [B, hi-lo]
