"""Test-time adaptation: a few plain SGD steps per user on its own windows before it is scored.

Each user starts from the trained parameters Θ and takes ``steps`` SGD steps (lr ``lr``) on
the (window → next item) examples it has before the item being predicted: for a query at
0-based position p of the sequence (p = n - offset in evaluation, p = n in
:class:`~dist_tp.evaluation.recommend.Predictor`), the targets at positions 1..p-1, each with
the (up to) L items before it, left-padded with 0. Only the ``windows`` most recent of them
are kept; every step trains on all of them, the loss the model's own training loss
(``Recommender.loss`` through ``forward(task="loss")``, the run's ``train.loss``) averaged
over the user's real windows. The query's target is never among them.

Users are vectorised as TP's lanes are (:mod:`dist_tp.algorithms.tp.lanes`): one copy of the
adapted parameters per user, ``functional_call`` + ``grad`` + ``vmap``, so a step of U users
is one batched forward/backward. The model runs in eval mode throughout (no dropout), and the
negatives of the sampled losses are a hash of (seed, user, step, window, k), so the adapted
parameters, and the metrics, are a function of the checkpoint and the user alone: the same on
any batching of users and on any number of ranks. An encoder that reads every position in
one pass (SASRec, GRU4Rec) reads a user's windows from shared rows (:func:`encoder_rows`):
those within its first L+1 items from one row, as TP's lanes share them.

What changes (``params``):

- ``all``: every parameter. With the full softmax (``ce``) every item row gets a gradient, so
  each user carries the whole item table(s) ``[N+1, D]`` (*dense* mode). With a sampled loss
  (``bce``, ``sampled_softmax``) plain SGD touches only the rows of the user's items and
  negatives, so the user carries just those rows, indexed by local ids (*rows* mode), as a
  TP lane does; the result is the same as with the whole table.
- ``last``: the encoder's last block (:func:`last_parameter_names`) and every norm layer, plus
  the item-table rows (input table, output table and bias) of the user's own items, those of
  its adaptation windows (inputs and targets; the query's window is among them); every other
  parameter and row, sampled negatives' included, stays Θ's.

Negatives (:func:`adaptation_negatives`): ``train.num_negatives`` per window and step, drawn
anew each step, uniform or by popularity as ``train.negatives`` says (one set per window even
under ``train.shared_negatives``); ``in_batch``: the positives of the user's other windows
(the softmax of a TP lane's mini-batch made of one user's windows), logQ-corrected.

Memory: users are adapted in chunks (:func:`user_chunks`, ordered by the encoder rows they
need), so that about ``BUDGET_FLOATS`` floats (256 MB) hold a chunk's per-user item rows
(three copies: rows, gradient, update) and activations (:func:`users_per_chunk`). With
``ce`` a user's rows are the whole table, so a large catalogue adapts few users at a time
(it works, slowly); scoring then goes through :meth:`AdaptedUsers.score_range` in item
chunks like the unadapted evaluation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

from dist_tp.core.device import module_device, to_device
from dist_tp.data.examples import windows as left_padded
from dist_tp.data.protocol import splitmix64
from dist_tp.data.stream import UserSequences
from dist_tp.models.layers import unrolled_rnns
from dist_tp.models.scoring import negatives_from_draws

BUDGET_FLOATS = 64 * 2**20
"""Floats (4 bytes each: 256 MB) that one chunk of adapted users may take, roughly."""
ACTIVATION_COPIES = 40
"""Activation floats per (window, position, dim, layer) that one adaptation step keeps for its
backward pass, an estimate for :func:`users_per_chunk`: measured ~36 for SASRec (d = 64,
L = 50, 2 layers: ~29 MB a user at W = 32), rounded up."""
NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class Adaptation:
    """How users are adapted: ``eval.adapt_*`` and the run's loss (``train.loss``,
    ``train.num_negatives``, ``train.negatives``)."""

    steps: int = 0
    lr: float = 0.1
    params: str = "all"
    windows: int = 32
    loss: str = "ce"
    num_negatives: int = 1
    negatives: str = "uniform"
    seed: int = 0
    """Mixed with the user's id into the sampled losses' negatives."""

    def __post_init__(self) -> None:
        if self.params not in ("all", "last"):
            raise ValueError(f"adapt_params must be all or last, got {self.params!r}")
        if self.steps < 0 or self.windows < 1 or not self.lr > 0:
            raise ValueError("adapt_steps >= 0, adapt_windows >= 1 and adapt_lr > 0 needed")

    @classmethod
    def from_config(cls, cfg, **changes) -> Adaptation:
        """The adaptation a run's config (``dist_tp.config.Config``) asks for."""
        ev, train = cfg.eval, cfg.train
        made = cls(
            steps=ev.adapt_steps,
            lr=ev.adapt_lr,
            params=ev.adapt_params,
            windows=ev.adapt_windows,
            loss=train.loss,
            num_negatives=train.num_negatives,
            negatives=train.negatives,
        )
        return replace(made, **changes) if changes else made

    @property
    def sampled(self) -> bool:
        """Whether each window has negatives of its own (``bce``, ``sampled_softmax``)."""
        return self.loss in ("bce", "sampled_softmax")

    @property
    def needs_popularity(self) -> bool:
        """Whether the loss reads the items' popularity (``set_item_popularity``)."""
        return self.loss == "sampled_softmax" and self.negatives != "uniform"

    def record(self) -> dict:
        """What ``metrics.json`` says of it (under ``adapt``)."""
        return {"steps": self.steps, "lr": self.lr, "params": self.params, "windows": self.windows}


