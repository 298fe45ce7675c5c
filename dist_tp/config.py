"""Typed run configuration: nested dataclasses filled from YAML plus dotted ``key=value`` overrides.

Unknown keys and values of the wrong type are errors that name the key; YAML is read with
``yaml.safe_load`` and override values are parsed as YAML scalars, never ``eval``-ed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, with the offending key or file in the message."""


def _check_at_least(section: str, bound: float, strict: bool = False, **values: float) -> None:
    """Each ``section.key`` must be >= ``bound`` (> with ``strict``); the error names it."""
    for key, value in values.items():
        if value < bound or (strict and value == bound):
            relation = ">" if strict else ">="
            raise ConfigError(f"{section}.{key} must be {relation} {bound:g}, got {value!r}")


@dataclass
class DataConfig:
    path: str = ""
    """Prepared data folder (output of ``dist-tp prepare``), local path or fsspec URL."""


@dataclass
class ModelConfig:
    name: str = "sasrec"
    """Backbone: one of ``sasrec``, ``gru4rec``, ``caser``, ``pop``."""
    dim: int = 64
    """Item embedding and sequence embedding size D."""
    max_len: int = 50
    """Window length L: the L most recent items form a window."""
    dropout: float = 0.2
    num_layers: int = 2
    """SASRec: self-attention blocks; GRU4Rec: GRU layers."""
    num_heads: int = 1
    """SASRec attention heads."""
    hidden_size: int = 64
    """GRU4Rec hidden size (projected to ``dim`` when different)."""
    caser_nh: int = 16
    """Caser: horizontal filters per height."""
    caser_nv: int = 4
    """Caser: vertical filters."""
    output_table: bool = False
    """Score with a separate output item table + bias instead of the input table."""

    def __post_init__(self) -> None:
        if self.dim <= 0 or self.max_len <= 0:
            raise ConfigError("model.dim and model.max_len must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError("model.dropout must be in [0, 1)")
        _check_at_least(
            "model",
            1,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            hidden_size=self.hidden_size,
            caser_nh=self.caser_nh,
            caser_nv=self.caser_nv,
        )


COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")  # train.compile
LR_SCALING = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # train.lr_scaling: the exponent


@dataclass
class TrainConfig:
    method: str = "joint"
    """``joint`` (the baseline) or ``tp`` (inner/outer training with the discriminator)."""
    loss: str = "ce"
    """``ce`` (softmax over all items), ``bce`` (sampled negatives, the paper's) or
    ``sampled_softmax`` (softmax over the positive and sampled negatives: for large
    catalogues, where ``ce``'s logits do not fit)."""
    num_negatives: int = 1
    """Negatives per positive for ``bce`` and ``sampled_softmax`` (not ``in_batch``)."""
    negatives: str = "uniform"
    """How negatives are drawn: ``uniform``; ``popularity`` (in proportion to training
    counts, logits corrected by -log q: ``sampled_softmax`` only); ``in_batch`` (the other
    positives of the mini-batch, logQ-corrected: ``sampled_softmax`` only)."""
    shared_negatives: bool = False
    """``sampled_softmax`` with ``uniform`` or ``popularity`` negatives: one draw of
    ``num_negatives`` items for the whole mini-batch, scored by one matrix product (TP: one
    draw for each lane's inner step, given to each of its windows), instead of
    ``num_negatives`` per window. A negative equal to a
    window's positive is left out of that window's softmax. Far fewer item rows touched per
    step: what keeps a million-item catalogue as fast as a small one."""
    item_updates: str = "auto"
    """How the optimizer updates the item tables: ``dense`` (Adam over every row at every
    step), ``sparse`` (sparse gradients and a lazy row-wise Adam over the rows the step
    touched; their moments alone decay: TorchRec's row-wise optimizers) or ``auto``: sparse
    when the loss is sampled (``bce``, ``sampled_softmax``) and the catalogue has at least
    50,000 items, dense otherwise. ``sparse`` needs a sampled loss and ``engine: plain``."""
    epochs: int = 20
    batch_size: int = 256
    """Windows (next-item examples) per joint mini-batch, about: rows of a pool of users are
    shuffled and packed until they hold this many windows, so a mini-batch mixes users. TP
    ignores it (an outer step sees ``lanes × k × users_per_step × inner_batch`` windows)."""
    row_stride: int = 1
    """Joint training of all-positions encoders (SASRec, GRU4Rec): how a user's windows past
    its first L are packed into rows. 1: each has a row of its own, its full L-item window
    (the paper's examples; on the ML-1M part 1.4 windows per row, since most users are long).
    S > 1: S consecutive ones share a row of L items ending at the last of them, so each
    sees between L − S + 1 and L items before it, and there are about S times fewer rows to
    encode (``benchmarks/RESULTS.md``, "Large steps"). Caser (one window per row) and TP
    ignore it."""
    lr: float = 1e-3
    lr_scaling: str = "none"
    """How the learning rate follows the windows B of one optimizer step over all ranks (joint:
    ``batch_size`` × ranks; TP: lanes × k × ``users_per_step`` × ``inner_batch`` × ranks):
    ``none`` (``lr`` as given), ``sqrt`` (``lr`` × (B / ``lr_batch``)^½) or ``linear``
    (``lr`` × B / ``lr_batch``). For large GPU batches: with ``sqrt``, SASRec on Amazon Music
    at 2,048 windows per step scored as at 256, in about as many epochs
    (``benchmarks/RESULTS.md``, "Large steps")."""
    lr_batch: int = 256
    """The windows per step that ``lr`` was tuned for (``lr_scaling``)."""
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables."""
    epoch_steps: int = 0
    """Cap an epoch at this many steps (joint: mini-batches; TP: outer steps), 0: a whole
    pass. For logs where one pass takes hours: validation, checkpoints, early stopping and the
    curves come every this many steps, each epoch from a fresh shuffle of the users."""
    patience: int = 3
    """Stop after this many evaluations without a better validation NDCG@10 (and no
    ``lr_decays`` left)."""
    lr_decays: int = 0
    """How many times validation running out of ``patience`` lowers the learning rate instead
    of stopping the run: the best weights so far come back, the optimizer starts afresh (TP:
    the outer one, the discriminator's parameters included) at its rate × ``lr_decay``, and
    ``patience`` counts again. 0: a constant rate, the paper's. One decay at 0.1, with the
    patience that would stop the constant-rate run and ``epochs`` raised for the lower rate,
    scores as the ladder's rungs 1 and 13 together (a second run from the best weights at a
    tenth of the rate); a shorter patience decays at the first dip of a noisy validation
    curve (``benchmarks/RESULTS.md``, rung 14). Plain engine only."""
    lr_decay: float = 0.1
    """The factor on the learning rate at each of the ``lr_decays``, in (0, 1)."""
    eval_every: int = 1
    """Validate every this many epochs."""
    seed: int = 0
    threads: int = 0
    """torch intra-op threads; 0 keeps torch's default."""
    prefetch: int = 2
    """Joint training: mini-batches made ahead on a background thread (rows, shuffles and, on a
    GPU, pinned host memory for an asynchronous copy) while the device runs the step; TP: the
    next outer step's lane batch drawn on a thread (users held whole, not in ``tp.pool_users``
    pools); 0 makes each one in the training loop. The batches and results are the same
    either way."""
    checkpoint_every: int = 0
    """Also write ``last.pt`` every this many steps (TP: outer steps; joint: mini-batches),
    from which ``--resume`` continues mid-epoch exactly; 0: at epoch ends only."""
    progress: bool = True
    device: str = "auto"
    """``auto`` (this rank's GPU when CUDA is present, else the CPU), ``cpu``, ``cuda`` or
    ``cuda:N``."""
    balance: str = "window"
    """Joint training's loss weighting: ``window`` (each window counts once: the paper's
    backbones), ``user`` (each user's windows share one unit of weight, the mean over users
    of each user's mean loss, as TP's uniform choice of users weighs them) or ``power``
    (user u's windows together weigh in proportion to n_u^γ, γ = ``balance_power``: 0 is
    ``user``, 1 is ``window``; TP's ``tp.user_sampling=power`` with the same γ). Weights are
    normalised within each pool of streamed users to average 1 per window."""
    balance_power: float = 0.5
    """γ of ``balance: power``."""
    precision: str = "fp32"
    """``fp32``, or ``bf16``: joint training's forward and loss under bfloat16 autocast
    (parameters, gradients and Adam stay float32; evaluation always ranks in float32, since
    bf16 scores would tie). Meant for GPUs; plain engine, joint method only (TP inner loops
    run in float32; DeepSpeed takes bf16 from its JSON)."""
    compile: str = "none"
    """Joint training's forward and loss through ``torch.compile`` (dynamic shapes): ``none``,
    or its mode: ``default``, ``reduce-overhead`` or ``max-autotune``. The first steps wait
    for the compiler, and new shapes may compile again. Measured slower where measured: SASRec
    0.49x on a CPU, 0.20x of the eager rate at 16,384-window steps on an H200
    (``benchmarks/RESULTS.md``, "Large steps", "Large steps measured on one H200").
    Plain engine, joint method only."""
    engine: str = "plain"
    """``plain`` (torch optimizers; DDP for joint training under torchrun) or ``deepspeed``
    (the optimizer runs inside a DeepSpeed engine, ZeRO 0-2; needs torchrun)."""
    deepspeed: str = ""
    """``engine: deepspeed``: the DeepSpeed JSON (e.g. ``configs/deepspeed/zero1.json``) with
    the ZeRO stage and engine options. Optimizer, learning rate, batch sizes and gradient
    clipping come from this config and must not be in the JSON."""
    dist_timeout: int = 600
    """Under torchrun: seconds a collective waits for the other ranks before the run fails
    (a rank that died or hangs); raise it for very long evaluations or checkpoint writes."""
    init_from: str = ""
    """Start the model from another run's best weights: a run folder (its ``checkpoint.pt``)
    or a checkpoint file, trained with the same ``model`` settings on the same prepared data
    (checked). Only the model's weights are taken; the optimizer, TP's discriminator and the
    history start fresh. E.g. joint training, then TP from its checkpoint."""

    def __post_init__(self) -> None:
        if self.loss not in ("ce", "bce", "sampled_softmax"):
            raise ConfigError(
                f"train.loss must be 'ce', 'bce' or 'sampled_softmax', got {self.loss!r}"
            )
        if self.negatives not in ("uniform", "popularity", "in_batch"):
            raise ConfigError(
                "train.negatives must be 'uniform', 'popularity' or 'in_batch', got "
                f"{self.negatives!r}"
            )
        if self.negatives != "uniform" and self.loss != "sampled_softmax":
            raise ConfigError(
                f"train.negatives={self.negatives} needs train.loss=sampled_softmax "
                f"(train.loss is {self.loss})"
            )
        if self.item_updates not in ("auto", "dense", "sparse"):
            raise ConfigError(
                f"train.item_updates must be auto, dense or sparse, got {self.item_updates!r}"
            )
        if self.item_updates == "sparse" and self.loss == "ce":
            raise ConfigError(
                "train.item_updates=sparse needs a sampled loss (bce or sampled_softmax): "
                "train.loss=ce touches every item row at every step"
            )
        if self.item_updates == "sparse" and self.engine == "deepspeed":
            raise ConfigError("train.item_updates=sparse needs train.engine=plain")
        if self.shared_negatives and (
            self.loss != "sampled_softmax" or self.negatives == "in_batch"
        ):
            raise ConfigError(
                "train.shared_negatives needs train.loss=sampled_softmax with "
                f"train.negatives=uniform or popularity (got loss={self.loss}, "
                f"negatives={self.negatives})"
            )
        if self.method not in ("joint", "tp"):
            raise ConfigError(f"train.method must be 'joint' or 'tp', got {self.method!r}")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?)$", self.device):
            raise ConfigError(
                f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}"
            )
        if self.engine not in ("plain", "deepspeed"):
            raise ConfigError(f"train.engine must be 'plain' or 'deepspeed', got {self.engine!r}")
        _check_at_least(
            "train",
            1,
            num_negatives=self.num_negatives,
            epochs=self.epochs,
            batch_size=self.batch_size,
            patience=self.patience,
            eval_every=self.eval_every,
            dist_timeout=self.dist_timeout,
            lr_batch=self.lr_batch,
            row_stride=self.row_stride,
        )
        if self.lr_scaling not in LR_SCALING:
            raise ConfigError(
                f"train.lr_scaling must be none, sqrt or linear, got {self.lr_scaling!r}"
            )
        _check_at_least("train", 0, strict=True, lr=self.lr)
        _check_at_least(
            "train",
            0,
            weight_decay=self.weight_decay,
            grad_clip=self.grad_clip,
            threads=self.threads,
            prefetch=self.prefetch,
            checkpoint_every=self.checkpoint_every,
            epoch_steps=self.epoch_steps,
            lr_decays=self.lr_decays,
        )
        if self.balance not in ("window", "user", "power"):
            raise ConfigError(f"train.balance must be window, user or power, got {self.balance!r}")
        if self.balance != "window" and self.method != "joint":
            raise ConfigError(
                f"train.balance={self.balance} is for joint training; TP weighs users by "
                "tp.user_sampling"
            )
        if self.precision not in ("fp32", "bf16"):
            raise ConfigError(f"train.precision must be fp32 or bf16, got {self.precision!r}")
        if self.precision == "bf16" and self.method != "joint":
            raise ConfigError(
                "train.precision=bf16 is for joint training; TP inner loops run in float32"
            )
        if self.precision == "bf16" and self.engine == "deepspeed":
            raise ConfigError(
                "train.precision=bf16 with train.engine=deepspeed: enable bf16 in the "
                "DeepSpeed JSON instead"
            )
        if self.compile not in COMPILE_MODES:
            raise ConfigError(
                "train.compile must be none, default, reduce-overhead or max-autotune, got "
                f"{self.compile!r}"
            )
        if self.compile != "none" and (self.method != "joint" or self.engine != "plain"):
            raise ConfigError(
                f"train.compile={self.compile} is for joint training on the plain engine "
                f"(train.method={self.method}, train.engine={self.engine})"
            )
        if not 0 < self.lr_decay < 1:
            raise ConfigError(f"train.lr_decay must be in (0, 1), got {self.lr_decay}")
        if self.lr_decays and self.engine != "plain":
            raise ConfigError(
                "train.lr_decays needs train.engine=plain (the DeepSpeed engine keeps its "
                "optimizer's state to itself)"
            )
        if self.engine == "deepspeed" and not self.deepspeed:
            raise ConfigError(
                "train.engine=deepspeed needs train.deepspeed=FILE.json "
                "(e.g. configs/deepspeed/zero1.json)"
            )


