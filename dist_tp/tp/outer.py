"""The outer update: the lane- (and rank-) averaged pseudo-gradient g = Θ − θ_k goes into Adam
(or SGD) as if it were a gradient. All parameters travel in one flat buffer, so averaging
across processes is one collective per outer step, not one per parameter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_tp.comm import LocalComm


class OuterUpdate:
    def __init__(self, params: list[nn.Parameter], *, optimizer: str, lr: float, comm=None) -> None:
        self.params = params
        self.comm = comm or LocalComm()
        if optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=lr)
        else:
            self.opt = torch.optim.SGD(params, lr=lr)

    def step(self, grads: list[Tensor]) -> None:
        """Average ``grads`` (aligned with ``params``) over processes, then one optimizer step."""
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket
        flat = self.comm.all_reduce_mean(flat)
        offset = 0
        for p in self.params:
            p.grad = flat[offset : offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def state_dict(self) -> dict:
        return self.opt.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.opt.load_state_dict(state)
