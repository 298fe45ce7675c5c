"""Run a few TP outer steps under torchrun and save rank 0's parameters (for the W×M test).

torchrun --nproc-per-node W tests/scripts/tp_steps.py PREPARED OUT LANES STEPS
"""

import sys

import torch

from dist_tp.algorithms.tp.trainer import TPStepper
from dist_tp.config import load_config
from dist_tp.data.stream import open_prepared
from dist_tp.models import build_model
from dist_tp.parallel.distributed import init_distributed, leave

path, out, lanes, steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
extra = [a for a in sys.argv[5:] if not a.startswith("perturb=")]
perturb = "perturb=1" in sys.argv[5:]
comm = init_distributed()
cfg = load_config(
    "configs/tiny.yaml",
    [
        f"data.path={path}",
        "model.dropout=0.0",
        "train.loss=bce",
        "train.method=tp",
        f"tp.lanes={lanes}",
        "tp.inner_batch=8",
        *extra,
    ],
)
torch.manual_seed(comm.rank)  # different on purpose: rank 0's parameters must win
model = build_model(cfg.model, open_prepared(path).num_items)
stepper = TPStepper(model, cfg, comm=comm)
for step in range(steps):
    stepper.outer_step(0, step)
    if perturb and step == 0 and comm.rank == 1:
        with torch.no_grad():
            next(model.parameters())[1, 0] += 1e-3
params = {n: p.detach() for n, p in stepper.modules()["model"].named_parameters()}
params.update({f"disc.{n}": p.detach() for n, p in stepper.disc.named_parameters()})
gathered = [comm.all_reduce_sum(torch.cat([p.reshape(-1) for p in params.values()]))]
if comm.rank == 0:
    torch.save({"params": params, "sum_over_ranks": gathered[0]}, out)
comm.close()
leave(0)
