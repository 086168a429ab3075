"""The two differentiation methods: exact double backprop and the forward-difference Hessian-vector product."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import hvp, registry
from regopt.transaction import frozen_buffers
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
        with frozen_buffers():
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


@pytest.mark.parametrize("name", registry.PENALIZED)
def test_optimizers_finite_difference_close_to_exact_on_smooth_model(name):
    make = registry.METHODS[name].build
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


# -- fd_eps against the parameters' precision ------------------------------------------------------------------

def _float32_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Linear(8, 4))


def _relative_error_of_finite_difference(eps):
    """‖FD ∇R − exact ∇R‖ / ‖exact ∇R‖ for a float32 model, the exact one in float64."""
    model32 = _float32_model()
    model64 = _float32_model().double()
    x, y = data_for(mlp(0), 8)
    loss64 = F.cross_entropy(model64(x), y)
    exact = hvp.exact(loss64, loss64, list(model64.parameters()), None, 0.0).penalty_grad
    exact = torch.cat([t.flatten() for t in exact])
    params = list(model32.parameters())
    loss = F.cross_entropy(model32(x.float()), y)
    shifted = lambda: hvp.gradient(F.cross_entropy(model32(x.float()), y), params)
    approx = torch.cat([t.flatten() for t in hvp.finite_difference(loss, loss, params, shifted, eps).penalty_grad])
    return float((approx.double() - exact).norm() / exact.norm())


def test_float32_finite_differences_are_accurate_at_the_advised_eps_and_garbage_below_the_floor():
    # The README's advice for float32 (1e-3 to 1e-2) and the floor eps·‖θ‖ that fd_eps is refused below.
    norm = hvp.parameter_norm(list(_float32_model().parameters()))
    floor = torch.finfo(torch.float32).eps * max(norm, 1.0)
    assert max(_relative_error_of_finite_difference(eps) for eps in (1e-2, 1e-3)) < 0.01
    assert _relative_error_of_finite_difference(floor / 4) > 0.5  # 0.8 measured; 0.2-0.5 at the floor itself


def test_fd_eps_below_what_the_dtype_resolves_is_refused():
    with pytest.raises(ValueError, match="Invalid fd_eps value: 1e-09 is below what float32 parameters can resolve"):
        regopt.GradNormSGD(_float32_model().parameters(), lr=0.1, micro_batch_size=2, penalty=0.1,
                           method="finite_difference", fd_eps=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # float64 resolves 1e-9, and float32 the default 1e-2: no warning either
        regopt.GradNormSGD(mlp(0).parameters(), lr=0.1, micro_batch_size=2, penalty=0.1, method="finite_difference",
                           fd_eps=1e-9)
        regopt.GradNormSGD(_float32_model().parameters(), lr=0.1, micro_batch_size=2, penalty=0.1,
                           method="finite_difference")


def test_small_fd_eps_warns_and_a_changed_fd_eps_is_checked_at_the_step():
    model = _float32_model()
    with pytest.warns(UserWarning, match="fd_eps=1e-06 is small for float32"):
        opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1,
                                 method="finite_difference", fd_eps=1e-6)
    opt.fd_eps = 1e-12
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data_for(mlp(0), 4)
    with pytest.raises(ValueError, match="below what float32 parameters can resolve"):
        opt.step(lambda a, b: F.cross_entropy(model(a), b), (x.float(), y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


def test_finite_differences_under_bfloat16_autocast_warn():
    model = _float32_model()
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1, method="finite_difference")
    x, y = data_for(mlp(0), 4)
    with pytest.warns(UserWarning, match="fd_eps=0.01 is small for bfloat16"), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(lambda a, b: F.cross_entropy(model(a), b), (x.float(), y))
