"""Grad mode: a step under torch.no_grad() enables grad itself (as torch.optim.LBFGS does for its closure) and
takes the same step; under torch.inference_mode(), or with inference-tensor parameters, it is refused clearly."""

from __future__ import annotations

import copy

import pytest
import torch

from support import assert_same_state, cnn, data_for, logits_closure, snapshot
from test_drop_in import ALL, SGD_OPTIONS

NAMES = ["LB", "GN", "FT", "AJ", "UJ", "GN-fd"]


@pytest.mark.parametrize("name", NAMES)
def test_a_step_under_no_grad_is_the_step_under_grad(name):
    model = cnn(3)
    twin = copy.deepcopy(model)
    opt = ALL[name](model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    twin_opt = ALL[name](twin.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    for seed in range(2):
        batch = data_for(model, 7, seed=seed)
        twin_opt.step(logits_closure(twin), batch)
        with torch.no_grad():
            opt.step(logits_closure(model), batch)
            assert not torch.is_grad_enabled()  # the caller's mode is left as it was
    assert_same_state(snapshot(twin, twin_opt), snapshot(model, opt))
    if name != "LB":
        assert torch.equal(opt.stats.penalty, twin_opt.stats.penalty) and opt.stats.penalty > 0


@pytest.mark.parametrize("name", ["LB", "GN", "FT"])
def test_a_step_under_inference_mode_is_refused_and_changes_nothing(name):
    model = cnn(4)
    opt = ALL[name](model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    batch = data_for(model, 7)
    calls = []

    def loss_fn(x, y):
        calls.append(1)
        return logits_closure(model)(x, y)

    before = snapshot(model, opt)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inside torch.inference_mode\(\).*no_grad"):
        opt.step(loss_fn, batch)
    assert not calls
    assert_same_state(before, snapshot(model, opt))


def test_inference_tensor_parameters_are_refused_with_the_fix():
    with torch.inference_mode():
        model = cnn(5)
    opt = ALL["GN"](model.parameters(), micro_batch_size=3, **SGD_OPTIONS)
    with pytest.raises(RuntimeError, match="inference tensors .* outside inference_mode"):
        opt.step(logits_closure(model), data_for(model, 7))
