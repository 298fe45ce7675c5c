"""average_rows under torchrun: rank 0's table gradient touches rows 1 and 3 (row 3 twice),
rank 1's touches none; then neither touches a row. Rank 0 saves both averages.

torchrun --nproc-per-node 2 tests/scripts/row_average.py OUT
"""

import sys

import torch

from dist_tp.parallel.distributed import init_distributed, leave
from dist_tp.parallel.host import _no_rows, average_rows

comm = init_distributed()
table = torch.zeros(5, 2)
if comm.rank == 0:
    rows, values = torch.tensor([[3, 1, 3]]), torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    grad = torch.sparse_coo_tensor(rows, values, table.shape)
else:
    grad = _no_rows(table)
some, _ = average_rows(grad, comm)
none, _ = average_rows(_no_rows(table), comm)
if comm.rank == 0:
    torch.save({"some": some.to_dense(), "none": none.to_dense(), "nnz": none._nnz()}, sys.argv[1])
comm.close()
leave(0)
