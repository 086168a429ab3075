"""The update rule: exactly torch.optim.SGD's, through its own functional API.

    θ ← SGD_update(θ, .grad)   (lr, momentum, dampening, weight_decay, nesterov, maximize)

We call ``torch.optim.sgd.sgd`` per parameter group, as ``SGD.step`` does, instead of
``SGD.step`` itself: ``SGD.step`` may be wrapped with the step hooks, which our own
``step`` already runs once.
"""

from __future__ import annotations

import torch
from torch.optim.sgd import sgd


@torch.no_grad()
def sgd_update(optimizer: torch.optim.SGD) -> None:
    """Apply torch.optim.SGD's update to every parameter that has a ``.grad``."""
    for group in optimizer.param_groups:
        params, grads, momentum_buffers = [], [], []
        has_sparse_grad = optimizer._init_group(group, params, grads, momentum_buffers)
        sgd(
            params,
            grads,
            momentum_buffers,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            fused=group["fused"],
        )
        if group["momentum"] != 0:
            for param, buffer in zip(params, momentum_buffers):
                optimizer.state[param]["momentum_buffer"] = buffer
