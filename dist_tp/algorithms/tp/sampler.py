"""Sampling inner-step mini-batches: each step picks users at random (uniformly, the paper's
choice, in proportion to their training windows, or to a power of it) and K of the user's
(window → next item) examples — without replacement, or, when the user has fewer than K, with
replacement (the paper) or each of them once (``distinct``, weighted). With ``same_user`` a
lane keeps its users for all k steps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_tp.data.examples import windows
from dist_tp.data.stream import PreparedData, UserSequences, balanced_parts, load_sequences
from dist_tp.models.scoring import negatives_from_draws


@dataclass
class LaneBatch:
    """M lanes × k inner steps × B sampled windows (B = users_per_step · K), global item ids.

    The encoder runs on ``rows``; sampled window b of a step is the output of row
    ``slot_row[b]`` at position ``slot_pos[b]``. With an all-positions encoder a user's
    windows whose targets lie in its first L+1 items share one row (its first L items);
    each later target has a row of its own. ``windows`` spells every window out (tests).
    """

    rows: np.ndarray  # [M, k, R, L] left-padded encoder inputs
    slot_row: np.ndarray  # [M, k, B]
    slot_pos: np.ndarray  # [M, k, B]
    windows: np.ndarray  # [M, k, B, L] the sampled windows, left-padded
    targets: np.ndarray  # [M, k, B] next items
    negatives: np.ndarray | None  # [M, k, B, n] sampled negatives (bce loss) or None
    labels: np.ndarray  # [M, k, B] float32, 1 = head user
    users: np.ndarray  # [M, k, users_per_step] user row in the sampler
    weights: np.ndarray | None = None  # [M, k, B] float32 window weights (None: all 1)

    def lane(self, m: int) -> LaneBatch:
        """Lane ``m`` alone, as a batch of one lane (for tests and sequential runs)."""
        return LaneBatch(
            **{
                f: None if getattr(self, f) is None else getattr(self, f)[m : m + 1]
                for f in self.__dataclass_fields__
            }
        )


def load_part(
    data: PreparedData | str, *, max_len: int, rank: int, world_size: int, holdout: int = 2
) -> tuple[TaskSampler, list[int]]:
    """Rank ``rank``'s part of the existing users (``PreparedData.balanced_parts``) as a
    sampler, and every part's number of training windows. Only that part's items are held:
    every rank first reads all users' lengths (one row group at a time), splits them as
    ``TaskSampler(all users).partition(world_size)`` would, then reads its own users alone.
    The sampler equals ``TaskSampler(all).subset(parts[rank])``."""
    data = PreparedData.of(data)
    if world_size == 1:
        sampler = TaskSampler(load_sequences(data, roles=["existing"]), max_len=max_len)
        return sampler, [sampler.total_windows]
    users, n_windows, parts = data.balanced_parts(world_size, holdout=holdout)
    seqs = load_sequences(data, roles=["existing"], users=users[parts[rank]])
    sampler = TaskSampler(seqs, max_len=max_len, holdout=holdout)
    return sampler, [int(n_windows[part].sum()) for part in parts]


class TaskSampler:
    """The training tasks of some existing users (leave-two-out), held as CSR arrays."""

    def __init__(self, seqs: UserSequences, *, max_len: int, holdout: int = 2) -> None:
        n_windows = seqs.lengths - holdout - 1  # targets s_2..s_{n-holdout}
        keep = n_windows >= 1
        self.seqs = seqs.select(keep)
        self.n_windows = n_windows[keep]
        self.flat = np.concatenate([self.seqs.items.astype(np.int64), [0]])
        self.starts = self.seqs.offsets[:-1]
        self.max_len, self.holdout = max_len, holdout
        self.cum_windows = np.cumsum(self.n_windows)  # [U] for picking users by windows

    def __len__(self) -> int:
        return len(self.n_windows)

    @property
    def total_windows(self) -> int:
        return int(self.n_windows.sum())

    def partition(self, world_size: int) -> list[np.ndarray]:
        """These users split into ``world_size`` parts (``balanced_parts``)."""
        return balanced_parts(self.n_windows, world_size)

    def subset(self, rows: np.ndarray) -> TaskSampler:
        """A sampler over some of these users (``rows`` ascending keeps their order)."""
        mask = np.zeros(len(self), dtype=bool)
        mask[rows] = True
        return TaskSampler(self.seqs.select(mask), max_len=self.max_len, holdout=self.holdout)

    def sample(
        self,
        rngs: list[np.random.Generator],
        *,
        k: int,
        users_per_step: int,
        inner_batch: int,
        num_negatives: int = 0,
        num_items: int = 0,
        all_positions: bool = False,
        lane_users: list[np.ndarray] | None = None,
        user_power: float = 0.0,
        negative_cdf: np.ndarray | None = None,
        shared_negatives: bool = False,
        same_user: bool = False,
        distinct: bool = False,
        disjoint_steps: bool = False,
    ) -> LaneBatch:
        """One lane per generator; lane m draws only from ``rngs[m]`` (and, when given, only
        users in ``lane_users[m]``), so a lane's batch does not depend on the other lanes.
        Users are picked with probability in proportion to n_u^``user_power`` (0: uniformly,
        1: in proportion to their windows); with ``same_user`` once per lane, for all k
        steps. A user's K windows of a step are drawn without replacement; one with fewer
        than K gives K with replacement, or with ``distinct`` each of its n_u windows once at
        weight K / n_u, the rest of its K slots repeating them at weight 0, so each user of a
        step weighs the same (``LaneBatch.weights``; None without ``distinct``).
        With ``disjoint_steps`` (``same_user`` only) a lane's user has its k steps' windows
        drawn as one permutation of its windows, step s taking its next K (round again where
        the user has fewer than k·K), so the steps see different windows where they can.
        Negatives are uniform over the items but the positive, or with ``negative_cdf``
        (cumulative popularity of items 1..N) drawn in proportion to popularity. With
        ``shared_negatives`` each lane's inner step draws one set for all its windows (uniform
        over 1..N, or by popularity): a draw equal to a window's positive is masked by the
        loss."""
        if disjoint_steps and not same_user:
            raise ValueError("disjoint_steps needs same_user: the steps share a user")
        lanes = len(rngs)
        per_lane = k * users_per_step
        users = np.empty(lanes * per_lane, dtype=np.int64)  # [U] lane-major
        picks = np.empty((lanes * per_lane, inner_batch), dtype=np.int64)
        draws = np.zeros((lanes * per_lane, inner_batch, num_negatives), dtype=np.int64)
        shared = np.zeros((lanes, k, num_negatives), dtype=np.int64) if shared_negatives else None
        weights = np.ones((lanes * per_lane, inner_batch), dtype=np.float32) if distinct else None
        for m, rng in enumerate(rngs):
            pool = None if lane_users is None else lane_users[m]
            if same_user:  # the lane's users, the same at each of its k steps
                chosen = np.tile(self._pick_users(rng, users_per_step, pool, user_power), k)
            else:
                chosen = self._pick_users(rng, per_lane, pool, user_power)
            lo = m * per_lane
            users[lo : lo + per_lane] = chosen
            if disjoint_steps:  # each user's k steps at once
                for p, u in enumerate(chosen[:users_per_step]):
                    at = lo + p + users_per_step * np.arange(k)  # its rows, step-major
                    picks[at], step_weights = _disjoint_picks(
                        rng, int(self.n_windows[u]), k, inner_batch, distinct
                    )
                    if weights is not None:
                        weights[at] = step_weights
            else:
                for j, u in enumerate(chosen):
                    n = int(self.n_windows[u])
                    if distinct and n < inner_batch:  # each window once; the rest weigh 0
                        picks[lo + j] = np.resize(rng.permutation(n), inner_batch)
                        weights[lo + j, :n] = inner_batch / n  # the user's weights sum to K
                        weights[lo + j, n:] = 0.0
                    else:
                        picks[lo + j] = rng.choice(n, inner_batch, replace=n < inner_batch)
            if shared is not None and negative_cdf is not None:
                u = rng.random((k, num_negatives)) * negative_cdf[-1]
                shared[m] = np.searchsorted(negative_cdf, u, side="right") + 1
            elif shared is not None:
                shared[m] = rng.integers(1, num_items + 1, (k, num_negatives))
            elif num_negatives > 0 and negative_cdf is not None:
                u = rng.random((per_lane, inner_batch, num_negatives)) * negative_cdf[-1]
                draws[lo : lo + per_lane] = np.searchsorted(negative_cdf, u, side="right") + 1
            elif num_negatives > 0:
                draws[lo : lo + per_lane] = rng.integers(
                    1, num_items, (per_lane, inner_batch, num_negatives)
                )
        starts = self.starts[users, None]  # [U, 1]
        target_pos = starts + 1 + picks  # [U, K] index into flat
        windows = self._windows(target_pos, starts)  # [U, K, L]
        targets = self.flat[target_pos]  # [U, K]
        labels = np.repeat(self.seqs.is_head[users].astype(np.float32)[:, None], inner_batch, 1)
        shape = (lanes, k, users_per_step * inner_batch)
        negatives = None
        if shared is not None:  # one set per lane and step, for all its windows
            if negative_cdf is not None:
                np.minimum(shared, len(negative_cdf), out=shared)  # u at the very top
            negatives = np.broadcast_to(shared[:, :, None], (*shape, num_negatives)).copy()
        elif num_negatives > 0 and negative_cdf is not None:
            np.minimum(draws, len(negative_cdf), out=draws)  # u at the very top
            negatives = draws.reshape(*shape, num_negatives)  # may hit the positive: masked
        elif num_negatives > 0:
            # uniform over 1..N without the positive: drawn from 1..N-1, values >= pos shifted
            negatives = negatives_from_draws(draws, targets).reshape(*shape, num_negatives)
        windows = windows.reshape(*shape, self.max_len)
        if all_positions:
            rows, slot_row, slot_pos = self._shared_rows(target_pos, lanes, k, users_per_step)
        else:
            rows = windows
            slot_row = np.broadcast_to(np.arange(shape[2]), shape).copy()
            slot_pos = np.full(shape, self.max_len - 1)
        return LaneBatch(
            rows=rows,
            slot_row=slot_row,
            slot_pos=slot_pos,
            windows=windows,
            targets=targets.reshape(shape),
            negatives=negatives,
            labels=labels.reshape(shape),
            users=users.reshape(lanes, k, users_per_step),
            weights=None if weights is None else weights.reshape(shape),
        )

    def _pick_users(
        self, rng: np.random.Generator, count: int, pool: np.ndarray | None, power: float
    ) -> np.ndarray:
        """``count`` users (rows) of ``pool`` (default: every user), drawn with replacement
        with probability n_u^power / sum(n^power): uniformly for 0, by windows for 1."""
        if power == 0:
            picked = rng.integers(0, len(self) if pool is None else len(pool), count)
            return picked if pool is None else pool[picked]
        cum = self._cumulative(power) if pool is None else np.cumsum(self._mass(power)[pool])
        # user i owns [cum[i-1], cum[i]) of [0, total): its share is n_i / total
        picked = np.searchsorted(cum, rng.random(count) * cum[-1], side="right")
        picked = np.minimum(picked, len(cum) - 1)  # r · total can round up to total
        return picked if pool is None else pool[picked]

    def _mass(self, power: float) -> np.ndarray:
        """Each user's unnormalised probability n_u^power."""
        return self.n_windows.astype(np.float64) ** power

    def _cumulative(self, power: float) -> np.ndarray:
        """Cumulative n_u^power over all users (cached per power)."""
        if power == 1:
            return self.cum_windows
        cache = self.__dict__.setdefault("_cum_cache", {})
        if power not in cache:
            cache[power] = np.cumsum(self._mass(power))
        return cache[power]

    def _windows(self, ends: np.ndarray, starts: np.ndarray) -> np.ndarray:
        return windows(self.flat, ends, starts, self.max_len)

    def _shared_rows(self, target_pos: np.ndarray, lanes: int, k: int, per_step: int):
        """Rows for an all-positions encoder: per user one row of its first L items (serving
        every target within its first L+1 items) plus one row per distinct later target, in
        the order the targets were drawn; a step's rows in user order, zero rows padding the
        steps to the same count. Vectorised over steps, users and windows (a loop over them
        took 117 ms of a 256-lane outer step's host time)."""
        L = self.max_len
        steps = target_pos.reshape(lanes * k, per_step, -1)  # [S, P, K]
        n_steps, K = len(steps), steps.shape[-1]
        users = self.users_of(steps)  # [S, P]
        user_start = self.starts[users]
        offset = steps - user_start[..., None]  # target index within the user, >= 1
        early = offset <= L  # [S, P, K]
        m = np.minimum(L, self.n_windows[users])  # [S, P] items in the user's first row
        # a later target's row belongs to its first draw within the user: first[j] = the
        # first j' with the same target (j itself when none before)
        same = steps[..., :, None] == steps[..., None, :]  # [S, P, K, K]
        first = same.argmax(-1)  # [S, P, K]
        late_row = ~early & (first == np.arange(K))  # draws that open a row of their own
        # row openers in order, per user: its first-L row, then its later targets' rows
        opens = np.concatenate([early.any(-1, keepdims=True), late_row], axis=-1)  # [S,P,1+K]
        flat_opens = opens.reshape(n_steps, -1)
        index = (np.cumsum(flat_opens, axis=1) - 1).reshape(opens.shape)  # row of each opener
        width = max(int(flat_opens.sum(1).max()), 1)
        ends = np.concatenate([(user_start + m)[..., None], steps], axis=-1)  # [S, P, 1+K]
        starts = np.broadcast_to(user_start[..., None], ends.shape)
        s_idx, p_idx, o_idx = np.nonzero(opens)
        out = np.zeros((n_steps, width, L), dtype=np.int64)
        out[s_idx, index[s_idx, p_idx, o_idx]] = self._windows(
            ends[s_idx, p_idx, o_idx], starts[s_idx, p_idx, o_idx]
        )
        late_index = np.take_along_axis(index[..., 1:], first, axis=-1)  # [S, P, K]
        slot_row = np.where(early, index[..., :1], late_index)
        slot_pos = np.where(early, L - m[..., None] + offset - 1, L - 1)
        return (
            out.reshape(lanes, k, width, L),
            slot_row.reshape(lanes, k, -1),
            slot_pos.reshape(lanes, k, -1),
        )

    def users_of(self, target_pos: np.ndarray) -> np.ndarray:
        """The user (row of this sampler) owning each [..., K] set of target positions."""
        return np.searchsorted(self.starts, target_pos[..., 0], side="right") - 1


def _disjoint_picks(
    rng: np.random.Generator, n: int, k: int, inner_batch: int, distinct: bool
) -> tuple[np.ndarray, np.ndarray]:
    """One user's windows for k steps: a permutation of its n windows, gone round as often as
    k·K needs, step s taking the next K. With ``distinct`` a step's repeated windows share
    their weight: each distinct window of the step weighs K / (its distinct windows), the
    step's weights summing to K; else all weigh 1. Returns (picks, weights), both [k, K]."""
    picks = np.resize(rng.permutation(n), k * inner_batch).reshape(k, inner_batch)
    weights = np.ones((k, inner_batch), dtype=np.float32)
    if distinct and n < inner_batch:
        for s in range(k):
            _, inverse, counts = np.unique(picks[s], return_inverse=True, return_counts=True)
            weights[s] = inner_batch / (len(counts) * counts[inverse])
    return picks, weights
