"""Settings assigned after construction are checked with the constructor's message, and integral numbers of any
type (numpy integers) are taken where an int is expected, as torch.optim takes numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import regopt
from support import assert_same_state, cnn, data_for, logits_closure, snapshot

ASSIGNMENTS = [
    ("penalty_micro_batches", 0, "Invalid penalty_micro_batches: 0"),
    ("penalty_micro_batches", 1.5, "Invalid penalty_micro_batches: 1.5"),
    ("penalty_micro_batches", True, "Invalid penalty_micro_batches: True"),
    ("micro_batch_size", 0, "Invalid micro_batch_size: 0"),
    ("micro_batch_size", 2.0, "Invalid micro_batch_size: 2.0"),
    ("penalty", -1.0, "Invalid penalty value: -1.0"),
    ("penalty", float("nan"), "Invalid penalty value: nan"),
    ("fd_eps", 0, "Invalid fd_eps value: 0"),
    ("method", "exakt", "Invalid method: 'exakt'"),
    ("max_grad_norm", -1.0, "Invalid max_grad_norm value: -1.0"),
    ("loss_scale", 0, "Invalid loss_scale value: 0"),
]


def _optimizer(model, **kwargs):
    return regopt.GradNormSGD(model.parameters(), **{"lr": 0.1, "micro_batch_size": 3, "penalty": 0.3, **kwargs})


@pytest.mark.parametrize("name, value, message", ASSIGNMENTS)
def test_an_invalid_assignment_is_refused_as_the_constructor_refuses_it(name, value, message):
    model = cnn(3)
    opt = _optimizer(model)
    old = getattr(opt, name)
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(").replace(".", r"\.")) as assigned:
        setattr(opt, name, value)
    with pytest.raises(type(assigned.value), match=message.split(":")[0]):
        _optimizer(model, **{name: value})
    assert getattr(opt, name) == old
    before = snapshot(model, opt)
    opt.step(logits_closure(model), data_for(model, 7))  # still steps with the old, valid setting
    assert not all(torch.equal(a, b) for a, b in zip(before["params"], model.parameters()))


def test_numpy_integers_are_taken_as_ints_and_step_like_them():
    models = [cnn(4), cnn(4)]
    plain = _optimizer(models[0], penalty_micro_batches=2)
    numpy = regopt.GradNormSGD(models[1].parameters(), lr=0.1, micro_batch_size=np.int64(3), penalty=0.3,
                               penalty_micro_batches=np.int32(2))
    assert type(numpy.micro_batch_size) is int and type(numpy.penalty_micro_batches) is int
    numpy.micro_batch_size = np.int16(3)
    assert type(numpy.micro_batch_size) is int
    batch = data_for(models[0], 12)
    plain.step(logits_closure(models[0]), batch)
    numpy.step(logits_closure(models[1]), batch)
    assert_same_state(snapshot(models[0], plain), snapshot(models[1], numpy))


def test_a_valid_assignment_takes_effect():
    model = cnn(5)
    opt = _optimizer(model)
    opt.micro_batch_size = 7
    opt.step(logits_closure(model), data_for(model, 7))
    assert opt.stats.num_micro_batches == 1


def test_a_lightning_optimizer_proxy_reads_and_writes_the_optimizers_own_settings():
    """LightningOptimizer's class derives from the optimizer's: a setting read or written through it is the
    optimizer's (a write stored on the proxy alone would be silently ignored by the step)."""
    LightningOptimizer = pytest.importorskip("lightning.pytorch.core.optimizer").LightningOptimizer
    model = cnn(3)
    opt = _optimizer(model)
    proxy = LightningOptimizer(opt)
    assert proxy.penalty == 0.3 and proxy.micro_batch_size == 3 and proxy.method == "exact"
    proxy.penalty = 0.5
    proxy.micro_batch_size = 4
    assert opt.penalty == 0.5 and opt.micro_batch_size == 4
    with pytest.raises(ValueError, match="Invalid penalty value: -1"):
        proxy.penalty = -1
    assert opt.penalty == 0.5
