"""Behaviour of the optimizer classes: equivalences, torch.optim integration, randomness, bad input."""

from __future__ import annotations

import copy
import io
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import registry
from support import (assert_close_models, assert_same_state, cnn, constructors, data_for, logits_closure, loss_closure,
                     mlp, requires_cuda, snapshot)

PENALIZED = constructors(registry.PENALIZED)
ALL = constructors(registry.NAMES, penalty=0.3, norms=lambda t: 1.0 + t)


@pytest.mark.parametrize("name", list(PENALIZED))
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_zero_penalty_equals_micro_batch_sgd(name, method):
    a, b = cnn(1), cnn(1)
    fast = PENALIZED[name](a.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.0, method=method)
    base = regopt.MicroBatchSGD(b.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3)
    for t in range(3):
        x, y = data_for(a, 10, seed=t)
        fast.step(logits_closure(a), (x, y))
        base.step(logits_closure(b), (x, y))
        assert torch.equal(fast.stats.micro_grad_sq_norm, base.stats.micro_grad_sq_norm)
    assert_close_models(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("options", [{}, {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
                                     {"momentum": 0.5, "dampening": 0.5, "maximize": True, "foreach": False},
                                     {"momentum": 0.9, "fused": True}])
def test_one_micro_batch_equals_torch_sgd(options):
    a, b = cnn(2), cnn(2)
    ours = regopt.MicroBatchSGD(a.parameters(), lr=0.1, micro_batch_size=8, **options)
    theirs = torch.optim.SGD(b.parameters(), lr=0.1, **options)
    for t in range(3):
        x, y = data_for(a, 8, seed=t)
        loss = ours.step(loss_closure(a), (x, y))
        theirs.zero_grad()
        expected = F.cross_entropy(b(x), y)
        expected.backward()
        theirs.step()
        assert torch.equal(loss, expected.detach())
    assert_close_models(a, b, rtol=0, atol=0)


def test_unit_equals_average_jacobian_with_one_logit():
    a, b = mlp(3, outputs=1), mlp(3, outputs=1)
    closure = lambda model: lambda x, y: ((model(x).squeeze(1) - y.double()).square().mean(), model(x))
    unit = regopt.JacobianRegSGD(a.parameters(), lr=0.1, micro_batch_size=2, penalty=0.5, kind="unit")
    average = regopt.JacobianRegSGD(b.parameters(), lr=0.1, micro_batch_size=2, penalty=0.5, kind="average")
    for t in range(3):
        x, _ = data_for(a, 5, seed=t)
        y = torch.randn(5)
        unit.step(closure(a), (x, y))
        average.step(closure(b), (x, y))
        assert torch.equal(unit.stats.penalty, average.stats.penalty)
    assert_close_models(a, b, rtol=0, atol=0)


def test_fisher_trace_equals_grad_norm_when_softmax_is_one_hot():
    # Logits scaled so that softmax is one-hot in float64: the sampled label is the argmax.
    a, b = mlp(4), mlp(4)
    def closure(model, labels_from_argmax):
        def run(x, y):
            logits = 1e4 * model(x)
            target = logits.argmax(1) if labels_from_argmax else y
            return F.cross_entropy(logits, target), logits
        return run
    ft = regopt.FisherTraceSGD(a.parameters(), lr=1e-6, micro_batch_size=2, penalty=0.1)
    gn = regopt.GradNormSGD(b.parameters(), lr=1e-6, micro_batch_size=2, penalty=0.1)
    x, y = data_for(a, 6)
    ft.step(closure(a, True), (x, y))
    gn.step(closure(b, True), (x, y))
    torch.testing.assert_close(ft.stats.penalty, gn.stats.penalty, rtol=1e-12, atol=0)
    assert_close_models(a, b, rtol=1e-12, atol=1e-15)


def test_unused_and_frozen_parameters():
    # As torch.optim.SGD after zero_grad(): no .grad, hence no weight decay or momentum (see test_drop_in.py).
    model = mlp(5)
    unused = nn.Parameter(torch.ones(3, dtype=torch.float64))
    frozen = nn.Parameter(torch.ones(2, dtype=torch.float64), requires_grad=False)
    frozen.grad = torch.full((2,), 7.0, dtype=torch.float64)  # stale: must not be applied
    opt = regopt.GradNormSGD([*model.parameters(), unused, frozen], lr=0.1, micro_batch_size=2, penalty=0.1,
                             weight_decay=0.5)
    opt.step(loss_closure(model), data_for(model, 5))
    assert unused.grad is None and torch.equal(unused.detach(), torch.ones(3, dtype=torch.float64))
    assert frozen.grad is None and torch.equal(frozen.detach(), torch.ones(2, dtype=torch.float64))
    assert unused not in opt.state and frozen not in opt.state


def test_grad_holds_the_applied_gradient_and_is_replaced():
    model = mlp(6)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.0, micro_batch_size=2, penalty=0.2)
    for p in model.parameters():
        p.grad = torch.full_like(p, 123.0)
    opt.step(loss_closure(model), data_for(model, 5))
    first = [p.grad.clone() for p in model.parameters()]
    opt.step(loss_closure(model), data_for(model, 5))  # lr = 0: same point, same gradient, not accumulated
    for p, g in zip(model.parameters(), first):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_checkpoint_resume_continues_the_identical_trajectory(name):
    def make(model):
        generator = torch.Generator().manual_seed(3)
        kwargs = {"generator": generator} if registry.METHODS[name].random else {}
        opt = ALL[name](model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, **kwargs)
        return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    batches = [data_for(cnn(0), 7, seed=t) for t in range(6)]
    straight = cnn(7)
    opt, sched = make(straight)
    for batch in batches:
        opt.step(logits_closure(straight), batch)
        sched.step()

    resumed = cnn(7)
    opt, sched = make(resumed)
    for batch in batches[:3]:
        opt.step(logits_closure(resumed), batch)
        sched.step()
    buffer = io.BytesIO()
    torch.save({"model": resumed.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=False)
    fresh = cnn(99)
    fresh.load_state_dict(checkpoint["model"])
    opt, sched = make(fresh)
    opt.load_state_dict(checkpoint["opt"])
    sched.load_state_dict(checkpoint["sched"])
    assert opt.step_count == 3
    for batch in batches[3:]:
        opt.step(logits_closure(fresh), batch)
        sched.step()
    assert_close_models(straight, fresh, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["FT", "UJ"])
def test_seeded_generators_give_identical_steps_and_different_seeds_differ(name):
    models = [mlp(8) for _ in range(3)]
    opts = [PENALIZED[name](m.parameters(), lr=0.1, micro_batch_size=2, penalty=1.0,
                            generator=torch.Generator().manual_seed(seed)) for m, seed in zip(models, [1, 1, 2])]
    x, y = data_for(models[0], 6)
    torch.manual_seed(0)
    opts[0].step(logits_closure(models[0]), (x, y))
    torch.manual_seed(1)  # the global RNG plays no part when a generator is given
    opts[1].step(logits_closure(models[1]), (x, y))
    opts[2].step(logits_closure(models[2]), (x, y))
    assert_close_models(models[0], models[1], rtol=0, atol=0)
    assert not torch.equal(opts[0].stats.penalty, opts[2].stats.penalty)


def test_scheduler_param_groups_and_hooks():
    model = mlp(9)
    opt = regopt.GradNormSGD(model[0].parameters(), lr=1.0, micro_batch_size=2, penalty=0.1)
    opt.add_param_group({"params": model[2].parameters(), "lr": 0.0})
    calls = []
    opt.register_step_pre_hook(lambda *a: calls.append("pre"))
    opt.register_step_post_hook(lambda *a: calls.append("post"))
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.5)
    before = model[2].weight.detach().clone()
    opt.step(loss_closure(model), data_for(model, 4))
    scheduler.step()
    assert calls == ["pre", "post"]
    assert opt.param_groups[0]["lr"] == 0.5
    assert torch.equal(model[2].weight, before)  # lr 0 group untouched
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_micro_batch_graph_is_freed_before_the_next_forward():
    model = cnn(10)
    alive = []

    def closure(x, y):
        assert all(ref() is None for ref in alive), "a previous micro-batch's graph is still alive"
        logits = model(x)
        alive.append(weakref.ref(logits))
        return F.cross_entropy(logits, y), logits

    for make in ALL.values():
        alive.clear()
        make(model.parameters(), lr=0.01, micro_batch_size=2).step(closure, data_for(model, 7))
        assert len(alive) == 4 and all(ref() is None for ref in alive)


def test_batchnorm_statistics_update_once_per_micro_batch():
    for method in ["exact", "finite_difference"]:
        model = cnn(11)
        opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, method=method)
        opt.step(loss_closure(model), data_for(model, 10))
        assert model[1].num_batches_tracked.item() == 4


