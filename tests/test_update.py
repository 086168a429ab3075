"""regopt.update.sgd_update is torch.optim.SGD.step, bit for bit."""

import pytest
import torch

from regopt.update import sgd_update
from support import mlp


@pytest.mark.parametrize("options", [
    {}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
    {"momentum": 0.5, "dampening": 0.2, "maximize": True}, {"foreach": False, "momentum": 0.9},
    {"foreach": True, "weight_decay": 0.01},
])
def test_sgd_update_equals_sgd_step(options):
    a, b = mlp(0), mlp(0)
    ours, theirs = torch.optim.SGD(a.parameters(), lr=0.1, **options), torch.optim.SGD(b.parameters(), lr=0.1, **options)
    for t in range(3):
        torch.manual_seed(t)
        for p, q in zip(a.parameters(), b.parameters()):
            p.grad = torch.randn_like(p)
            q.grad = p.grad.clone()
        sgd_update(ours)
        theirs.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
        if options.get("momentum"):
            assert torch.equal(ours.state[p]["momentum_buffer"], theirs.state[q]["momentum_buffer"])
