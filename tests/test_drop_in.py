"""The drop-in contract: what a torch.optim.SGD user relies on, checked against torch.optim.SGD's own behaviour
or an independent float64 computation (frozen and unused parameters, maximize, a torch.optim-style closure,
activation checkpointing, BatchNorm and ragged micro-batches, the default process group)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import regopt
from regopt import reference, registry
from support import (assert_close_models, assert_same_state, cnn, constructors, data_for, logits_closure, loss_closure,
                     mlp, snapshot)

SGD_OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
ALL = constructors(["LB", "GN", "GN-fd", "FT", "FT-fd", "AJ", "UJ", "GRAFT-iter", "GRAFT-ext", "NGD"], penalty=0.3,
                   norms=lambda t: 0.5, seed=0)
# name -> regopt.reference keyword arguments, for the exact optimizers
REFERENCE = {name: method.reference_options for name, method in registry.METHODS.items()}
REFERENCE["GRAFT-ext"]["graft_norm"] = 0.5


def _torch_sgd_step(sgd, model, closure, batch):
    """torch.optim.SGD's usual loop: zero_grad(); loss.backward(); step()."""
    sgd.zero_grad()
    closure(model)(*batch).backward()
    sgd.step()


# -- 1. frozen parameters ----------------------------------------------------------------------------------------

def test_a_parameter_frozen_during_training_stays_put_as_with_torch_sgd():
    ours_model, torch_model = mlp(0), mlp(0)
    ours = regopt.MicroBatchSGD(ours_model.parameters(), micro_batch_size=8, **SGD_OPTIONS)
    theirs = torch.optim.SGD(torch_model.parameters(), **SGD_OPTIONS)
    for t in range(4):
        if t == 1:  # freeze the first layer after one step: it has a momentum buffer and a .grad by now
            for model in (ours_model, torch_model):
                model[0].requires_grad_(False)
            frozen = ours_model[0].weight.detach().clone()
        batch = data_for(ours_model, 8, seed=t)
        ours.step(loss_closure(ours_model), batch)
        _torch_sgd_step(theirs, torch_model, loss_closure, batch)
    assert torch.equal(ours_model[0].weight, frozen)  # moved 0.08 in 3 steps before the fix
    assert_close_models(ours_model, torch_model, rtol=0, atol=0)
    assert ours_model[0].weight.grad is None and torch_model[0].weight.grad is None


