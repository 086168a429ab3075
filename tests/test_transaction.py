"""A failed or skipped step changes nothing, module buffers included; buffer records see through torch.compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt.transaction import BufferRecord, StepTransaction, frozen_buffers
from support import (assert_close_models, assert_same_state, assert_unchanged, cnn, constructors, data_for,
                     logits_closure, loss_closure, snapshot)

OPTIMIZERS = constructors(["LB", "GN", "GN-fd", "FT", "UJ", "GRAFT-iter"], penalty=0.2, seed=0)


def _primed(name, **kwargs):
    model = cnn(0)
    opt = OPTIMIZERS[name](model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, **kwargs)
    opt.step(logits_closure(model), data_for(model, 7))
    return model, opt


def _nan_in_one_input(model, bad_micro_batch):
    x, y = data_for(model, 9, seed=3)
    x[3 * bad_micro_batch + 1, 0, 2, 2] = float("nan")
    return x, y


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("bad_micro_batch", [0, 2])
def test_a_skipped_step_leaves_batchnorm_statistics_alone(name, bad_micro_batch):
    model, opt = _primed(name, skip_nonfinite=True)
    before = snapshot(model, opt)
    opt.step(logits_closure(model), _nan_in_one_input(model, bad_micro_batch))
    assert opt.stats.skipped
    assert_unchanged(before, model, opt)  # running_mean became NaN for good before the fix
    model.eval()
    assert torch.isfinite(model(data_for(model, 4)[0])).all()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_a_refused_step_leaves_batchnorm_statistics_alone(name):
    model, opt = _primed(name)
    before = snapshot(model, opt)
    with pytest.raises(FloatingPointError, match="on micro-batch 1 of 3"):
        opt.step(logits_closure(model), _nan_in_one_input(model, 1))
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_exception_in_the_closure_mid_step_leaves_buffers_alone_and_propagates_unchanged(name):
    model, opt = _primed(name)
    before = snapshot(model, opt)
    calls, error = [], KeyError("data loader hiccup")

    def closure(x, y):
        calls.append(1)
        if len(calls) == 3:
            raise error
        return logits_closure(model)(x, y)
    with pytest.raises(KeyError) as info:
        opt.step(closure, data_for(model, 9))
    assert info.value is error
    assert_unchanged(before, model, opt)


def test_dynamic_loss_scale_skip_restores_buffers():
    model, opt = _primed("GN", loss_scale="dynamic")
    before = snapshot(model, opt)
    opt.step(lambda x, y: (F.cross_entropy(model(x), y) * float("inf"), model(x)), data_for(model, 7))
    assert opt.stats.skipped
    for a, b in zip(before["buffers"], model.buffers()):
        assert torch.equal(a, b)


# -- the records themselves --------------------------------------------------------------------------------------

def test_buffer_record_copies_once_recursively_and_puts_replaced_buffers_back():
    torch.manual_seed(0)
    inner = nn.BatchNorm1d(2)
    shared = nn.Sequential(nn.Linear(2, 2), inner)
    outer = nn.Sequential(shared, nn.Tanh(), shared)  # one BatchNorm, called twice
    original_mean = inner.running_mean
    before = [b.clone() for b in outer.buffers()]
    record = BufferRecord()
    with record.recording():
        outer(torch.randn(4, 2))
        inner.running_mean = torch.full((2,), 7.0)  # a module that replaces its buffer object
    assert inner.num_batches_tracked.item() == 2
    record.restore()
    assert inner.running_mean is original_mean
    for a, b in zip(before, outer.buffers()):
        assert torch.equal(a, b)


def test_frozen_buffers_restores_after_the_block_and_removes_its_hook():
    model = cnn(1)
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    before = [b.clone() for b in model.buffers()]
    with frozen_buffers():
        model(data_for(model, 4)[0])
        assert len(nn.modules.module._global_forward_pre_hooks) == hooks + 1
        assert model[1].num_batches_tracked.item() == 1
    assert len(nn.modules.module._global_forward_pre_hooks) == hooks
    for a, b in zip(before, model.buffers()):
        assert torch.equal(a, b)


def test_step_transaction_sets_grads_aside_and_rolls_back_everything():
    model = cnn(2)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.full_like(p, 3.0)
    grads = [p.grad for p in params]
    generator = torch.Generator().manual_seed(5)
    transaction = StepTransaction(params, generator)
    assert all(p.grad is None for p in params) and not transaction.grads_were_written()
    with transaction.buffers.recording():
        F.cross_entropy(model(data_for(model, 4)[0]), torch.zeros(4, dtype=torch.long)).backward()
    torch.rand(3, generator=generator)
    assert transaction.grads_were_written()
    transaction.rollback()
    assert all(p.grad is g for p, g in zip(params, grads))
    assert model[1].num_batches_tracked.item() == 0
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(5).get_state())


# -- torch.compile ----------------------------------------------------------------------------------------------

def _bn_model():
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))


@pytest.mark.parametrize("compile_how", ["torch.compile", "module.compile"])
def test_compiled_model_with_finite_differences_updates_batchnorm_once_per_micro_batch(compile_how):
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    eager, compiled = _bn_model(), _bn_model()
    if compile_how == "torch.compile":
        forward = torch.compile(compiled, backend="aot_eager")
    else:
        compiled.compile(backend="aot_eager")
        forward = compiled
    options = dict(lr=0.1, micro_batch_size=4, penalty=0.1, method="finite_difference")
    opts = [regopt.GradNormSGD(m.parameters(), **options) for m in (eager, compiled)]
    x, y = torch.randn(16, 3, generator=torch.Generator().manual_seed(0)), torch.arange(16) % 3
    graphs = []
    for t in range(4):
        opts[0].step(lambda a, b: F.cross_entropy(eager(a), b), (x, y))
        opts[1].step(lambda a, b: F.cross_entropy(forward(a), b), (x, y))
        graphs.append(counters["stats"]["unique_graphs"])
    assert compiled[1].num_batches_tracked.item() == 16  # 32 (twice per micro-batch) before the fix
    assert_close_models(eager, compiled, rtol=1e-4, atol=1e-5)  # running statistics included (float32)
    assert graphs[-1] == graphs[0] <= 1, graphs  # regopt's hooks recompiled module.compile() at every step
    if compile_how == "torch.compile":  # compiled inside a step, yet in one piece: the hook stays out of the graph
        assert graphs == [1] * 4 and not counters["graph_break"], (graphs, dict(counters["graph_break"]))


def test_a_failed_step_restores_the_buffers_of_a_compiled_model():
    torch._dynamo.reset()
    model = _bn_model()
    forward = torch.compile(model, backend="aot_eager")
    opt = regopt.MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=4, skip_nonfinite=True)
    x, y = torch.randn(12, 3, generator=torch.Generator().manual_seed(1)), torch.arange(12) % 3
    opt.step(lambda a, b: F.cross_entropy(forward(a), b), (x, y))
    before = [b.clone() for b in model.buffers()]
    x[9, 0] = float("nan")
    opt.step(lambda a, b: F.cross_entropy(forward(a), b), (x, y))
    assert opt.stats.skipped
    for a, b in zip(before, model.buffers()):
        assert torch.equal(a, b)
