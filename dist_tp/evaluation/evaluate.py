"""Full-ranking evaluation by user group: existing users and new users (validation, test).

Validation predicts each user's second-to-last item from the items before it, test its last
item. New users' validation is the one figure that measures what adapting to an unseen user
gains (an existing user's validation adapts on windows the model was trained on), so
``eval.adapt_*`` can be tuned without looking at test; model selection during training stays
on existing users' validation NDCG@10.

Users are streamed from the prepared folder in batches; each batch is encoded, every item is
scored, and hit/gain *sums* are accumulated per (split, role, group). Means are taken once at
the end, so the result does not depend on the batching (nor, later, on how users are spread
over processes: sums and counts add up, averages of averages would not).

With ``adapt_steps`` > 0 each user is first adapted on its own windows before its query
(test-time adaptation, :mod:`dist_tp.evaluation.adapt`), then scored with its own parameters.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dist_tp.core.device import module_device, to_device
from dist_tp.data.examples import Queries, eval_queries
from dist_tp.data.protocol import splitmix64
from dist_tp.data.stream import PreparedData, UserStream, to_sequences
from dist_tp.evaluation.adapt import (
    Adaptation,
    UserWindows,
    adapt_users,
    adaptation_windows,
    user_chunks,
)
from dist_tp.evaluation.metrics import (
    finalize,
    intervals,
    metric_sums,
    ranks_from_scores,
    ranks_in_chunks,
)

GROUPS = ("all", "head", "tail")
# split → (role, offset of the target from the end of the sequence)
SPLITS = {
    "validation": (("existing", 2), ("new", 2)),
    "test": (("existing", 1), ("new", 1)),
}


@torch.no_grad()
def _rank(model, q: Queries, *, exclude_history: bool, chunk: int, item_chunk: int) -> torch.Tensor:
    """Ranks of the queries' targets; the whole score matrix of a batch when the catalogue
    fits in ``item_chunk`` columns, else item chunks (:func:`ranks_in_chunks`)."""
    ranks = []
    device = module_device(model)
    for lo in range(0, len(q.targets), chunk):
        inputs = to_device(q.inputs[lo : lo + chunk], device)  # [B, L]
        history = to_device(q.history[lo : lo + chunk], device) if exclude_history else None
        targets = to_device(q.targets[lo : lo + chunk], device)  # [B]
        emb = model.encode(inputs)  # [B, D]
        if model.num_columns <= item_chunk:
            scores = model.score_all(emb)  # [B, N+1]
            ranks.append(ranks_from_scores(scores, targets, history=history).cpu())
        else:
            ranks.append(
                ranks_in_chunks(
                    lambda a, b, rows, e=emb: model.score_range(
                        e if rows is None else e[rows], a, b
                    ),
                    model.num_columns,
                    targets,
                    history=history,
                    chunk=item_chunk,
                ).cpu()
            )
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def _queries(q: Queries, mask: np.ndarray) -> Queries:
    """The queries where ``mask`` is true."""
    return Queries(q.inputs[mask], q.targets[mask], q.history[mask], q.is_head[mask], q.user[mask])


def _rank_adapted(
    model,
    q: Queries,
    win: UserWindows,
    adaptation: Adaptation,
    *,
    exclude_history: bool,
    chunk: int,
    item_chunk: int,
) -> torch.Tensor:
    """:func:`_rank` after adapting each user with a window on its windows ``win`` (the
    others unadapted), in :func:`user_chunks` of at most ``chunk`` users."""
    if not np.array_equal(win.user, q.user):
        raise ValueError("adaptation windows and queries of other users")
    ranks = torch.zeros(len(q.targets), dtype=torch.long)
    has = win.counts > 0
    if (~has).any():
        ranks[torch.from_numpy(~has)] = _rank(
            model,
            _queries(q, ~has),
            exclude_history=exclude_history,
            chunk=chunk,
            item_chunk=item_chunk,
        )
    device = module_device(model)
    for idx in user_chunks(model, win, adaptation, limit=chunk):
        users = adapt_users(model, win.take(idx), adaptation, query_inputs=q.inputs[idx])
        emb = users.encode(to_device(q.inputs[idx], device))  # [B, D] its own encoder's
        history = to_device(q.history[idx], device) if exclude_history else None
        targets = to_device(q.targets[idx], device)  # [B]
        if model.num_columns <= item_chunk:
            r = ranks_from_scores(users.score_all(emb), targets, history=history)
        else:
            r = ranks_in_chunks(
                lambda a, b, rows, u=users, e=emb: u.score_range(e, a, b, rows),
                model.num_columns,
                targets,
                history=history,
                chunk=item_chunk,
            )
        ranks[torch.from_numpy(idx)] = r.cpu()
    return ranks


def _add(acc: dict, sums: dict) -> None:
    for k, v in sums.items():
        acc[k] = acc.get(k, 0.0) + float(v)


@torch.no_grad()
def evaluation_sums(
    model,
    data: PreparedData | str,
    *,
    max_len: int,
    ks: Sequence[int],
    exclude_history: bool = True,
    batch_size: int = 512,
    item_chunk: int = 65_536,
    max_users: int = 0,
    sample_seed: int = 0,
    splits: Sequence[str] = ("validation", "test"),
    rank: int = 0,
    world_size: int = 1,
    adapt_steps: int = 0,
    adapt_lr: float = 0.1,
    adapt_params: str = "all",
    adapt_windows: int = 32,
    loss: str = "ce",
    num_negatives: int = 1,
    negatives: str = "uniform",
    adapt_seed: int = 0,
) -> dict:
    """{split: {role: {group: {"HR@k": sum, "NDCG@k": sum, "count": n}}}} for this rank's users.

    ``max_users`` > 0: a seeded sample of about that many users of each role (each kept with
    probability ``max_users / users of the role``, decided by a hash of the user and
    ``sample_seed``: the same users on any number of ranks), with the sums of squares that
    :func:`finalize_sums` turns into 95% intervals.

    ``adapt_steps`` > 0: test-time adaptation (``eval.adapt_*``; :mod:`.adapt`): each user
    takes that many SGD steps (lr ``adapt_lr``, on ``adapt_params``) on its latest
    ``adapt_windows`` windows before the query, with the training loss ``loss``
    (``num_negatives`` and ``negatives`` as ``train.*``; negatives seeded by ``adapt_seed``
    and the user), in eval mode. A model without parameters (popularity) is not adapted."""
    adaptation = None
    if adapt_steps > 0 and hasattr(model, "item_row_names"):
        adaptation = Adaptation(
            steps=adapt_steps,
            lr=adapt_lr,
            params=adapt_params,
            windows=adapt_windows,
            loss=loss,
            num_negatives=num_negatives,
            negatives=negatives,
            seed=adapt_seed,
        )
    was_training = model.training
    model.eval()
    squares = max_users > 0
    zero = {**{f"{m}@{k}": 0.0 for k in ks for m in ("HR", "NDCG")}, "count": 0.0}
    if squares:
        zero.update({f"NDCG@{k}^2": 0.0 for k in ks})
    data = PreparedData.of(data)
    if adaptation is not None and adaptation.needs_popularity and model.log_q is None:
        model.set_item_popularity(data.training_counts())  # as training sets it
    keep_share = _sample_shares(data, max_users)
    acc: dict = {
        s: {role: {g: dict(zero) for g in GROUPS} for role, _ in SPLITS[s]} for s in splits
    }
    stream = UserStream(
        data,
        rank=rank,
        world_size=world_size,
        shuffle=False,
        batch_rows=batch_size,
        columns=["user", "role", "is_head", "items"],
    )
    try:
        for batch in stream:
            seqs = to_sequences(batch)
            if keep_share is not None:
                seqs = seqs.select(_sampled(seqs, keep_share, sample_seed))
            for split in splits:
                for role, offset in SPLITS[split]:
                    members = seqs.is_new == (role == "new")
                    if not members.any():
                        continue
                    users = seqs.select(members)
                    q = eval_queries(users, max_len=max_len, offset=offset)
                    if adaptation is None:
                        ranks = _rank(
                            model,
                            q,
                            exclude_history=exclude_history,
                            chunk=batch_size,
                            item_chunk=item_chunk,
                        )
                    else:
                        win = adaptation_windows(
                            users, max_len=max_len, offset=offset, windows=adapt_windows
                        )
                        ranks = _rank_adapted(
                            model,
                            q,
                            win,
                            adaptation,
                            exclude_history=exclude_history,
                            chunk=batch_size,
                            item_chunk=item_chunk,
                        )
                    head = torch.from_numpy(q.is_head)
                    for group, mask in (("all", None), ("head", head), ("tail", ~head)):
                        r = ranks if mask is None else ranks[mask]
                        _add(acc[split][role][group], metric_sums(r, list(ks), squares))
    finally:
        model.train(was_training)
    return acc


def _sample_shares(data: PreparedData, max_users: int) -> dict | None:
    """Probability of keeping a user of each role for a sample of about ``max_users``."""
    if max_users <= 0:
        return None
    stats = data.meta["stats"]
    return {
        role: min(1.0, max_users / max(int(stats[f"{role}_users"]), 1))
        for role in ("existing", "new")
    }


def _sampled(seqs, share: dict, seed: int) -> np.ndarray:
    """Users of ``seqs`` in the sample: a hash of (user, seed) below the role's share."""
    salt = splitmix64(np.array([seed], dtype=np.uint64))[0]  # the seed, mixed: no overflow
    with np.errstate(over="ignore"):
        keys = seqs.user.astype(np.uint64) ^ salt
    unit = (splitmix64(keys) >> np.uint64(11)).astype(np.float64) / float(1 << 53)  # [0, 1)
    limit = np.where(seqs.is_new, share["new"], share["existing"])
    return unit < limit


