"""Per-step random streams. Both steppers (joint and TP) seed dropout, and joint training its
negatives, from (seed, epoch, step, rank) alone, so a run resumed at any step continues
exactly as an uninterrupted one."""

from __future__ import annotations

import numpy as np
import torch


def seed_step(seed: int, epoch: int, step: int, rank: int, extra: int = 0) -> list[int]:
    """Seed torch's global generator (dropout) for this step; return ``extra`` more seeds of
    the same (seed, epoch, step, rank), for the step's other generators."""
    first, *rest = np.random.SeedSequence([seed, epoch, step, rank]).generate_state(1 + extra)
    torch.manual_seed(int(first))
    return [int(s) for s in rest]
