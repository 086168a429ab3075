"""The literal, slow, obviously-correct step: the specification that the fast paths are tested against.

This is the paper's loop written out, on top of a plain ``torch.optim.SGD`` (or any torch.optim
optimizer, whose ``step()`` then takes the update). It depends on torch only and shares no code
with the rest of regopt on purpose.
For each micro-batch M_j (consecutive slices of ``micro_batch_size``, w_j = |M_j|/|B|)::

    L_j, logits[, mask] = closure(M_j)              # one forward pass
    S_j = L_j | CE(logits, ŷ) | Σ_c mean logits | uᵀ mean logits
    v_j = autograd.grad(S_j, θ, create_graph=True)
    R_j = Σ_p ‖v_j[p]‖²
    (w_j · (L_j ± λ R_j)).backward()                # accumulates into .grad

where logits [n, …, C] count each position (each token of [n, T, C]) as an example: the means and CE run
over the rows of logits.reshape(-1, C) that ``mask`` [n, …] keeps (all of them without a mask; S_j = 0 when
none is kept), and FT draws a label for every row, kept or not. All this after ``sgd.zero_grad()``,
then ``sgd.step()``: a parameter that no backward reaches keeps
``.grad = None`` and is not updated. The regularizer is always minimized: + for the groups
that minimize, − for those with ``maximize=True`` (SGD then ascends L − λR). Grafting instead
rescales the accumulated G = Σ_j w_j g_j to length s and steps. Random draws happen in the
same order as in the fast path: per micro-batch, after its forward pass, from ``generator``.

With ``penalty_micro_batches`` m < k, S = the first m of ``torch.randperm(k, generator=generator)``
(drawn before the loop; a CPU generator or None) and only j ∈ S get the penalty, weighted by k/m:
(w_j · (L_j ± (k/m) λ R_j)).backward(); j ∉ S still makes its draw (FT labels, UJ direction) and
backpropagates w_j · L_j alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

REGULARIZERS = ("none", "grad_norm", "fisher_trace", "average_jacobian", "unit_jacobian")


@dataclass
class ReferenceStats:
    loss: float
    penalty: float
    micro_grad_sq_norm: float
    grad_norm: float
    num_micro_batches: int
    losses: list[float]           # L_j
    penalties: list[float]        # R_j (0 for a micro-batch without the penalty)
    micro_grad_sq_norms: list[float]  # ‖g_j‖²


def _micro_batches(batch, micro_batch_size):
    if isinstance(batch, torch.Tensor):
        size = batch.shape[0]
        return size, [((batch[i:i + micro_batch_size],), {}) for i in range(0, size, micro_batch_size)]
    if isinstance(batch, dict):
        size = next(iter(batch.values())).shape[0]
        return size, [((), {k: v[i:i + micro_batch_size] for k, v in batch.items()})
                      for i in range(0, size, micro_batch_size)]
    size = batch[0].shape[0]
    return size, [(tuple(v[i:i + micro_batch_size] for v in batch), {}) for i in range(0, size, micro_batch_size)]


def _penalty_draw(regularizer, logits, generator):
    """The micro-batch's random draw: FT's labels ŷ ~ softmax(logits), one per row of logits.reshape(-1, C),
    UJ's u = z/‖z‖ (None for the others)."""
    if regularizer == "fisher_trace":
        probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), dim=1)
        probs = torch.where(probs.isfinite().all(dim=1, keepdim=True), probs, 1.0 / probs.shape[1])
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # = penalties.sample_categorical's draw
    if regularizer == "unit_jacobian":
        dtype = torch.promote_types(logits.dtype, torch.float32)  # u in float32 at least
        z = torch.randn(logits.shape[-1], generator=generator, device=logits.device, dtype=dtype)
        return z / torch.linalg.vector_norm(z)
    return None


def _penalty_scalar(regularizer, loss, logits, draw, mask=None):
    """S_j: L_j | CE(logits, ŷ) | Σ_c mean logits | uᵀ mean logits, over the kept rows of logits.reshape(-1, C)."""
    if regularizer == "grad_norm":
        return loss
    rows = logits.reshape(-1, logits.shape[-1])
    if mask is not None:
        kept = mask.reshape(-1)
        if not kept.any():
            return rows[kept].sum()  # Σ over no position: S_j = 0, so R_j = 0
        rows, draw = rows[kept], (draw[kept] if regularizer == "fisher_trace" else draw)
    if regularizer == "fisher_trace":
        return F.cross_entropy(rows, draw)
    if regularizer == "average_jacobian":
        return rows.mean(dim=0).sum()
    return rows.mean(dim=0, dtype=draw.dtype) @ draw


