"""User sequences → model inputs: training rows and evaluation queries (numpy, vectorised).

Leave-last-out for an existing user with items s_1..s_n: s_n is the test target, s_{n-1} the
validation target, s_1..s_{n-2} the training items. The training task of the user is every
(window → next item) pair: for each t = 2..n-2 the window of the (up to) L items before s_t.

Rows, not windows, are what the encoder sees. A row is a left-padded input [L] with a target
per position (0 = no target):
- with an encoder that outputs every position (``forward_all``), the user's first row is
  s_1..s_L with targets s_2..s_{L+1}: its L outputs are exactly the first L windows, because
  each of them starts at s_1. Each later target t > L+1 needs a full L-item window starting
  after s_1 and gets a row of its own, with only its last position as target.
- with a whole-window encoder (Caser) every window is its own row.
Either way the set of (window → next item) examples is exactly the paper's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_tp.data.stream import UserSequences, concat_ranges


@dataclass
class Rows:
    """Training rows: ``inputs`` [R, L] left-padded, ``targets`` [R, L] (0 = none), and
    optionally ``weights`` [R, L], each target's weight in the loss (None: all 1)."""

    inputs: np.ndarray
    targets: np.ndarray
    weights: np.ndarray | None = None

    def take(self, index: np.ndarray) -> Rows:
        """The rows at ``index``."""
        weights = None if self.weights is None else self.weights[index]
        return Rows(self.inputs[index], self.targets[index], weights)

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def windows(self) -> np.ndarray:
        """Number of (window → next item) examples in each row, [R]."""
        return (self.targets > 0).sum(1)


def windows(flat: np.ndarray, ends: np.ndarray, starts: np.ndarray, max_len: int) -> np.ndarray:
    """Left-padded ``flat[max(start, end-L):end]`` for each (start, end), any leading shape
    → [..., L]."""
    idx = ends[..., None] + np.arange(-max_len, 0)  # [..., L]
    valid = idx >= starts[..., None]
    return np.where(valid, flat[np.clip(idx, 0, None)], 0).astype(np.int64)


def training_rows(
    seqs: UserSequences,
    *,
    max_len: int,
    all_positions: bool,
    holdout: int = 2,
    balance: str = "window",
    power: float = 0.0,
    stride: int = 1,
) -> Rows:
    """All training rows of ``seqs`` (existing users; the last ``holdout`` items held out).

    ``stride`` (all-positions encoders): a user's targets past its first L share rows, S =
    ``stride`` to a row of L items that ends at the last of them, so each sees between
    L − S + 1 and L items before it instead of exactly L; S times fewer rows. 1: every such
    target has its own row and its full L-item window (the paper's examples).

    ``balance="user"`` adds weights: user u's n_u windows each weigh W / (U · n_u) (W windows
    and U users in ``seqs``), so every user carries the same total weight and the weights
    average 1: the mean weighted loss is the mean over users of each user's mean loss.
    ``balance="power"``: user u's windows together weigh in proportion to n_u^``power``
    (each W · n_u^(γ−1) / Σ n_v^γ): 0 is ``user``, 1 is ``window``."""
    rows, owner = _training_rows(
        seqs, max_len=max_len, all_positions=all_positions, holdout=holdout, stride=stride
    )
    if balance == "window":
        return rows
    if balance not in ("user", "power"):
        raise ValueError(f"balance must be 'window', 'user' or 'power', got {balance!r}")
    n_windows = np.bincount(owner, weights=rows.windows, minlength=len(seqs))  # [U]
    if balance == "user":
        users = int((n_windows > 0).sum())
        per_user = n_windows.sum() / (max(users, 1) * np.maximum(n_windows, 1))  # [U]
    else:
        n = np.maximum(n_windows, 1)
        mass = np.where(n_windows > 0, n**power, 0.0)  # [U] each user's share, unnormalised
        per_user = n_windows.sum() * mass / (max(mass.sum(), 1e-300) * n)
    weights = np.where(rows.targets > 0, per_user[owner][:, None], 0.0).astype(np.float32)
    return Rows(rows.inputs, rows.targets, weights)


def _training_rows(
    seqs: UserSequences, *, max_len: int, all_positions: bool, holdout: int, stride: int = 1
) -> tuple[Rows, np.ndarray]:
    """The rows, and the user (index into ``seqs``) of each row."""
    flat = np.concatenate([seqs.items.astype(np.int64), [0]])
    starts = seqs.offsets[:-1]
    n_train = np.maximum(seqs.lengths - holdout, 0)  # [U] training items per user
    # target positions (absolute indices into flat) of every window: s_2..s_{n_train}
    n_targets = np.maximum(n_train - 1, 0)
    user_of = np.repeat(np.arange(len(seqs)), n_targets)
    first_target = starts + 1
    target_pos = first_target[user_of] + concat_ranges(n_targets)  # [W]
    if not all_positions:
        inputs = windows(flat, target_pos, starts[user_of], max_len)
        targets = np.zeros_like(inputs)
        targets[:, -1] = flat[target_pos]
        return Rows(inputs, targets), user_of
    # first row per user: inputs s_1..s_m, targets s_2..s_{m+1}, m = min(L, n_train - 1)
    m = np.minimum(n_targets, max_len)
    has = m > 0
    head_in = windows(flat, (starts + m)[has], starts[has], max_len)
    head_tg = windows(flat, (starts + m + 1)[has], (starts + 1)[has], max_len)
    # later targets (index >= L+1 within the user): rows of L items ending at each stride's
    # last target, with the stride's targets at their last positions (stride 1: each target
    # its own full window)
    relative = target_pos - starts[user_of]
    later = relative > max_len
    stride = max(stride, 1)
    last = later & (
        ((relative - max_len) % stride == 0) | (np.r_[user_of[1:] != user_of[:-1], True])
    )  # the stride's last target, or the user's last
    ends = target_pos[last]  # [R'] each row's last target
    owners = user_of[last]
    left = (relative[last] - max_len) % stride
    counts = np.where(left == 0, stride, left)  # a full stride, or what the user's last one has
    tail_in = windows(flat, ends, starts[owners], max_len)
    tail_tg = windows(flat, ends + 1, starts[owners] + 1, max_len)
    tail_tg[np.arange(max_len) < (max_len - counts)[:, None]] = 0  # context-only positions
    rows = Rows(np.concatenate([head_in, tail_in]), np.concatenate([head_tg, tail_tg]))
    return rows, np.concatenate([np.flatnonzero(has), owners])


@dataclass
class Queries:
    """Evaluation queries: model input [B, L], target [B], full history before it [B, H]."""

    inputs: np.ndarray
    targets: np.ndarray
    history: np.ndarray
    is_head: np.ndarray
    user: np.ndarray


def eval_queries(seqs: UserSequences, *, max_len: int, offset: int) -> Queries:
    """Predict each user's item at position ``n - offset`` (1 = last, 2 = second-to-last)
    from the items before it; the history mask covers all of those items."""
    flat = np.concatenate([seqs.items.astype(np.int64), [0]])
    starts = seqs.offsets[:-1]
    target_pos = seqs.offsets[1:] - offset
    ok = target_pos > starts  # at least one input item
    target_pos, starts = target_pos[ok], starts[ok]
    hist_len = int((target_pos - starts).max()) if len(target_pos) else 1
    return Queries(
        inputs=windows(flat, target_pos, starts, max_len),
        targets=flat[target_pos],
        history=windows(flat, target_pos, starts, max(hist_len, 1)),
        is_head=seqs.is_head[ok],
        user=seqs.user[ok],
    )
