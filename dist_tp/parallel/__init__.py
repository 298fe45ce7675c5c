"""Distribution applied from outside the algorithms: communicators (one process or
torchrun) and the optimizer host (plain, DDP, DeepSpeed ZeRO 0/1/2)."""
