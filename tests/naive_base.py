"""The literal micro-batch loop around any base optimizer, written without regopt, for the wrapper tests.

For a batch B cut into consecutive micro-batches M_j (w_j = |M_j|/|B|), with a model returning logits::

    L_j = CE(model(M_j)),   S_j = L_j (GN) | Σ_c mean_i logits (AJ),   R_j = ‖∇_θ S_j‖² (create_graph)
    G = ∇ Σ_j w_j L_j,   P = ∇ Σ_j w_j R_j
    .grad = G + λP (G − λP in a maximize group)       or, grafted: s · G/‖G‖ with s = mean_j ‖∇L_j‖
    clip_grad_norm_(max_grad_norm), then base.step()

A parameter that no graph reaches keeps ``.grad = None``; a frozen one is not differentiated at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PENALTY_SCALARS = {
    "grad_norm": lambda loss, logits: loss,
    "average_jacobian": lambda loss, logits: logits.mean(dim=0).sum(),
}


def micro_batches(batch: tuple[torch.Tensor, torch.Tensor], size: int):
    """(w_j, x_j, y_j) for consecutive slices of ``size`` examples (the last one may be smaller)."""
    x, y = batch
    return [(x[i:i + size].shape[0] / x.shape[0], x[i:i + size], y[i:i + size]) for i in range(0, x.shape[0], size)]


def combine(grad, penalty_grad, sign: float, penalty: float):
    """G ± λP for one parameter, None where no graph reached it."""
    if penalty_grad is None or grad is None:
        return grad if penalty_grad is None else sign * penalty * penalty_grad
    return grad + sign * penalty * penalty_grad


def naive_step(base, model, batch, *, micro_batch_size: int, regularizer: str | None = None, penalty: float = 0.0,
               graft: bool = False, max_grad_norm: float | None = None) -> None:
    """One step of ``base`` on ``batch`` (see the module docstring); ``regularizer`` a key of PENALTY_SCALARS."""
    params = [p for group in base.param_groups for p in group["params"] if p.requires_grad]
    ascending = {id(p) for group in base.param_groups if group.get("maximize", False) for p in group["params"]}
    base.zero_grad(set_to_none=True)
    loss_sum, penalty_sum, micro_norms = 0.0, 0.0, []
    for w, x, y in micro_batches(batch, micro_batch_size):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        loss_sum = loss_sum + w * loss
        if graft:
            g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
            micro_norms.append(torch.sqrt(sum((t ** 2).sum() for t in g)))
        if regularizer is not None:
            v = torch.autograd.grad(PENALTY_SCALARS[regularizer](loss, logits), params, create_graph=True,
                                    allow_unused=True, materialize_grads=True)
            penalty_sum = penalty_sum + w * sum((t ** 2).sum() for t in v)
    grads = torch.autograd.grad(loss_sum, params, retain_graph=True, allow_unused=True)
    penalty_grads = [None] * len(params)
    if regularizer is not None and penalty_sum.requires_grad:
        penalty_grads = torch.autograd.grad(penalty_sum, params, allow_unused=True)
    for p, g, r in zip(params, grads, penalty_grads):
        p.grad = combine(g, r, -1.0 if id(p) in ascending else 1.0, penalty)
    if graft:
        graft_grads(params, sum(micro_norms) / len(micro_norms))
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
    base.step()


def graft_grads(params, length: torch.Tensor) -> None:
    """.grad ← length · G/‖G‖ (zero where ‖G‖ = 0)."""
    with torch.no_grad():
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params if p.grad is not None))
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * (length / norm) if norm > 0 else torch.zeros_like(p.grad)
