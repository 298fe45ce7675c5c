"""Training throughput (windows/s) of each backbone with the CE loss on random data.

SASRec and GRU4Rec take a batch of users: one ``encode_all`` over a full padded sequence
gives a window per position, so a batch of 256 users yields up to 256 * L windows. Caser
encodes whole windows only, so its batch is 256 windows. Each timed step is a forward,
CE loss, backward and Adam update, which is what the training loop runs.

Usage: ``python benchmarks/model_speed.py [--num-items N] [--steps S] [--threads T]``.
"""

from __future__ import annotations

import argparse
import time

import torch

from dist_tp.config import ModelConfig
from dist_tp.models import build_model


def _step_fn(model: torch.nn.Module, seq: torch.Tensor, all_positions: bool):
    """A closure that runs one training step and returns the number of windows used."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    inputs, targets = seq[:, :-1], seq[:, 1:]  # [B, L], [B, L]

    def step() -> int:
        opt.zero_grad(set_to_none=True)
        if all_positions:
            emb = model.encode_all(inputs)  # [B, L, D]
            valid = targets != 0  # [B, L]
            emb, pos = emb[valid], targets[valid]  # [M, D], [M]
        else:
            emb, pos = model.encode(inputs), targets[:, -1]  # [B, D], [B]
        loss = model.loss(emb, pos, kind="ce")
        loss.backward()
        opt.step()
        return int(pos.shape[0])

    return step


def measure(name: str, num_items: int, batch: int, length: int, steps: int) -> float:
    """Windows per second of ``steps`` training steps after one warm-up step."""
    torch.manual_seed(0)
    cfg = ModelConfig(name=name, dim=64, max_len=length, hidden_size=64)
    model = build_model(cfg, num_items).train()
    seq = torch.randint(1, num_items + 1, (batch, length + 1))  # [B, L + 1]
    step = _step_fn(model, seq, model.supports_all_positions)
    step()
    start = time.perf_counter()
    windows = sum(step() for _ in range(steps))
    return windows / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-items", type=int, default=3706)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=50)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default="sasrec,gru4rec,caser")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.models.split(","):
        rate = measure(name, args.num_items, args.batch, args.length, args.steps)
        print(f"{name:8s} {rate:10.0f} windows/s")


if __name__ == "__main__":
    main()
