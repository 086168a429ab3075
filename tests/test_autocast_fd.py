"""Finite differences under autocast: the shifted pass must see the shifted parameters, not autocast's cached
low-precision copies of the unshifted ones (autocast entered around the step or inside the loss function), and
a step must not leave stale copies behind for the next one in the same autocast block."""

from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import registry

LR, PENALTY = 0.5, 1.0
NAMES = ["GN", "FT", "AJ"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 6, generator=g), torch.randint(0, 4, (32,), generator=g)


def _bf16() -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def _loss_fn(model: nn.Module, inside: bool):
    def loss_fn(x, y):
        with _bf16() if inside else contextlib.nullcontext():  # as Accelerate's mixed_precision="bf16" does
            logits = model(x)
        logits = logits.float()
        return F.cross_entropy(logits, y), logits
    return loss_fn


def _params_after_step(name: str | None, method: str, inside: bool) -> torch.Tensor:
    """θ after one step (lr 0.5, no momentum) under bf16 autocast, around the step or inside the loss function."""
    model = _model()
    if name is None:
        opt = regopt.MicroBatchSGD(model.parameters(), lr=LR, micro_batch_size=8)
    else:
        opt = registry.build(name, model.parameters(), lr=LR, micro_batch_size=8, penalty=PENALTY, method=method,
                             fd_eps=0.05, generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fd_eps is small for bfloat16's rounding: the tolerance below allows it
        with contextlib.nullcontext() if inside else _bf16():
            opt.step(_loss_fn(model, inside), _batch())
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("inside", [False, True], ids=["autocast around the step", "autocast inside loss_fn"])
@pytest.mark.parametrize("name", NAMES)
def test_finite_differences_apply_the_exact_penalty_under_bfloat16_autocast(name, inside):
    first_order = _params_after_step(None, "exact", inside)
    # θ_LB − θ = lr λ P: the applied penalty gradient, the same micro-batches and draws either way
    exact = (first_order - _params_after_step(name, "exact", inside)) / (LR * PENALTY)
    fd = (first_order - _params_after_step(name, "finite_difference", inside)) / (LR * PENALTY)
    assert exact.norm() > 0.1  # a penalty worth measuring
    assert (fd - exact).norm() < 0.25 * exact.norm()  # bfloat16 forwards: a few percent, not 100 % (P_fd = 0)


def test_steps_inside_one_autocast_block_see_the_updated_parameters():
    """Two steps in one autocast block take the steps of two blocks (autocast's cache is dropped after an update)."""
    batch = _batch()
    results = []
    for one_block in (True, False):
        model = _model()
        opt = regopt.MicroBatchSGD(model.parameters(), lr=LR, micro_batch_size=8)
        loss_fn = _loss_fn(model, inside=False)
        with _bf16() if one_block else contextlib.nullcontext():
            for _ in range(2):
                with contextlib.nullcontext() if one_block else _bf16():
                    opt.step(loss_fn, batch)
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
