"""The outer update: the lane- (and rank-) averaged pseudo-gradient g = Θ − θ_k goes into Adam
(or SGD) as if it were a gradient. All parameters travel in one flat buffer, so averaging
across processes is one collective per outer step, not one per parameter."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dist_tp.parallel.comm import LocalComm


class OuterUpdate:
    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        optimizer: str,
        lr: float,
        comm=None,
        compress: str = "none",
    ) -> None:
        self.params = params
        self.comm = comm or LocalComm()
        self.wire_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[compress]
        self.bytes_sent = 0  # pseudo-gradient bytes put on the wire by this rank
        if optimizer == "adam":
            self.opt = torch.optim.Adam(params, lr=lr)
        else:
            self.opt = torch.optim.SGD(params, lr=lr)

    def step(self, grads: list[Tensor]) -> None:
        """Average ``grads`` (aligned with ``params``) over processes, then one optimizer step."""
        flat = torch.cat([g.reshape(-1) for g in grads])  # one bucket
        if self.comm.world_size > 1:
            wire = flat if self.wire_dtype is None else flat.to(self.wire_dtype)
            self.bytes_sent += wire.numel() * wire.element_size()
            flat = self.comm.all_reduce_mean(wire).to(torch.float32)
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