# -- bad input: a specific error, and nothing changed ----------------------------------------------------

@pytest.mark.parametrize("kwargs,error,match", [
    ({"micro_batch_size": 0}, ValueError, "micro_batch_size"),
    ({"micro_batch_size": 2.0}, ValueError, "micro_batch_size"),
    ({"lr": -0.1}, ValueError, "Invalid learning rate: -0.1"),
    ({"lr": float("nan")}, ValueError, "Invalid learning rate: nan"),
    ({"lr": "0.1"}, TypeError, "Invalid learning rate"),
    ({"momentum": -1}, ValueError, "Invalid momentum value"),
    ({"momentum": float("inf")}, ValueError, "Invalid momentum value"),
    ({"weight_decay": -1e-4}, ValueError, "Invalid weight_decay value"),
    ({"weight_decay": float("nan")}, ValueError, "Invalid weight_decay value"),
    ({"penalty": -1.0}, ValueError, "Invalid penalty value"),
    ({"penalty": float("inf")}, ValueError, "Invalid penalty value"),
    ({"nesterov": True}, ValueError, "Nesterov momentum requires a momentum and zero dampening"),
    ({"method": "vmap"}, ValueError, "Invalid method"),
    ({"fd_eps": 0.0}, ValueError, "Invalid fd_eps"),
    ({"generator": 3}, TypeError, "generator must be a torch.Generator"),
    ({"max_grad_norm": -1.0}, ValueError, "Invalid max_grad_norm"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    arguments = {"lr": 0.1, "micro_batch_size": 2, "penalty": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        regopt.GradNormSGD(mlp(0).parameters(), **arguments)


def test_bad_kind_and_mode():
    with pytest.raises(ValueError, match="Invalid kind: 'frobenius'"):
        regopt.JacobianRegSGD(mlp(0).parameters(), micro_batch_size=2, penalty=0.1, kind="frobenius")
    with pytest.raises(ValueError, match="Invalid mode"):
        regopt.GraftedSGD(mlp(0).parameters(), micro_batch_size=2, mode="layerwise")
    with pytest.raises(TypeError, match="needs norms"):
        regopt.GraftedSGD(mlp(0).parameters(), micro_batch_size=2, mode="external")
    with pytest.raises(ValueError, match="only used with mode='external'"):
        regopt.GraftedSGD(mlp(0).parameters(), micro_batch_size=2, norms=[1.0])


@pytest.mark.parametrize("name", list(ALL))
def test_bad_step_input_changes_nothing(name):
    model = cnn(14)
    generator = {"generator": torch.Generator().manual_seed(0)} if registry.METHODS[name].random else {}
    opt = ALL[name](model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, **generator)
    x, y = data_for(model, 8)
    opt.step(logits_closure(model), (x, y))  # momentum buffers, .grad and step count now exist
    boom = RuntimeError("boom")

    def raising(x, y):
        raise boom

    calls = []

    def raises_on_second_call(x, y):
        calls.append(1)
        if len(calls) == 2:
            raise boom
        return logits_closure(model)(x, y)

    def nan_on_third(x, y):
        calls.append(1)
        loss, logits = logits_closure(model)(x, y)
        return (loss * float("nan") if len(calls) == 3 else loss), logits

    cases = [
        (lambda: opt.step(logits_closure(model)), TypeError, "needs a closure and a batch"),
        (lambda: opt.step(logits_closure(model), (x[:0], y[:0])), ValueError, "empty"),
        (lambda: opt.step(logits_closure(model), (x, "labels")), TypeError, r"batch\[1\] must be a Tensor"),
        (lambda: opt.step(logits_closure(model), (x, y[:5])), ValueError, r"batch\[0\]: 8, batch\[1\]: 5"),
        (lambda: opt.step(lambda x, y: 0.5, (x, y)), TypeError, "returned float"),
        (lambda: opt.step(lambda x, y: F.cross_entropy(model(x), y, reduction="none"), (x, y)), ValueError,
         "loss of shape"),
        (lambda: opt.step(lambda x, y: (F.cross_entropy(model(x), y), model(x)[0]), (x, y)), TypeError,
         "logits of shape"),
        (lambda: opt.step(raising, (x, y)), RuntimeError, "^boom$"),
        (lambda: opt.step(raises_on_second_call, (x, y)), RuntimeError, "^boom$"),
        (lambda: opt.step(nan_on_third, (x, y)), FloatingPointError,
         r"non-finite loss L_j \(nan\) on micro-batch 2 of 3 \(examples 6:8\)"),
    ]
    for call, error, match in cases:
        calls.clear()
        before = snapshot(model, opt)
        with pytest.raises(error, match=match) as info:
            call()
        if match == "^boom$":
            assert info.value is boom
        assert_same_state(before, snapshot(model, opt))


@pytest.mark.parametrize("name", ["FT", "AJ", "UJ"])
def test_logit_penalties_need_logits(name):
    model = mlp(15)
    opt = PENALIZED[name](model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1)
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=r"must return \(loss, logits\)"):
        opt.step(loss_closure(model), data_for(model, 4))
    assert_same_state(before, snapshot(model, opt))


def test_non_finite_penalty_names_the_term_and_micro_batch():
    model = mlp(16)
    opt = regopt.JacobianRegSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1)
    calls = []

    def closure(x, y):
        calls.append(1)
        logits = model(x)
        scaled = logits * (1e200 if len(calls) == 2 else 1.0)  # R_j overflows, the loss does not
        return F.cross_entropy(logits, y), scaled
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match=r"non-finite penalty R_j \(inf\) on micro-batch 1 of 3"):
        opt.step(closure, data_for(model, 5))
    assert_same_state(before, snapshot(model, opt))


def test_skip_nonfinite_skips_and_reports():
    model = mlp(17)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=2, penalty=0.1,
                             skip_nonfinite=True)
    opt.step(loss_closure(model), data_for(model, 4))
    before = snapshot(model, opt)
    loss = opt.step(lambda x, y: F.cross_entropy(model(x), y) * float("inf"), data_for(model, 4))
    assert opt.stats.skipped and not torch.isfinite(loss)
    assert_same_state(before, snapshot(model, opt))
    opt.step(loss_closure(model), data_for(model, 4))
    assert not opt.stats.skipped and opt.step_count == 2


