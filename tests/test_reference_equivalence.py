"""Every optimizer equals regopt.reference (the paper's literal loop) in float64, over random setups."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import regopt
from regopt import reference

from support import assert_close_models, cnn, data_for, logits_closure, mlp

# name -> (constructor, reference keyword arguments)
OPTIMIZERS = {
    "LB": (lambda params, **kw: regopt.MicroBatchSGD(params, **kw), {}),
    "GN": (lambda params, penalty, generator, **kw: regopt.GradNormSGD(params, penalty=penalty, **kw),
           {"regularizer": "grad_norm"}),
    "FT": (lambda params, penalty, generator, **kw: regopt.FisherTraceSGD(
        params, penalty=penalty, generator=generator, **kw), {"regularizer": "fisher_trace"}),
    "AJ": (lambda params, penalty, generator, **kw: regopt.JacobianRegSGD(params, penalty=penalty, kind="average", **kw),
           {"regularizer": "average_jacobian"}),
    "UJ": (lambda params, penalty, generator, **kw: regopt.JacobianRegSGD(
        params, penalty=penalty, kind="unit", generator=generator, **kw), {"regularizer": "unit_jacobian"}),
    "GRAFT-iter": (lambda params, **kw: regopt.GraftedSGD(params, mode="iterative", **kw), {"graft": "iterative"}),
    "GRAFT-ext": (lambda params, **kw: regopt.GraftedSGD(params, mode="external", norms=[0.7, 1.3, 0.2], **kw),
                  {"graft": "external"}),
    "NGD": (lambda params, **kw: regopt.GraftedSGD(params, mode="normalized", **kw), {"graft": "normalized"}),
}
PENALIZED = {"GN", "FT", "AJ", "UJ"}


@st.composite
def setups(draw):
    batch = draw(st.integers(1, 40))
    momentum = draw(st.sampled_from([0.0, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "model": draw(st.sampled_from(["mlp", "cnn", "cnn_bn"])),
        "seed": draw(st.integers(0, 2**16)),
        "batch": batch,
        "micro_batch_size": draw(st.integers(1, batch + 3)),
        "penalty": draw(st.floats(0.0, 1.0)),
        "lr": draw(st.sampled_from([0.05, 0.3])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.3])),
        "nesterov": nesterov,
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "maximize": draw(st.booleans()),
        "two_groups": draw(st.booleans()),
        "steps": draw(st.integers(1, 3)),
    }


def param_groups(model, two_groups):
    params = list(model.parameters())
    if not two_groups:
        return params
    return [{"params": params[:2], "lr": 0.02, "momentum": 0.5}, {"params": params[2:]}]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=setups())
def test_optimizer_equals_reference(name, setup):
    make, reference_kwargs = OPTIMIZERS[name]
    build = {"mlp": mlp, "cnn": lambda s: cnn(s, batch_norm=False), "cnn_bn": cnn}[setup["model"]]
    fast_model = build(setup["seed"])
    slow_model = copy.deepcopy(fast_model)
    sgd_kwargs = {k: setup[k] for k in ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")}
    extra = {"penalty": setup["penalty"], "generator": torch.Generator().manual_seed(7)} if name in PENALIZED else {}
    fast = make(param_groups(fast_model, setup["two_groups"]), micro_batch_size=setup["micro_batch_size"],
                **sgd_kwargs, **extra)
    slow = torch.optim.SGD(param_groups(slow_model, setup["two_groups"]), **sgd_kwargs)
    slow_generator = torch.Generator().manual_seed(7)
    for t in range(setup["steps"]):
        x, y = data_for(fast_model, setup["batch"], seed=setup["seed"] + t)
        fast_loss = fast.step(logits_closure(fast_model), (x, y))
        expected = reference.step(
            slow, logits_closure(slow_model), (x, y), micro_batch_size=setup["micro_batch_size"],
            penalty=setup["penalty"] if name in PENALIZED else 0.0, generator=slow_generator,
            graft_norm=[0.7, 1.3, 0.2][t], **reference_kwargs)
        stats = fast.stats
        for got, want in [(fast_loss, expected.loss), (stats.loss, expected.loss), (stats.penalty, expected.penalty),
                          (stats.micro_grad_sq_norm, expected.micro_grad_sq_norm),
                          (stats.grad_norm, expected.grad_norm)]:
            assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
        assert stats.num_micro_batches == expected.num_micro_batches
        assert_close_models(fast_model, slow_model)
        for p, q in zip(fast_model.parameters(), slow_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        if setup["momentum"] > 0:
            torch.testing.assert_close(fast.state[p]["momentum_buffer"], slow.state[q]["momentum_buffer"],
                                       rtol=1e-10, atol=1e-12)
