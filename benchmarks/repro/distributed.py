"""torchrun support: the process group, this rank's device, and the few collectives the driver needs.

Under ``torchrun`` every rank draws the same global batch and trains on its own contiguous shard
(regopt's optimizers all-reduce over the world group; SB averages its gradient with one
all-reduce), evaluation is sharded (after averaging BatchNorm statistics over the ranks, see
evaluation.py), and only rank 0 writes files and shows progress.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of several (torchrun sets WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup_distributed(device: str) -> tuple[Dist, torch.device]:
    """Initialize torch.distributed under torchrun (WORLD_SIZE > 1); pick this rank's device."""
    if launched_by_torchrun() and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    info = Dist(dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else Dist()
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return info, torch.device("cuda", local)
    return info, torch.device(device)


def broadcast_object(obj: Any, ctx: Dist) -> Any:
    """Rank 0's ``obj`` on every rank (so that decisions taken on rank 0 — a time stamp, a budget — agree)."""
    if ctx.world_size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sum_across(values: Tensor, ctx: Dist) -> Tensor:
    if ctx.world_size > 1:
        dist.all_reduce(values)
    return values


def average_gradients(params: list[Tensor], loss: Tensor, ctx: Dist) -> Tensor:
    """All-reduce-average the parameters' .grad (one flat buffer) and return the rank-averaged loss (SB's step)."""
    if ctx.world_size == 1:
        return loss
    grads = [p.grad for p in params]
    flat = torch._utils._flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    flat /= ctx.world_size
    for g, f in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
        g.copy_(f)
    loss = loss.detach().clone()
    dist.all_reduce(loss)
    return loss / ctx.world_size