@dataclass
class TPConfig:
    """Transferrable parameters (``train.method: tp``): k inner SGD steps per lane, each on
    one user's mini-batch, then an outer step on the pseudo-gradient Θ − θ_k."""

    k: int = 2
    """Inner SGD steps per outer step (k = 1 degenerates to joint training)."""
    inner_lr: float = 0.1
    """α, the inner SGD learning rate."""
    outer_lr: float | None = None
    """β, the outer learning rate (Adam by default), which is always ``train.lr``: TP's
    outer optimizer takes the Adam steps joint training's takes, at the same rate. Left
    empty it follows ``train.lr``; given, it must equal ``train.lr`` (an error otherwise)."""
    outer_optimizer: str = "adam"
    """``adam`` (the paper's experiments) or ``sgd`` (Θ ← Θ − β g)."""
    inner_batch: int = 32
    """K, windows per user per inner step (sampled with replacement when the user has fewer,
    unless ``distinct_windows``)."""
    distinct_windows: bool = False
    """false (the paper): a user with fewer than K windows has K drawn with replacement, so
    its few windows repeat. true: min(K, n_u) distinct windows, the step's loss their mean
    (each user of a step weighs the same), so an epoch sees as many distinct windows as
    joint training's."""
    same_user: bool = False
    """false (the paper): every inner step draws new users. true: a lane keeps its users
    for all k inner steps (Reptile on user tasks; with ``outer_gradient: query``, first-order
    MAML), each step on a fresh draw of that user's windows: the curvature (alignment) part
    of Θ − θ_k is then within one user's data, which is meant to make the parameters adapt
    quickly to a user (the ladder in ``benchmarks/RESULTS.md`` did not find that it does)."""
    outer_gradient: str = "path"
    """What goes into the outer optimizer. ``path`` (the paper, Reptile): Θ − θ_k, the
    whole inner path. ``query`` (first-order MAML on user tasks; needs ``same_user`` and
    k ≥ 2): θ_{k−1} − θ_k alone, α times the gradient of the last inner step (the query)
    taken where k − 1 steps on the same user's other windows (the support) left the
    parameters. The parameters are then trained for what they score after k − 1 steps of
    adaptation to a user, which is what ``eval.adapt_steps`` = k − 1 at ``eval.adapt_lr`` = α
    does at test time. The user's windows of the k steps are drawn as one permutation, so
    query and support windows differ where the user has k·K windows (a shorter user's steps
    go round its windows again)."""
    normalize: bool = False
    """Divide the pseudo-gradient Θ − θ_k by α before the outer optimizer, so it is on the
    scale of a gradient (the sum of the k inner gradients) whatever α is: Adam's ε and
    ``train.grad_clip``-like thresholds then mean what they mean for joint training."""
    users_per_step: int = 1
    """Users per inner step (each contributes ``inner_batch`` windows); 1 = the paper."""
    user_sampling: str = "uniform"
    """How an inner step picks its user: ``uniform`` (the paper: every user equally often,
    so tail users weigh as much as head users), ``windows`` (in proportion to the user's
    training windows, the weight joint training gives them) or ``power`` (in proportion to
    n_u^γ, γ = ``user_power``: partial re-weighting between the two)."""
    user_power: float = 0.5
    """γ of ``user_sampling: power`` (0 = uniform, 1 = windows)."""
    lanes: int = 16
    """M independent inner loops from the same Θ, their pseudo-gradients averaged."""
    buckets: str = "auto"
    """How an inner step of lanes of different shapes (all-positions encoders: rows and
    columns per lane) is run: ``cost``, lanes grouped into a few vmapped calls of similar
    shape, by a cost model fitted on one CPU thread; ``one``, one call on the step's largest
    shape, the lanes padded to it; ``auto``, ``cost`` on a CPU and ``one`` on a GPU, where each
    call costs 15–20 ms of host time (``benchmarks/tp_host.py``) and a 256-lane SASRec-TP step
    of 8 calls per inner step kept an H200's kernels busy 5% of the time
    (``benchmarks/RESULTS.md``, "Large steps measured on one H200")."""
    lambda_adv: float = 0.1
    """λ, weight of the adversarial term (gradient reversal into the encoder)."""
    discriminator: bool = True
    """Train the head/tail discriminator (with λ = 0 it only monitors)."""
    disc_hidden: list[int] = field(default_factory=lambda: [64])
    """Hidden layer sizes of the discriminator MLP."""
    compress: str = "none"
    """Pseudo-gradient dtype on the wire between ranks: ``none`` (float32), ``bf16``, ``fp16``."""
    check_replicas_every: int = 0
    """Debug: every N outer steps compare a parameter checksum across ranks; fail on drift."""
    pool_users: int = 0
    """0: each rank holds its whole share of the existing users. P: each rank holds a pool of
    about P users read from its own row groups, refilled as the epoch goes on, so memory
    follows P, not the dataset (:mod:`dist_tp.algorithms.tp.pool`)."""

    def __post_init__(self) -> None:
        if self.k < 1 or self.lanes < 1 or self.inner_batch < 1 or self.users_per_step < 1:
            raise ConfigError("tp.k, tp.lanes, tp.inner_batch and tp.users_per_step must be >= 1")
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ConfigError(
                f"tp.outer_optimizer must be 'adam' or 'sgd', got {self.outer_optimizer!r}"
            )
        if self.lambda_adv < 0:
            raise ConfigError("tp.lambda_adv must be >= 0")
        _check_at_least("tp", 0, strict=True, inner_lr=self.inner_lr)
        if self.outer_lr is not None:
            _check_at_least("tp", 0, strict=True, outer_lr=self.outer_lr)
        _check_at_least(
            "tp", 0, check_replicas_every=self.check_replicas_every, pool_users=self.pool_users
        )
        _check_at_least("tp", 1, **{f"disc_hidden[{i}]": h for i, h in enumerate(self.disc_hidden)})
        if self.compress not in ("none", "bf16", "fp16"):
            raise ConfigError(f"tp.compress must be none, bf16 or fp16, got {self.compress!r}")
        if self.buckets not in ("auto", "cost", "one"):
            raise ConfigError(f"tp.buckets must be auto, cost or one, got {self.buckets!r}")
        if self.outer_gradient not in ("path", "query"):
            raise ConfigError(
                f"tp.outer_gradient must be 'path' or 'query', got {self.outer_gradient!r}"
            )
        if self.outer_gradient == "query" and (not self.same_user or self.k < 2):
            raise ConfigError(
                "tp.outer_gradient=query needs tp.same_user=true and tp.k >= 2 (k - 1 support "
                f"steps on a user, then its query step), got same_user={self.same_user}, "
                f"k={self.k}"
            )
        if self.user_sampling not in ("uniform", "windows", "power"):
            raise ConfigError(
                "tp.user_sampling must be 'uniform', 'windows' or 'power', got "
                f"{self.user_sampling!r}"
            )

    @property
    def power(self) -> float:
        """γ of the users' draw: probability in proportion to n_u^γ."""
        return {"uniform": 0.0, "windows": 1.0}.get(self.user_sampling, self.user_power)


