"""The two differentiation methods: exact double backprop and the forward-difference Hessian-vector product."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import hvp
from support import assert_close_models, cnn, data_for, logits_closure, loss_closure, mlp


def _penalty_gradients(model, method, eps, closure_of=loss_closure):
    x, y = data_for(model, 6)
    params = list(model.parameters())
    loss = closure_of(model)(x, y)
    loss = loss[0] if isinstance(loss, tuple) else loss
    shifted = lambda: hvp.gradient(F.cross_entropy(model(x), y), params)
    return hvp.METHODS[method](loss, loss, params, shifted, eps)


def test_exact_matches_the_hessian_vector_product():
    model = mlp(0, act=nn.Softplus)
    params = list(model.parameters())
    x, y = data_for(model, 6)
    grads = hvp.exact(loss := F.cross_entropy(model(x), y), loss, params, None, 0.0)
    g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
    hessian_g = torch.autograd.grad(g, params, grad_outputs=[t.detach() for t in g])
    for got, want in zip(grads.penalty_grad, hessian_g):
        torch.testing.assert_close(got, 2 * want)
    assert grads.penalty.item() == pytest.approx(sum((t ** 2).sum() for t in g).item())


@pytest.mark.parametrize("act", [nn.Tanh, nn.Softplus])
def test_finite_difference_converges_to_exact_on_smooth_models(act):
    model = mlp(1, act=act)
    exact = _penalty_gradients(model, "exact", 0.0).penalty_grad
    errors = []
    for eps in [1e-1, 1e-2, 1e-3, 1e-4]:
        approx = _penalty_gradients(model, "finite_difference", eps).penalty_grad
        errors.append(max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(approx, exact)))
    assert errors == sorted(errors, reverse=True), errors  # first order in ε
    assert errors[-1] < 1e-3 and errors[0] / errors[-1] > 100


def test_finite_difference_restores_parameters_bit_exactly_and_freezes_buffers():
    model = cnn(2)
    params_before = [p.detach().clone() for p in model.parameters()]
    x, y = data_for(model, 6)
    loss = F.cross_entropy(model(x), y)
    buffers_after_first_pass = [b.clone() for b in model.buffers()]

    def shifted():
        with hvp.frozen_buffers():
            return hvp.gradient(F.cross_entropy(model(x), y), list(model.parameters()))
    hvp.finite_difference(loss, loss, list(model.parameters()), shifted, 1e-2)
    for p, q in zip(model.parameters(), params_before):
        assert torch.equal(p, q)
    for b, c in zip(model.buffers(), buffers_after_first_pass):
        assert torch.equal(b, c)


def test_zero_gradient_gives_zero_penalty_gradient_not_nan():
    w = nn.Parameter(torch.zeros(3, dtype=torch.float64))
    loss = (w ** 4).sum()  # g = 0 and H = 0 at w = 0
    for method in hvp.METHODS:
        out = hvp.METHODS[method](loss, loss, [w], lambda: hvp.gradient((w ** 4).sum(), [w]), 1e-2)
        assert torch.equal(out.penalty_grad[0], torch.zeros(3, dtype=torch.float64)), method
        loss = (w ** 4).sum()


def test_penalty_independent_of_parameters_gives_zero_gradient():
    w = nn.Parameter(torch.ones(2, dtype=torch.float64))
    loss = (w * torch.tensor([1.0, 2.0], dtype=torch.float64)).sum()  # linear: v constant
    out = hvp.exact(loss, loss, [w], None, 0.0)
    assert out.penalty.item() == pytest.approx(5.0, rel=1e-15) and torch.equal(out.penalty_grad[0], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", ["GN", "FT", "AJ", "UJ"])
def test_optimizers_finite_difference_close_to_exact_on_smooth_model(name):
    make = {
        "GN": regopt.GradNormSGD, "FT": regopt.FisherTraceSGD,
        "AJ": lambda *a, **k: regopt.JacobianRegSGD(*a, kind="average", **k),
        "UJ": lambda *a, **k: regopt.JacobianRegSGD(*a, kind="unit", **k),
    }[name]
    models = [mlp(3, act=nn.Softplus) for _ in range(2)]
    opts = [make(m.parameters(), lr=0.5, micro_batch_size=2, penalty=1.0, method=method, fd_eps=1e-6,
                 generator=torch.Generator().manual_seed(0))
            for m, method in zip(models, ["exact", "finite_difference"])]
    for t in range(2):
        batch = data_for(models[0], 5, seed=t)
        for model, opt in zip(models, opts):
            opt.step(logits_closure(model), batch)
    assert_close_models(models[0], models[1], rtol=1e-5, atol=1e-7)


def test_finite_difference_replays_dropout_masks_and_keeps_global_rng():
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    results = []
    for method, eps in [("exact", 1e-2), ("finite_difference", 1e-6)]:
        model = make()
        opt = regopt.GradNormSGD(model.parameters(), lr=0.5, micro_batch_size=2, penalty=1.0, method=method,
                                 fd_eps=eps)
        torch.manual_seed(1)
        opt.step(loss_closure(model), data_for(mlp(0), 6))
        results.append(([p.detach().clone() for p in model.parameters()], torch.rand(1)))
    for p, q in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    assert torch.equal(results[0][1], results[1][1])  # the RNG is where the exact path leaves it