def test_max_grad_norm_clips_the_applied_gradient():
    a, b = mlp(18), mlp(18)
    clipped = regopt.GradNormSGD(a.parameters(), lr=0.1, micro_batch_size=2, penalty=0.5, max_grad_norm=1e-3)
    free = regopt.GradNormSGD(b.parameters(), lr=0.1, micro_batch_size=2, penalty=0.5)
    batch = data_for(a, 6)
    clipped.step(loss_closure(a), batch)
    free.step(loss_closure(b), batch)
    norm = torch.stack(torch._foreach_norm([p.grad for p in a.parameters()])).norm()
    assert norm.item() == pytest.approx(1e-3, rel=1e-5)
    direction = torch.cat([p.grad.flatten() for p in b.parameters()])
    torch.testing.assert_close(torch.cat([p.grad.flatten() for p in a.parameters()]),
                               direction * (1e-3 / (direction.norm() + 1e-6)))


@requires_cuda
@pytest.mark.parametrize("name", list(ALL))
def test_no_host_sync_inside_the_micro_batch_loop_on_cuda(name):
    from regopt.engine import StepSetup, accumulate
    from regopt.batching import autocast_state, split_batch
    model = cnn(19).float().cuda()
    x, y = data_for(cnn(19), 12)
    opt = ALL[name](model.parameters(), lr=0.1, micro_batch_size=4)
    params = list(model.parameters())
    micro = split_batch((x.float().cuda(), y.cuda()), 4)
    torch.cuda.set_sync_debug_mode("error")
    try:
        setup = StepSetup(logits_closure(model), len(micro), params,
                          **opt._penalty_setup(params, None, autocast_state(params[0].device)))
        accumulate(setup, micro)
    finally:
        torch.cuda.set_sync_debug_mode("default")
