"""One joint epoch under torchrun (DDP, or DeepSpeed through overrides); rank 0 saves its
parameters, their sum over ranks, each rank's number of real mini-batches and the parameters
DDP leaves to the host (the row-wise item tables).

torchrun --nproc-per-node W tests/scripts/joint_steps.py PREPARED OUT [key=value ...]
"""

import sys

import torch

from dist_tp.algorithms.joint import JointStepper
from dist_tp.config import load_config
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model
from dist_tp.parallel.distributed import init_distributed, leave

path, out = sys.argv[1], sys.argv[2]
comm = init_distributed()
cfg = load_config(
    "configs/tiny.yaml", [f"data.path={path}", "model.dropout=0.0", "train.seed=3", *sys.argv[3:]]
)
torch.manual_seed(comm.rank)  # different on purpose: rank 0's parameters must win
model = build_model(cfg.model, open_prepared(path).num_items)
stepper = JointStepper(model, cfg, comm)
record = stepper.run_epoch(0)
params = {n: p.detach().clone() for n, p in model.named_parameters()}
flat = torch.cat([p.reshape(-1) for p in params.values()])
batches = sum(1 for _ in stepper.epoch_batches(0))
per_rank = torch.zeros(comm.world_size, dtype=torch.int64)
per_rank[comm.rank] = batches
per_rank = comm.all_reduce_sum(per_rank)
summed = comm.all_reduce_sum(flat)
ignored = sorted(getattr(getattr(stepper.opt, "net", None), "parameters_to_ignore", ()))
if comm.rank == 0:
    saved = {"params": params, "sum_over_ranks": summed, "batches": per_rank, "record": record}
    torch.save({**saved, "ddp_ignores": ignored, "tables": model.item_table_names()}, out)
comm.close()
leave(0)