def step(sgd, closure, batch, *, micro_batch_size, regularizer="none", penalty=0.0, generator=None,
         graft=None, graft_norm=None, penalty_micro_batches=None):
    """One step of ``sgd`` (a torch.optim.SGD, or any torch.optim optimizer: its ``step()`` is the update) on
    ``batch``; returns ReferenceStats.

    ``regularizer`` is one of REGULARIZERS; ``graft`` is None, "iterative", "external" (with
    ``graft_norm`` = s) or "normalized"; ``penalty_micro_batches`` is m or None (see the module docstring).
    """
    assert regularizer in REGULARIZERS
    params = [p for group in sgd.param_groups for p in group["params"] if p.requires_grad]
    maximizing = [p for group in sgd.param_groups if group.get("maximize") for p in group["params"] if p.requires_grad]
    sgd.zero_grad(set_to_none=True)
    size, micro_batches = _micro_batches(batch, micro_batch_size)
    k = len(micro_batches)
    sampled, thinning = set(range(k)), 1.0
    if regularizer != "none" and penalty_micro_batches is not None and penalty_micro_batches < k:
        sampled = set(torch.randperm(k, generator=generator)[:penalty_micro_batches].tolist())
        thinning = k / penalty_micro_batches
    large_batch_grad = [torch.zeros_like(p) for p in params]  # G = Σ_j w_j g_j
    rows = []  # (w_j, L_j, R_j, ‖g_j‖²)
    for j, (args, kwargs) in enumerate(micro_batches):
        w = (args[0] if args else next(iter(kwargs.values()))).shape[0] / size
        weight = thinning * penalty if regularizer != "none" and j in sampled else None
        out = closure(*args, **kwargs)
        rows.append((w, *_backward_micro_batch(out, w, params, maximizing, regularizer, weight, generator,
                                               large_batch_grad)))
    weights, losses, penalties, grad_sq_norms = (list(column) for column in zip(*rows))
    grad_norm = float(sum((G_p ** 2).sum() for G_p in large_batch_grad)) ** 0.5
    if graft is not None:
        lengths = {"iterative": sum(n ** 0.5 for n in grad_sq_norms) / k, "external": graft_norm, "normalized": 1.0}
        _graft(params, lengths[graft], grad_norm)
    sgd.step()
    return ReferenceStats(
        loss=sum(w * x for w, x in zip(weights, losses)),
        penalty=thinning * sum(w * x for w, x in zip(weights, penalties)),  # R_j = 0 for j ∉ S
        micro_grad_sq_norm=sum(w * x for w, x in zip(weights, grad_sq_norms)),
        grad_norm=grad_norm,
        num_micro_batches=k,
        losses=losses,
        penalties=penalties,
        micro_grad_sq_norms=grad_sq_norms,
    )


def _backward_micro_batch(out, w, params, maximizing, regularizer, weight, generator, large_batch_grad):
    """Backpropagate w_j · (L_j ± weight · R_j) into ``.grad`` (w_j · L_j alone when ``weight`` is None) and add
    w_j g_j to ``large_batch_grad``; returns (L_j, R_j, ‖g_j‖²)."""
    loss, logits, mask = (*out, None)[:3] if isinstance(out, tuple) else (out, None, None)
    g = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    g_sq_norm = float(sum((gp.detach() ** 2).sum() for gp in g))
    for G_p, g_p in zip(large_batch_grad, g):
        G_p += w * g_p.detach()
    draw = _penalty_draw(regularizer, logits, generator)  # made also when this micro-batch has no penalty
    if weight is None:
        (w * loss).backward()
        return float(loss.detach()), 0.0, g_sq_norm
    v = torch.autograd.grad(_penalty_scalar(regularizer, loss, logits, draw, mask), params, create_graph=True,
                            allow_unused=True, materialize_grads=True)
    r = sum((vp ** 2).sum() for vp in v)
    if not maximizing:
        (w * (loss + weight * r)).backward()
        return float(loss.detach()), float(r.detach()), g_sq_norm
    (w * loss).backward(retain_graph=True)
    r_grads = torch.autograd.grad(r, params, allow_unused=True) if r.requires_grad else [None] * len(params)
    for p, r_grad in zip(params, r_grads):
        if r_grad is not None:
            sign = -1.0 if any(p is q for q in maximizing) else 1.0
            term = sign * weight * w * r_grad
            p.grad = term if p.grad is None else p.grad + term
    return float(loss.detach()), float(r.detach()), g_sq_norm


def _graft(params, length, grad_norm):
    """``.grad`` ← s · .grad/‖G‖ (zero when ‖G‖ = 0), s = ``length``."""
    with torch.no_grad():
        for p in params:
            if p.grad is not None:
                p.grad = p.grad * (length / grad_norm) if grad_norm > 0 else torch.zeros_like(p)
