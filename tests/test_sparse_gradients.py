"""Sparse gradients (nn.Embedding(sparse=True)): MicroBatchSGD takes them as torch.optim.SGD does; where they
cannot be right (a penalty, grafting, weight decay) the step is refused, saying why, and changes nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from support import assert_same_state, snapshot


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3)).double()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 10, (8, 2), generator=g), torch.randint(0, 3, (8,), generator=g)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True},
                                     {"max_grad_norm": 0.1}, {"loss_scale": 8.0}])
def test_micro_batch_sgd_steps_sparse_gradients_as_torch_sgd(options):
    model = _model()
    reference = copy.deepcopy(model)
    opt = regopt.MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=3, **options)
    sgd = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=options.get("momentum", 0),
                          nesterov=options.get("nesterov", False))
    for seed in range(3):
        x, y = _batch(seed)
        opt.step(lambda a, b: F.cross_entropy(model(a), b), (x, y))
        sgd.zero_grad()
        F.cross_entropy(reference(x), y).backward()
        if "max_grad_norm" in options:
            torch.nn.utils.clip_grad_norm_(reference.parameters(), options["max_grad_norm"])
        sgd.step()
    assert model[0].weight.grad.layout == torch.sparse_coo
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("make", [
    lambda p: regopt.GradNormSGD(p, lr=0.1, micro_batch_size=3, penalty=0.1),
    lambda p: regopt.GradNormSGD(p, lr=0.1, micro_batch_size=3, penalty=0.1, method="finite_difference"),
    lambda p: regopt.GraftedSGD(p, lr=0.1, micro_batch_size=3),
    lambda p: regopt.MicroBatchSGD(p, lr=0.1, micro_batch_size=3, weight_decay=0.1),
])
def test_where_sparse_gradients_cannot_be_right_the_step_is_refused_saying_why(make):
    model = _model()
    opt = make(model.parameters())
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"sparse gradients are not supported here .* MicroBatchSGD alone takes "
                                        r"them, on one process and with weight_decay=0, since a penalty"):
        opt.step(lambda a, b: F.cross_entropy(model(a), b), _batch(0))
    assert_same_state(before, snapshot(model, opt))