@dataclass
class EvalConfig:
    ks: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 50])
    exclude_history: bool = True
    """Mask the items already in the user's input (never the target)."""
    batch_size: int = 512
    """Users ranked at once during evaluation."""
    item_chunk: int = 65_536
    """Items scored at once: a larger catalogue is ranked in chunks of this many items,
    counting (never holding) the scores, so memory is batch_size x item_chunk floats."""
    max_users: int = 0
    """0: evaluate every user. N: a seeded sample of about N users of each role (existing,
    new), each figure with its 95% interval (``HR@10_lo``, ``HR@10_hi``) in metrics.json and
    the sample's size and seed under ``sample``."""
    sample_seed: int = 0
    """Which users the ``max_users`` sample holds."""
    adapt_steps: int = 0
    """Test-time adaptation: before a user is scored, this many plain SGD steps on the
    user's own windows available at that point (a new user's prefix; an existing user's
    training windows, and for the test also the validation one), from the trained
    parameters, one copy per user (vectorised over users). 0: no adaptation."""
    adapt_lr: float = 0.1
    """The adaptation steps' SGD learning rate (tune it on validation, never on test)."""
    adapt_params: str = "all"
    """What adaptation changes: ``all`` (every parameter, the item rows the user's windows
    touch included) or ``last`` (the encoder's last block and the norms, plus the item rows
    of the user's own items)."""
    adapt_windows: int = 32
    """The most recent windows of the user each adaptation step trains on."""

    def __post_init__(self) -> None:
        if not self.ks:
            raise ConfigError("eval.ks must list at least one N")
        _check_at_least("eval", 0, adapt_steps=self.adapt_steps)
        _check_at_least("eval", 1, adapt_windows=self.adapt_windows)
        _check_at_least("eval", 0, strict=True, adapt_lr=self.adapt_lr)
        if self.adapt_params not in ("all", "last"):
            raise ConfigError(f"eval.adapt_params must be all or last, got {self.adapt_params!r}")
        _check_at_least("eval", 1, batch_size=self.batch_size, item_chunk=self.item_chunk)
        _check_at_least("eval", 0, max_users=self.max_users)
        _check_at_least("eval", 1, **{f"ks[{i}]": k for i, k in enumerate(self.ks)})