@pytest.mark.parametrize("name", list(REFERENCE))
def test_frozen_parameters_match_the_reference_for_every_optimizer(name):
    fast_model, slow_model = cnn(1), cnn(1)
    fast = ALL[name](fast_model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    slow = torch.optim.SGD(slow_model.parameters(), **SGD_OPTIONS)
    generator = torch.Generator().manual_seed(0)
    for t in range(3):
        if t == 1:
            for model in (fast_model, slow_model):
                model[-1].requires_grad_(False)
            frozen = fast_model[-1].weight.detach().clone()
        batch = data_for(fast_model, 7, seed=t)
        fast.step(logits_closure(fast_model), batch)
        reference.step(slow, logits_closure(slow_model), batch, micro_batch_size=3, penalty=0.3, generator=generator,
                       **REFERENCE[name])
    assert torch.equal(fast_model[-1].weight, frozen) and fast_model[-1].weight.grad is None
    assert_close_models(fast_model, slow_model)


# -- 2. unused parameters ----------------------------------------------------------------------------------------

class TwoHeads(nn.Module):
    """A trunk and two heads; the closure picks one per step, as a multi-task model does."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(3, 5), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(5, 4), nn.Linear(5, 4)])
        self.double()

    def closure(self, head):
        def run(x, y):
            logits = self.heads[head](self.trunk(x))
            return F.cross_entropy(logits, y), logits
        return run


def test_a_head_the_loss_does_not_use_gets_no_update_as_with_torch_sgd():
    ours_model, torch_model = TwoHeads(), TwoHeads()
    ours = regopt.MicroBatchSGD(ours_model.parameters(), micro_batch_size=6, **SGD_OPTIONS)
    theirs = torch.optim.SGD(torch_model.parameters(), **SGD_OPTIONS)
    for t in range(4):
        head = 0 if t == 0 else 1  # head 0 gets momentum at step 0, then is unused
        batch = data_for(mlp(0), 6, seed=t)
        ours.step(ours_model.closure(head), batch)
        theirs.zero_grad()
        torch_model.closure(head)(*batch)[0].backward()
        theirs.step()
        if t == 0:
            after_first = ours_model.heads[0].weight.detach().clone()
    assert torch.equal(ours_model.heads[0].weight, after_first)  # drifted 0.045 in 3 steps before the fix
    assert ours_model.heads[0].weight.grad is None
    assert_close_models(ours_model, torch_model, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_an_unused_parameter_gets_no_grad_no_decay_no_momentum(name):
    model = mlp(2)
    extra = nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = ALL[name]([*model.parameters(), extra], micro_batch_size=2, **SGD_OPTIONS)

    def closure(use_extra):
        def run(x, y):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            return (loss + (extra * x[:, :1]).square().mean() if use_extra else loss), logits
        return run
    opt.step(closure(True), data_for(model, 5))  # extra now has a .grad and a momentum buffer
    assert extra.grad is not None and "momentum_buffer" in opt.state[extra]
    after_first = extra.detach().clone()
    for t in range(2):
        opt.step(closure(False), data_for(model, 5, seed=t + 1))
        assert extra.grad is None
    assert torch.equal(extra, after_first)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name", list(REFERENCE))
def test_a_parameter_used_by_one_micro_batch_only_matches_the_reference(name):
    # The branch runs on the micro-batches whose first label is 0: used by some, so it is updated
    # (weight decay and momentum included), exactly as the reference's accumulated backward does.
    def build():
        model = mlp(3)
        model.extra = nn.Parameter(torch.full((4,), 0.5, dtype=torch.float64))
        return model

    def closure(model):
        def run(x, y):
            logits = model(x)
            if int(y[0]) == 0:
                logits = logits + model.extra
            return F.cross_entropy(logits, y), logits
        return run
    fast_model, slow_model = build(), build()
    fast = ALL[name](fast_model.parameters(), micro_batch_size=2, **SGD_OPTIONS)
    slow = torch.optim.SGD(slow_model.parameters(), **SGD_OPTIONS)
    generator = torch.Generator().manual_seed(0)
    for t in range(3):
        x, y = data_for(fast_model, 6, seed=t)
        y = torch.tensor([0, 1, 2, 3, 1, 2]) if t < 2 else torch.tensor([1, 2, 3, 1, 2, 3])  # step 2: unused
        fast.step(closure(fast_model), (x, y))
        reference.step(slow, closure(slow_model), (x, y), micro_batch_size=2, penalty=0.3, generator=generator,
                       **REFERENCE[name])
        assert (fast_model.extra.grad is None) == (t == 2) == (slow_model.extra.grad is None)
    assert_close_models(fast_model, slow_model)


# -- 4. maximize -------------------------------------------------------------------------------------------------

def test_maximize_ascends_the_loss_and_still_minimizes_the_gradient_norm():
    # ‖∇(−L)‖ = ‖∇L‖, so ascending L − λR is descending (−L) + λR: the two runs must agree.
    up, down = cnn(4), cnn(4)
    options = dict(lr=0.05, momentum=0.9, weight_decay=0.01, micro_batch_size=3, penalty=0.5)
    ascend = regopt.GradNormSGD(up.parameters(), maximize=True, **options)
    descend = regopt.GradNormSGD(down.parameters(), **options)
    for t in range(3):
        batch = data_for(up, 7, seed=t)
        ascend.step(loss_closure(up), batch)
        descend.step(lambda x, y: -F.cross_entropy(down(x), y), batch)
        torch.testing.assert_close(ascend.stats.penalty, descend.stats.penalty, rtol=1e-12, atol=0)
    assert_close_models(up, down, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["GN", "GN-fd", "FT", "FT-fd", "AJ", "UJ"])
def test_maximize_flips_only_the_loss_term(name):
    # One step each way from the same point: Δ_max = lr (G − λP) and Δ_min = −lr (G + λP), so
    # (Δ_max − Δ_min) / 2lr is G alone, the large-batch loss gradient (computed here independently).
    up, down = mlp(12, act=nn.Softplus), mlp(12, act=nn.Softplus)
    x, y = data_for(up, 7)
    G = torch.autograd.grad(F.cross_entropy(up(x), y), list(up.parameters()))
    for model, maximize in [(up, True), (down, False)]:
        ALL[name](model.parameters(), lr=0.2, micro_batch_size=7, maximize=maximize).step(logits_closure(model), (x, y))
    start = mlp(12, act=nn.Softplus)
    for p_up, p_down, p0, g in zip(up.parameters(), down.parameters(), start.parameters(), G):
        torch.testing.assert_close(((p_up - p0) - (p_down - p0)) / (2 * 0.2), g, rtol=1e-9, atol=1e-12)


def test_maximize_step_is_theta_plus_lr_times_g_minus_lambda_p():
    # An independent float64 computation: G and P = Σ_j w_j ∇‖∇L_j‖² by explicit double backprop.
    model = mlp(5)
    x, y = data_for(model, 5)
    params = list(model.parameters())
    G = [torch.zeros_like(p) for p in params]
    P = [torch.zeros_like(p) for p in params]
    for lo, hi in [(0, 2), (2, 4), (4, 5)]:
        g = torch.autograd.grad(F.cross_entropy(model(x[lo:hi]), y[lo:hi]), params, create_graph=True)
        r_grad = torch.autograd.grad(sum((t ** 2).sum() for t in g), params)
        for acc, term in [(G, g), (P, r_grad)]:
            for a, b in zip(acc, term):
                a += (hi - lo) / 5 * b.detach()
    before = [p.detach().clone() for p in params]
    opt = regopt.GradNormSGD(params, lr=0.2, micro_batch_size=2, penalty=0.7, maximize=True)
    opt.step(loss_closure(model), (x, y))
    for p, p0, g, r in zip(params, before, G, P):
        torch.testing.assert_close(p.detach(), p0 + 0.2 * (g - 0.7 * r), rtol=1e-12, atol=1e-14)


def test_maximize_per_parameter_group():
    # One group ascends, the other descends: each gets its own sign for λP, as the reference does.
    fast_model, slow_model = mlp(6), mlp(6)

    def groups(model):
        return [{"params": model[0].parameters(), "maximize": True}, {"params": model[2].parameters()}]
    fast = regopt.FisherTraceSGD(groups(fast_model), lr=0.1, momentum=0.5, micro_batch_size=2, penalty=0.4,
                                 generator=torch.Generator().manual_seed(1))
    slow = torch.optim.SGD(groups(slow_model), lr=0.1, momentum=0.5)
    generator = torch.Generator().manual_seed(1)
    for t in range(2):
        batch = data_for(fast_model, 5, seed=t)
        fast.step(logits_closure(fast_model), batch)
        reference.step(slow, logits_closure(slow_model), batch, micro_batch_size=2, regularizer="fisher_trace",
                       penalty=0.4, generator=generator)
    assert_close_models(fast_model, slow_model)


@pytest.mark.parametrize("mode", ["iterative", "normalized"])
def test_grafting_with_maximize_ascends_along_g_with_the_same_step_length(mode):
    # Sign convention: the grafted gradient s·G/‖G‖ is handed to SGD(maximize=True), so θ += lr·s·G/‖G‖.
    up, down = mlp(7), mlp(7)
    batch = data_for(up, 6)
    regopt.GraftedSGD(up.parameters(), lr=0.3, micro_batch_size=2, mode=mode, maximize=True).step(
        loss_closure(up), batch)
    regopt.GraftedSGD(down.parameters(), lr=0.3, micro_batch_size=2, mode=mode).step(loss_closure(down), batch)
    start = mlp(7)
    for p, q, p0 in zip(up.parameters(), down.parameters(), start.parameters()):
        torch.testing.assert_close(p - p0, -(q - p0), rtol=1e-12, atol=1e-15)


# -- 6. a closure written the torch.optim way ------------------------------------------------------------------

@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("graph", ["saves tensors", "saves nothing"])
def test_a_closure_that_calls_backward_is_refused_and_changes_nothing(name, graph):
    model = cnn(8)
    opt = ALL[name](model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    opt.step(logits_closure(model), data_for(model, 7))
    before = snapshot(model, opt)

    def torch_optim_style(x, y):
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if graph == "saves nothing":  # autograd then lets regopt differentiate again: caught by the .grad check
            loss = (model[0].weight * 2.0).sum() + logits.detach().sum() * 0
            loss.backward()
            return loss, logits.detach().requires_grad_()
        loss.backward()
        return loss, logits

    with pytest.raises(TypeError, match=r"must not call backward\(\)") as info:
        opt.step(torch_optim_style, data_for(model, 7, seed=1))
    assert "def loss_fn(x, y): return F.cross_entropy(model(x), y)" in str(info.value)
    assert_same_state(before, snapshot(model, opt))


# -- 7. activation checkpointing ---------------------------------------------------------------------------------

class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


def _checkpointed_cnn(seed):
    model = cnn(seed)
    return nn.Sequential(Checkpointed(model[:3]), *model[3:])


@pytest.mark.parametrize("name", ["LB", "GN", "GN-fd", "FT", "FT-fd", "UJ"])
def test_batchnorm_statistics_update_once_per_micro_batch_under_activation_checkpointing(name):
    plain, checkpointed = cnn(9), _checkpointed_cnn(9)
    opts = [ALL[name](m.parameters(), micro_batch_size=3, **SGD_OPTIONS) for m in (plain, checkpointed)]
    for t in range(2):
        batch = data_for(plain, 10, seed=t)
        for model, opt in zip((plain, checkpointed), opts):
            opt.step(logits_closure(model), batch)
    batch_norm = checkpointed[0].inner[1]
    assert batch_norm.num_batches_tracked.item() == 8  # 3× (exact) or 2× (finite differences) before the fix
    assert_close_models(plain, checkpointed)  # running statistics included


# -- 8. a one-example micro-batch into BatchNorm -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["LB", "GN", "GN-fd", "AJ"])
def test_a_one_example_micro_batch_into_batchnorm_names_it_and_changes_nothing(name):
    torch.manual_seed(10)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)).double()
    opt = ALL[name](model.parameters(), micro_batch_size=4, **SGD_OPTIONS)
    x, y = torch.randn(9, 3, dtype=torch.float64), torch.randint(0, 3, (9,))
    opt.step(logits_closure(model), (x[:8], y[:8]))
    before = snapshot(model, opt)
    with pytest.raises(ValueError, match=r"micro-batch 2 of 3 \(examples 8:9\).*divisible by micro_batch_size") as info:
        opt.step(logits_closure(model), (x, y))
    assert "Expected more than 1 value per channel" in str(info.value.__cause__)
    assert_same_state(before, snapshot(model, opt))  # micro-batches 0 and 1 had updated the running statistics


# -- 10. bad setups ----------------------------------------------------------------------------------------------

def test_a_model_on_the_meta_device_gets_a_clear_error():
    with torch.device("meta"):
        model = nn.Linear(3, 2)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1)
    with pytest.raises(ValueError, match="meta device"):
        opt.step(lambda x: model(x).sum(), torch.empty(4, 3, device="meta"))


def test_a_dict_batch_with_non_string_keys_gets_a_clear_type_error():
    model = mlp(11)
    opt = regopt.MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=2)
    x, y = data_for(model, 4)
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"batch is a dict with the key 0 \(int\): its keys must be strings"):
        opt.step(lambda **parts: F.cross_entropy(model(parts[0]), parts[1]), {0: x, 1: y})
    assert_same_state(before, snapshot(model, opt))
