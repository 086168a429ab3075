"""One all-reduce per step: micro-batches spread over the ranks of a torch.distributed group.

Each rank accumulates Σ_j |M_j| g_j, Σ_j |M_j| ∇R_j and the statistics' sums over its own
micro-batches (weights not yet divided by the batch size), then a single all-reduce of
one flat buffer sums them over ranks together with the local batch sizes, and every sum
is divided by the global batch size B = Σ_ranks B_r. The result is the single-process
step on the concatenation of all ranks' batches, unequal shards included.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .engine import Accumulation


def default_process_group() -> dist.ProcessGroup | None:
    """The world group when torch.distributed is initialized with more than one rank, else None."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


def all_reduce_accumulation(acc: Accumulation, local_size: int, group: dist.ProcessGroup) -> Accumulation:
    """Sum ``acc`` (accumulated with weights |M_j|) over ``group`` and divide by the global batch size."""
    pieces: list[Tensor] = list(acc.grad) + list(acc.penalty_grad or [])
    sums = torch.cat([acc.sums, acc.sums.new_tensor([local_size])])
    flat = _flatten_dense_tensors(pieces + [sums.to(pieces[0].dtype)])
    dist.all_reduce(flat, group=group)
    reduced = _unflatten_dense_tensors(flat, pieces + [sums])
    *tensors, reduced_sums = reduced
    reduced_sums = reduced_sums.to(acc.sums.dtype)
    total = reduced_sums[-1]
    grad, penalty_grad = tensors[: len(acc.grad)], tensors[len(acc.grad):] or None
    torch._foreach_div_(tensors, total)
    # Σ w L, Σ w R and Σ w ‖g‖² are weighted by |M_j| / B; Σ_j ‖g_j‖ and k are plain sums.
    weighted = torch.cat([reduced_sums[:3] / total, reduced_sums[3:5]])
    return acc.reduced(grad, penalty_grad, weighted)