@dataclass
class TrackConfig:
    """MLflow tracking of ``dist-tp train`` (rank 0 only); see ``dist_tp/tracking/``."""

    enabled: bool = True
    uri: str = ""
    """Tracking URI; empty: ``MLFLOW_TRACKING_URI``, else MLflow's default (``sqlite:///mlflow.db``
    in the working folder)."""
    experiment: str = "dist-tp"
    run_name: str = ""
    """Empty: the run folder's name."""
    log_every: int = 50
    """Log the mean step loss every this many steps (TP: outer steps; joint: mini-batches);
    0: per epoch only."""
    log_checkpoint: bool = True
    """Upload the best checkpoint as an artifact."""

    def __post_init__(self) -> None:
        if self.log_every < 0:
            raise ConfigError("track.log_every must be >= 0")
        if not self.experiment:
            raise ConfigError("track.experiment must not be empty")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tp: TPConfig = field(default_factory=TPConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    def __post_init__(self) -> None:
        outer = self.tp.outer_lr
        if outer is not None and outer != self.train.lr:
            raise ConfigError(
                f"tp.outer_lr ({outer:g}) differs from train.lr ({self.train.lr:g}): TP's outer "
                "learning rate is train.lr (set train.lr, and leave tp.outer_lr out)"
            )

        if self.train.row_stride > self.model.max_len:
            raise ConfigError(
                f"train.row_stride ({self.train.row_stride}) must be at most model.max_len "
                f"({self.model.max_len}): a row holds L items"
            )

    def step_windows(self, method: str | None = None) -> int:
        """Windows one rank's optimizer step sees under ``method`` (default ``train.method``):
        joint ``batch_size`` (about), TP lanes × k × users_per_step × inner_batch."""
        tp = self.tp
        if (method or self.train.method) == "tp":
            return tp.lanes * tp.k * tp.users_per_step * tp.inner_batch
        return self.train.batch_size

    def effective_lr(self, world_size: int = 1, method: str | None = None) -> float:
        """``train.lr`` after ``train.lr_scaling`` for the windows of a step over all ranks."""
        train = self.train
        ratio = self.step_windows(method) * world_size / train.lr_batch
        return train.lr * ratio ** LR_SCALING[train.lr_scaling]


EXPONENT_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
"""A float in exponent notation, as a float key accepts it from a string."""


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotated type ``tp``; ints widen to floats, nothing else."""
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        (item_tp,) = typing.get_args(tp)[:1]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and EXPONENT_FLOAT.match(value):
        return float(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp in (str, float) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys are errors naming the key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r} (known: {', '.join(sorted(names))})")
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value or {}, prefix=f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, dotted)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{prefix or 'config'}: {exc}") from exc


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` strings to a nested dict (values parsed as YAML scalars)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        parts = key.strip().split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {part!r} is not a section")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {key!r}: cannot parse {text!r}: {exc}") from exc
        node[parts[-1]] = value
    return raw


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    raw = apply_overrides(raw, list(overrides))
    return from_dict(Config, raw)