@dataclass
class UserWindows:
    """Each user's adaptation windows, most recent first, padded to W per user.

    ``inputs [U, W, L]``, ``targets [U, W]``, ``weights [U, W]`` (1 for a real window, 0 for
    padding: a copy of the user's oldest real window), ``counts [U]`` real windows, ``user
    [U]`` ids (the negatives' seed), ``positions [U, W]`` each target's index in its user's
    sequence (>= 1; the window holds the up to L items before it)."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray
    counts: np.ndarray
    user: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return len(self.user)

    def take(self, index: np.ndarray) -> UserWindows:
        return UserWindows(
            self.inputs[index],
            self.targets[index],
            self.weights[index],
            self.counts[index],
            self.user[index],
            self.positions[index],
        )


def adaptation_windows(
    seqs: UserSequences, *, max_len: int, offset: int, windows: int
) -> UserWindows:
    """The windows each user of ``seqs`` adapts on before its query at ``offset`` from the end
    (:func:`dist_tp.data.examples.eval_queries`; same users, same order; ``offset=0``: the
    next item after the whole sequence): targets at positions 1..n-offset-1 (0-based), the
    ``windows`` latest of them."""
    flat = np.concatenate([seqs.items.astype(np.int64), [0]])
    starts = seqs.offsets[:-1]
    query = seqs.offsets[1:] - offset
    ok = query > starts  # eval_queries' users: at least one input item
    return _windows(flat, starts[ok], query[ok], seqs.user[ok], max_len, windows)


def sequence_windows(sequences: list, *, max_len: int, windows: int) -> UserWindows:
    """:func:`adaptation_windows` of item-index lists (a Predictor's sequences), each
    predicting the item after its end; every user id 0."""
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    items = np.concatenate([np.asarray(s, dtype=np.int64) for s in sequences] + [np.zeros(1)])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    user = np.zeros(len(sequences), dtype=np.int64)
    return _windows(items.astype(np.int64), offsets[:-1], offsets[1:], user, max_len, windows)


def _windows(flat, starts, query, user, max_len: int, windows: int) -> UserWindows:
    counts = np.clip(query - starts - 1, 0, windows)  # [U] targets at starts+1 .. query-1
    recency = np.arange(windows)  # [W] 0 = the most recent window
    slot = np.minimum(recency[None, :], np.maximum(counts - 1, 0)[:, None])  # [U, W]
    target_pos = query[:, None] - 1 - slot  # [U, W] padding: the oldest real window again
    inputs = left_padded(flat, target_pos, starts[:, None], max_len)  # [U, W, L]
    weights = (recency[None, :] < counts[:, None]).astype(np.float32)  # [U, W]
    positions = target_pos - starts[:, None]  # [U, W]
    return UserWindows(inputs, flat[target_pos], weights, counts, np.asarray(user), positions)


ROW_MODES = ("windows", "prefix")


@dataclass
class EncoderRows:
    """What the encoder reads for each user's windows: ``rows [U, R, L]``, and where each
    window's embedding lies in its output, ``slot_row [U, W]`` and ``slot_pos [U, W]``.
    ``mode`` (:func:`encoder_rows`): ``windows`` reads each row at its last position only
    (row w is window w); ``prefix`` reads every position (``encode_all``). ``counts [U]``:
    each user's rows, the rest of R zero padding."""

    rows: np.ndarray
    slot_row: np.ndarray
    slot_pos: np.ndarray
    counts: np.ndarray
    mode: str

    @property
    def all_positions(self) -> bool:
        return self.mode != "windows"


def row_mode(model: nn.Module, asked: str | None = None) -> str:
    """How ``model``'s encoder reads a user's windows (:func:`encoder_rows`): by default
    ``prefix`` where it supports all positions (SASRec, GRU4Rec), else ``windows`` (Caser);
    ``asked``: that mode, where the encoder supports it."""
    supported = ["windows"]
    if getattr(model, "supports_all_positions", False):
        supported.append("prefix")
    if asked is None:
        return supported[-1]
    if asked not in supported:
        raise ValueError(f"row mode {asked!r}: this encoder reads {supported}")
    return asked


def encoder_rows(win: UserWindows, max_len: int, *, mode: str) -> EncoderRows:
    """The rows that encode ``win``'s windows, exactly (an all-positions encoder gives at
    each position φ of the window ending there):

    - ``windows``: one row per window.
    - ``prefix`` (as TP's lanes share rows,
      :meth:`~dist_tp.algorithms.tp.sampler.TaskSampler._shared_rows`): every window whose
      target lies within the user's first L+1 items is a prefix of the user's first row, so
      one row serves them all; a later target keeps a row of its own. A user's windows run
      most recent first, so its later targets come first: row j is window j for j < (its
      later targets), then the row of its most recent early window. A user with at most L+1
      items before its query has one row instead of W.
    """
    L = max_len
    users, width = win.targets.shape
    counts, n_late = rows_needed(win, max_len, mode)
    oldest = np.maximum(win.counts - 1, 0)  # [U] the slot of its oldest real window
    slot = np.minimum(np.arange(width)[None, :], oldest[:, None])  # [U, W] padding: oldest
    if mode == "windows":
        return EncoderRows(win.inputs, slot, np.full((users, width), L - 1), counts, mode)
    late = win.positions > L  # [U, W] the target has more than L items before it
    rows = win.inputs[:, : max(int(counts.max(initial=0)), 1)].copy()  # [U, R, L] row j: window j
    rows[np.arange(rows.shape[1])[None, :] >= counts[:, None]] = 0
    early_row = np.minimum(n_late, width - 1)  # [U] the row of its first L+1 items
    row_items = np.take_along_axis(win.positions, early_row[:, None], 1)  # [U, 1] its items
    slot_row = np.where(late, slot, early_row[:, None])
    slot_pos = np.where(late, L - 1, L - row_items + win.positions - 1)
    return EncoderRows(rows, slot_row, slot_pos, counts, mode)


def rows_needed(win: UserWindows, max_len: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Each user's encoder rows under ``mode`` (:func:`encoder_rows`), ``[U]``, and how many
    of its windows have a target past its first L+1 items (``prefix``: one row each; they are
    its most recent windows), ``[U]``."""
    if mode not in ROW_MODES:
        raise ValueError(f"row mode must be one of {ROW_MODES}, got {mode!r}")
    users, width = win.targets.shape
    real = win.weights > 0
    late = win.positions > max_len  # [U, W]
    n_late = (late & real).sum(1)
    if mode == "windows":
        return np.full(users, width), n_late
    return n_late + (~late & real).any(1), n_late


def adaptation_negatives(
    win: UserWindows, adaptation: Adaptation, num_items: int, cdf: Tensor | None = None
) -> np.ndarray | None:
    """Negatives ``[U, steps, W, K]`` of the sampled losses, a hash of (seed, user, step,
    window recency, k): uniform over ``1..N`` less the window's positive, or by popularity
    (``cdf``: the model's ``neg_cdf``). ``in_batch``: the positives of the user's other
    windows (K = W; the window's own positive where that window is padding or itself, which
    the loss leaves out), the same each step. None when the loss draws none."""
    if not adaptation.sampled or adaptation.steps == 0:
        return None
    steps, k = adaptation.steps, adaptation.num_negatives
    users, width = win.targets.shape
    if adaptation.negatives == "in_batch":
        real = win.weights[:, None, :] > 0  # [U, 1, W] window j real
        other = np.where(real, win.targets[:, None, :], win.targets[:, :, None])  # [U, W, W]
        return np.broadcast_to(other[:, None], (users, steps, width, width)).copy()
    if num_items < 2:
        raise ValueError("sampling negatives needs at least 2 items")
    salt = splitmix64(np.array([adaptation.seed], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        keys = splitmix64(win.user.astype(np.int64).view(np.uint64) ^ salt)  # [U]
        counter = np.arange(steps * width * k, dtype=np.uint64).reshape(1, steps, width, k)
        bits = splitmix64(keys.reshape(-1, 1, 1, 1) + counter * np.uint64(0x9E3779B97F4A7C15))
    unit = (bits >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [U, S, W, K] in [0, 1)
    if adaptation.negatives == "popularity":
        if cdf is None:
            raise RuntimeError("popularity negatives need set_item_popularity(counts) first")
        c = cdf.double().cpu().numpy()
        drawn = np.searchsorted(c, unit * c[-1], side="right") + 1
        return np.minimum(drawn, len(c)).astype(np.int64)
    draws = 1 + np.floor(unit * (num_items - 1)).astype(np.int64)  # 1..N-1
    return negatives_from_draws(draws, win.targets[:, None, :]).astype(np.int64)


def last_parameter_names(model: nn.Module) -> list[str]:
    """What ``adapt_params=last`` adapts besides the user's item rows: every norm layer's
    parameters and the encoder's last block. The last block is the last of the encoder's
    ``blocks`` (SASRec), the last layer of its RNN and what follows it (GRU4Rec: the top GRU
    layer and the projection), else its last child module with parameters (Caser: ``fc``)."""
    encoder = model.encoder
    chosen: set[int] = set()
    for module in model.modules():
        if isinstance(module, NORMS):
            chosen.update(id(p) for p in module.parameters())
    blocks = getattr(encoder, "blocks", None)
    rnns = [(n, m) for n, m in encoder.named_children() if isinstance(m, nn.RNNBase)]
    if isinstance(blocks, nn.ModuleList) and len(blocks):
        chosen.update(id(p) for p in blocks[-1].parameters())
    elif rnns:
        _, rnn = rnns[-1]
        top = f"_l{rnn.num_layers - 1}"
        chosen.update(
            id(p) for n, p in rnn.named_parameters() if n.endswith((top, top + "_reverse"))
        )
        after = False
        for child in encoder.children():
            if after:
                chosen.update(id(p) for p in child.parameters())
            after = after or child is rnn
    else:
        last = None
        for child in encoder.children():
            params = list(child.parameters())
            if params:
                last = params
        chosen.update(id(p) for p in last or [])
    rows = set(model.item_row_names())
    return [n for n, p in model.named_parameters() if id(p) in chosen and n not in rows]


def users_per_chunk(
    model: nn.Module,
    adaptation: Adaptation,
    max_len: int,
    rows: int | None = None,
) -> int:
    """Users adapted at once: about ``BUDGET_FLOATS`` floats for their item rows (three
    copies: rows, gradient, update) and activations (``ACTIVATION_COPIES`` per encoder
    row, position, dim and layer, plus the attention's L per position; ``rows`` encoder rows
    per user, default one per window), at least 1. SASRec, d = 64, L = 50, 2 layers, 32 rows
    on ML-100K: 7 users (measured ~200 MB)."""
    dim = model.item_emb.weight.shape[1]
    row_names = model.item_row_names()
    width, length = adaptation.windows, max_len
    encoded = width if rows is None else max(1, rows)
    if adaptation.loss == "ce":
        table_rows = model.num_items + 1  # every row, per user
    else:  # at most every input, target, negative and query item
        k = width if adaptation.negatives == "in_batch" else adaptation.num_negatives
        per_step = width * k if adaptation.sampled else 0
        table_rows = min(
            model.num_items + 1, width * (length + 1) + length + 1 + per_step * adaptation.steps
        )
    per_row = sum(1 if n.endswith("bias") else dim for n in row_names)
    layers = max(1, int(getattr(getattr(model, "cfg", None), "num_layers", 1)))
    activations = encoded * length * layers * (ACTIVATION_COPIES * dim + 4 * length)
    per_user = 3 * table_rows * per_row + activations
    return max(1, BUDGET_FLOATS // per_user)


def user_chunks(
    model: nn.Module,
    win: UserWindows,
    adaptation: Adaptation,
    *,
    limit: int = 0,
    rows: str | None = None,
) -> list[np.ndarray]:
    """The users of ``win`` with a window, in the chunks they are adapted in: ordered by how
    many encoder rows they need (:func:`encoder_rows`, mode :func:`row_mode` of ``rows``),
    so that a chunk's users pad to about the same rows, and each chunk as large as
    :func:`users_per_chunk` allows for its largest user (at most ``limit`` when given)."""
    max_len = win.inputs.shape[-1]
    index = np.flatnonzero(win.counts > 0)
    need, _ = rows_needed(win.take(index), max_len, row_mode(model, rows))
    order = np.argsort(need, kind="stable")
    index, need = index[order], need[order]

    def fits(last: int) -> int:  # users a chunk may hold whose largest user is ``last``
        return users_per_chunk(model, adaptation, max_len, int(need[last]))

    chunks, lo = [], 0
    while lo < len(index):
        size = min(limit or len(index), fits(lo))
        while size > 1 and (largest := fits(min(lo + size, len(index)) - 1)) < size:
            size = largest  # users sorted by rows: fewer users, no larger a largest one
        chunks.append(index[lo : lo + size])
        lo += size
    return chunks


@contextlib.contextmanager
def _adapting(model: nn.Module):
    """Eval mode (no dropout), dense item lookups (``set_sparse_items`` gives sparse
    gradients, which ``torch.func.grad`` does not take), gradients on, and kernels that
    ``vmap`` batches: the math attention (the fused ones have no batching rule), and on a GPU
    the unrolled GRU (:func:`~dist_tp.models.layers.unrolled_rnns`) as in TP's lanes (on a
    CPU ``nn.GRU`` as it is: the lanes measured the unrolled one slower there)."""
    was_training, was_sparse = model.training, model.sparse_items
    model.eval()
    model.set_sparse_items(False)
    stack = contextlib.ExitStack()
    stack.enter_context(torch.enable_grad())
    stack.enter_context(sdpa_kernel(SDPBackend.MATH))  # the fused CPU one has no vmap rule
    if module_device(model).type == "cuda" and any(
        isinstance(m, nn.RNNBase) for m in model.modules()
    ):  # as TP's lanes: on a GPU the GRU unrolled into batched products, cuDNN off
        stack.enter_context(unrolled_rnns(model))
        stack.enter_context(torch.backends.cudnn.flags(enabled=False))
    try:
        with stack:
            yield
    finally:
        model.train(was_training)
        model.set_sparse_items(was_sparse)


class AdaptedUsers:
    """A chunk of users after adaptation: their own parameters, encoders and scores.

    ``params``: the adapted parameters, ``[U, ...]`` each; item-row parameters are either
    whole tables ``[U, N+1, ...]`` (dense mode) or the rows ``touched [U, T]`` (sorted item
    ids, row 0 first, padded by repeating the last; local id t is ``touched[u, t]``);
    ``changed [U, T]`` marks the rows that adaptation may have moved (real, not padding, and
    for ``last`` the user's own items). ``frozen``: Θ's other parameters, shared."""

    def __init__(self, model, params: dict, frozen: dict, touched, changed) -> None:
        self.model = model
        self.params, self.frozen = params, frozen
        self.touched, self.changed = touched, changed
        self.dense = touched is None
        names = {id(p): n for n, p in model.named_parameters()}
        if model.out_emb is not None:
            self.weight_name = names[id(model.out_emb.weight)]
            self.bias_name = names[id(model.out_bias)]
        else:
            self.weight_name, self.bias_name = names[id(model.item_emb.weight)], None

    def __len__(self) -> int:
        return len(next(iter(self.params.values())))

    def local(self, items: Tensor) -> Tensor:
        """Item ids ``[U, ...]`` as each user's local ids (rows mode; dense: unchanged)."""
        if self.dense:
            return items
        flat = items.reshape(len(items), -1)
        index = torch.searchsorted(self.touched, flat)
        found = torch.gather(self.touched, 1, index.clamp(max=self.touched.shape[1] - 1))
        if not torch.equal(found, flat):
            raise ValueError("an item outside the user's adapted rows")
        return index.reshape(items.shape)

    def encode(self, inputs: Tensor) -> Tensor:
        """Each user's embedding of its own window ``inputs [U, L]`` -> ``[U, D]``."""
        seq = self.local(inputs).unsqueeze(1)  # [U, 1, L]

        def one(params, frozen, x):
            # through vjp (its forward only): vmap batches a GRU inside a functorch
            # transform, not the fused op of a plain call
            return vjp(lambda p: functional_call(self.model, {**frozen, **p}, (x,)), params)[0][0]

        with _adapting(self.model):
            return vmap(one, in_dims=(0, None, 0))(self.params, self.frozen, seq)  # [U, D]

    @torch.no_grad()
    def score_range(self, emb: Tensor, lo: int, hi: int, rows: Tensor | None = None) -> Tensor:
        """Scores of items ``lo..hi-1`` for users ``rows`` (None: all) of their embeddings
        ``emb [U, D]``, each against its own adapted item rows: ``[len(rows), hi-lo]``."""

        def pick(x: Tensor) -> Tensor:
            return x if rows is None else x[rows]

        emb = pick(emb)
        w, b = self.weight_name, self.bias_name
        if self.dense:  # each user's whole table: a batched product
            scores = torch.einsum("ud,ucd->uc", emb, pick(self.params[w])[:, lo:hi])
            if b is not None:
                scores = scores + pick(self.params[b])[:, lo:hi]
            return scores
        theta = dict(self.model.named_parameters())
        scores = emb @ theta[w].detach()[lo:hi].t()  # [B, hi-lo]: Θ's rows
        if b is not None:
            scores = scores + theta[b].detach()[lo:hi]
        touched, changed = pick(self.touched), pick(self.changed)
        mine = changed & (touched >= lo) & (touched < hi)  # [B, T] the user's moved rows
        user, slot = mine.nonzero(as_tuple=True)
        own = (pick(self.params[w])[user, slot] * emb[user]).sum(-1)  # [M]
        if b is not None:
            own = own + pick(self.params[b])[user, slot]
        scores[user, touched[user, slot] - lo] = own
        return scores

    def score_all(self, emb: Tensor) -> Tensor:
        """Every item's score, ``[U, N+1]`` (column 0 padding)."""
        return self.score_range(emb, 0, self.model.num_columns)

    def parameters(self, u: int) -> dict[str, Tensor]:
        """User ``u``'s whole parameter set (Θ's where not adapted), for inspection."""
        out = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        for name, value in self.params.items():
            if self.dense or name not in self.model.item_row_names():
                out[name] = value[u].clone()
            else:
                keep = self.changed[u]
                out[name][self.touched[u][keep]] = value[u][keep]
        return out


def adapt_users(
    model: nn.Module,
    win: UserWindows,
    adaptation: Adaptation,
    *,
    query_inputs: np.ndarray | None = None,
    rows: str | None = None,
) -> AdaptedUsers:
    """``adaptation.steps`` SGD steps for each user of ``win`` (all with at least one real
    window), vectorised; ``query_inputs [U, L]``, the windows the users will be scored on,
    are among the item rows each user carries (rows mode). ``rows``: how the encoder reads
    the windows (:func:`encoder_rows`; default :func:`row_mode`'s), the same result any way."""
    if len(win) == 0 or (win.counts < 1).any():
        raise ValueError("every adapted user needs at least one window")
    device = module_device(model)
    theta = {n: p.detach() for n, p in model.named_parameters()}
    row_names = set(model.item_row_names())
    names = list(theta) if adaptation.params == "all" else last_parameter_names(model)
    names += [n for n in theta if n in row_names and n not in names]
    users = len(win)
    dense = adaptation.loss == "ce"
    negatives = adaptation_negatives(win, adaptation, model.num_items, model.neg_cdf)
    layout = encoder_rows(win, win.inputs.shape[-1], mode=row_mode(model, rows))
    inputs = to_device(layout.rows, device)  # [U, R, L]
    slots = (to_device(layout.slot_row, device), to_device(layout.slot_pos, device))  # [U, W]
    targets = to_device(win.targets, device)  # [U, W]
    weights = to_device(win.weights, device)  # [U, W]
    own_ids = [win.inputs.reshape(users, -1), win.targets]
    if query_inputs is not None:
        own_ids.append(np.asarray(query_inputs).reshape(users, -1))
    own_ids = np.concatenate(own_ids, axis=1)  # [U, X] the user's own items
    log_q = model.log_q if adaptation.needs_popularity else None
    if dense:
        touched = changed = None
        own = torch.zeros(users, model.num_items + 1, dtype=torch.bool, device=device)
        own.scatter_(1, to_device(own_ids, device), True)
        own[:, 0] = False
        mask = None if adaptation.params == "all" else own  # [U, N+1]
        neg = None
    else:
        every = (
            own_ids
            if negatives is None
            else np.concatenate([own_ids, negatives.reshape(users, -1)], axis=1)
        )
        touched, valid = _row_sets(every)  # [U, T]
        touched, valid = to_device(touched, device), to_device(valid, device)
        if adaptation.params == "all":
            changed = valid & (touched != 0)
        else:
            mine, _ = _row_sets(own_ids)
            rows = touched.new_zeros(users, model.num_items + 1, dtype=torch.bool)
            rows.scatter_(1, to_device(mine, device), True)
            changed = valid & rows.gather(1, touched) & (touched != 0)
        mask = changed
        found = AdaptedUsers(model, {}, {}, touched, changed)
        inputs, targets = found.local(inputs), found.local(targets)
        neg = None if negatives is None else found.local(to_device(negatives, device))
        if log_q is not None:
            log_q = log_q[touched]  # [U, T]

    # an RNN's weights go through vmap together or not at all (its batched decomposition
    # mixes them in place): a partly adapted RNN carries its fixed weights per user too
    rnn = {
        f"{m}.{n}" if m else n
        for m, module in model.named_modules()
        if isinstance(module, nn.RNNBase)
        for n, _ in module.named_parameters()
    }
    if rnn & set(names):
        names_batched = names + sorted(rnn - set(names))
    else:
        names_batched = names
    train = {}
    for n in names_batched:
        p = theta[n]
        if n in row_names and not dense:
            train[n] = p[touched]  # [U, T, ...] the user's rows
        else:
            train[n] = p.unsqueeze(0).expand(users, *p.shape)  # no copy until updated
    frozen = {n: p for n, p in theta.items() if n not in train}
    step = vmap(
        grad(_user_loss(model, adaptation, all_positions=layout.all_positions)),
        in_dims=(0, None, 0, 0, 0, 0, None if neg is None else 0, None if log_q is None else 0),
    )
    with _adapting(model):
        for s in range(adaptation.steps):
            negs = None if neg is None else neg[:, s]
            g = step(train, frozen, inputs, slots, targets, weights, negs, log_q)
            for n in names:
                delta = g[n]
                if n in row_names and mask is not None:
                    shape = mask.shape + (1,) * (delta.dim() - mask.dim())
                    delta = delta * mask.reshape(shape).to(delta.dtype)
                train[n] = train[n] - adaptation.lr * delta
    if dense:
        changed = None
    return AdaptedUsers(model, train, frozen, touched, changed)


def _user_loss(model: nn.Module, adaptation: Adaptation, *, all_positions: bool):
    """One user's weighted mean loss over its windows, as a function of its parameters; its
    windows' embeddings read from its encoder rows (:class:`EncoderRows`) at ``slots``."""
    kwargs: dict = {"task": "loss", "kind": adaptation.loss, "reduction": "none"}
    if adaptation.loss == "sampled_softmax":
        # in_batch: the other windows' positives as explicit negatives, logQ-corrected as
        # popularity negatives are: the same softmax as the in-batch one of the user's
        # windows, padding windows left out
        in_batch = adaptation.negatives == "in_batch"
        kwargs["sampling"] = "popularity" if in_batch else adaptation.negatives

    def loss(params, frozen, rows, slots, targets, weights, negatives, log_q):
        every = {**frozen, **params}
        if all_positions:
            out = functional_call(model, every, (rows,), {"all_positions": True})  # [R, L, D]
            emb = out[slots[0], slots[1]]  # [W, D]
        else:
            emb = functional_call(model, every, (rows,))[slots[0]]  # [W, D]
        extra = dict(kwargs)
        if negatives is not None:
            extra["negatives"] = negatives
        if log_q is not None:
            extra["log_q"] = log_q
        losses = functional_call(model, every, (emb, targets), extra)  # [W]
        return (losses * weights).sum() / weights.sum()

    return loss


def _row_sets(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row's distinct ids with 0, sorted and padded by repeating its last: ``[U, T]``,
    and which entries are real (not padding) ``[U, T]``."""
    users = len(ids)
    ids = np.sort(np.concatenate([np.zeros((users, 1), ids.dtype), ids], axis=1), axis=1)
    new = np.ones_like(ids, dtype=bool)
    new[:, 1:] = ids[:, 1:] != ids[:, :-1]
    counts = new.sum(1)
    width = int(counts.max())
    slot = np.cumsum(new, axis=1) - 1  # [U, X] where each distinct id goes
    out = np.zeros((users, width), dtype=np.int64)
    rows, cols = np.nonzero(new)
    out[rows, slot[rows, cols]] = ids[rows, cols]
    valid = np.arange(width)[None, :] < counts[:, None]
    last = out[np.arange(users), counts - 1]
    out = np.where(valid, out, last[:, None])
    return out, valid


def adapted_scores(
    model: nn.Module, win: UserWindows, query_inputs: np.ndarray, adaptation: Adaptation
) -> Tensor:
    """Every item's score ``[U, N+1]`` for each user's query window ``query_inputs [U, L]``:
    after adaptation for the users with a window (in :func:`user_chunks`), unadapted for the
    others."""
    device = module_device(model)
    with torch.no_grad():
        scores = model.score_all(model.encode(to_device(query_inputs, device)))  # [U, N+1]
    if adaptation.steps == 0:
        return scores
    for idx in user_chunks(model, win, adaptation):
        users = adapt_users(model, win.take(idx), adaptation, query_inputs=query_inputs[idx])
        emb = users.encode(to_device(query_inputs[idx], device))
        scores[to_device(idx, device)] = users.score_all(emb)
    return scores