def finalize_sums(acc: dict) -> dict:
    """Sums → means, same nesting; ``count`` kept as ``users``; from a sample (sums of
    squares present), each figure's 95% interval as ``<metric>_lo``/``<metric>_hi``."""
    out: dict = {}
    for split, roles in acc.items():
        out[split] = {}
        for role, groups in roles.items():
            out[split][role] = {}
            for group, sums in groups.items():
                count = sums.get("count", 0.0)
                values = finalize({k: v for k, v in sums.items() if k != "count"}, count)
                if any(k.endswith("^2") for k in sums):
                    values.update(intervals(sums, count))
                values["users"] = int(count)
                out[split][role][group] = values
    return out


def reduce_sums(acc: dict, comm) -> dict:
    """Add every rank's sums and counts (one collective; all ranks hold the same keys)."""
    flat = [(s, r, g, k) for s in acc for r in acc[s] for g in acc[s][r] for k in acc[s][r][g]]
    values = torch.tensor([acc[s][r][g][k] for s, r, g, k in flat], dtype=torch.float64)
    values = comm.all_reduce_sum(values)
    out: dict = {}
    for (s, r, g, k), v in zip(flat, values.tolist()):
        out.setdefault(s, {}).setdefault(r, {}).setdefault(g, {})[k] = v
    return out


def evaluate(model, data: PreparedData | str, *, comm=None, **kwargs) -> dict:
    """Means per split/role/group over all users of ``data`` (a prepared folder, opened or
    its path); with a communicator each rank
    ranks its own share of the users and the sums are added across ranks."""
    if comm is None or comm.world_size == 1:
        return finalize_sums(evaluation_sums(model, data, **kwargs))
    acc = evaluation_sums(model, data, rank=comm.rank, world_size=comm.world_size, **kwargs)
    return finalize_sums(reduce_sums(acc, comm))
