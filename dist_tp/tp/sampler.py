"""Sampling inner-step mini-batches: each step picks users uniformly at random and K of the
user's (window → next item) examples — without replacement, or with replacement when the
user has fewer than K."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_tp.data.stream import UserSequences


@dataclass
class LaneBatch:
    """Inputs of M lanes × k inner steps × B windows (B = users_per_step · K), global ids."""

    inputs: np.ndarray  # [M, k, B, L] left-padded windows
    targets: np.ndarray  # [M, k, B] next items
    negatives: np.ndarray | None  # [M, k, B, n] sampled negatives (bce loss) or None
    labels: np.ndarray  # [M, k, B] float32, 1 = head user
    users: np.ndarray  # [M, k, users_per_step] user row in the sampler

    def lane(self, m: int) -> LaneBatch:
        """Lane ``m`` alone, as a batch of one lane (for tests and sequential runs)."""
        neg = None if self.negatives is None else self.negatives[m : m + 1]
        return LaneBatch(
            self.inputs[m : m + 1],
            self.targets[m : m + 1],
            neg,
            self.labels[m : m + 1],
            self.users[m : m + 1],
        )


class TaskSampler:
    """The training tasks of some existing users (leave-two-out), held as CSR arrays."""

    def __init__(self, seqs: UserSequences, *, max_len: int, holdout: int = 2) -> None:
        n_windows = seqs.lengths - holdout - 1  # targets s_2..s_{n-holdout}
        keep = n_windows >= 1
        self.seqs = seqs.select(keep)
        self.n_windows = n_windows[keep]
        self.flat = np.concatenate([self.seqs.items.astype(np.int64), [0]])
        self.starts = self.seqs.offsets[:-1]
        self.max_len = max_len

    def __len__(self) -> int:
        return len(self.n_windows)

    @property
    def total_windows(self) -> int:
        return int(self.n_windows.sum())

    def sample(
        self,
        rng: np.random.Generator,
        *,
        lanes: int,
        k: int,
        users_per_step: int,
        inner_batch: int,
        num_negatives: int = 0,
        num_items: int = 0,
    ) -> LaneBatch:
        count = lanes * k * users_per_step
        users = rng.integers(0, len(self), count)  # [U] uniform over users
        picks = np.empty((count, inner_batch), dtype=np.int64)
        for j, u in enumerate(users):
            n = int(self.n_windows[u])
            picks[j] = rng.choice(n, inner_batch, replace=n < inner_batch)
        target_pos = self.starts[users, None] + 1 + picks  # [U, K] index into flat
        cols = np.arange(-self.max_len, 0)
        idx = target_pos[..., None] + cols  # [U, K, L]
        valid = idx >= self.starts[users, None, None]
        inputs = np.where(valid, self.flat[np.clip(idx, 0, None)], 0)
        targets = self.flat[target_pos]  # [U, K]
        labels = np.repeat(self.seqs.is_head[users].astype(np.float32)[:, None], inner_batch, 1)
        shape = (lanes, k, users_per_step * inner_batch)
        negatives = None
        if num_negatives > 0:
            # uniform over 1..N without the positive: draw from 1..N-1, shift values >= pos
            draw = rng.integers(1, num_items, (*targets.shape, num_negatives))
            negatives = (draw + (draw >= targets[..., None])).reshape(*shape, num_negatives)
        return LaneBatch(
            inputs=inputs.reshape(*shape, self.max_len),
            targets=targets.reshape(shape),
            negatives=negatives,
            labels=labels.reshape(shape),
            users=users.reshape(lanes, k, users_per_step),
        )
