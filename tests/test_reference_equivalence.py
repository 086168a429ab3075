"""Every optimizer equals regopt.reference (the paper's literal loop) in float64, over random setups.

A setup (tests/strategies.py) draws every option together: k ≥ 2 micro-batches, parameter groups
with their own maximize, momentum, nesterov and weight decay, exact or finite-difference penalty
gradients, the penalty on m of the k micro-batches, clipping, loss scaling, tuple/dict/tensor batches.
Clipping is torch.nn.utils.clip_grad_norm_ before SGD's update; loss scaling changes nothing in float64.
The comparison is regopt.testing.assert_matches_reference's (docs/testing.md).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regopt import registry
from regopt.testing import assert_matches_reference

from strategies import as_batch_form, loss_fn_for_form, setups
from support import cnn, data_for, mlp

EXTERNAL_NORMS = [0.7, 1.3, 0.2]  # GRAFT-ext's s at steps 0, 1, 2
FD_EPS = 1e-8  # ≈ √eps(float64): the forward difference's O(ε) error and its rounding, balanced
FD_RTOL = 1e-4  # 70× the largest ‖fd − exact‖ / ‖exact‖ seen over 600 drawn setups (1.4e-6)
BUILD = {"mlp": mlp, "cnn": lambda seed: cnn(seed, batch_norm=False), "cnn_bn": cnn}


def make_optimizer(name: str, params: list[torch.Tensor], setup: dict):
    """The optimizer ``name`` of ``setup`` on ``params``; a penalized one draws from a generator seeded with 7."""
    method = registry.method(name)
    options = {"micro_batch_size": setup["micro_batch_size"], "max_grad_norm": setup["max_grad_norm"],
               "loss_scale": setup["loss_scale"], "penalty": setup["penalty"], "method": setup["method"],
               "generator": torch.Generator().manual_seed(7), "fd_eps": FD_EPS,
               "penalty_micro_batches": setup["penalty_micro_batches"], "norms": EXTERNAL_NORMS}
    return method.build(setup["groups"](params), **method.keep(options))


@pytest.mark.parametrize("name", registry.NAMES)
@settings(max_examples=100)
@given(data=st.data())
def test_optimizer_equals_reference(name, data):
    """Elementwise to float64 round-off (exact); as vectors to FD_RTOL (finite differences: O(ε) in λ∇R_j).
    Every step's .grad, parameters, buffers and stats; at the end momentum buffers and the generator's state."""
    setup = data.draw(setups(penalized=name in registry.PENALIZED), label="setup")
    model = BUILD[setup["model"]](setup["seed"])
    input_shape = data_for(model, 1)[0].shape[1:]
    comparison = assert_matches_reference(
        lambda params: make_optimizer(name, params, setup), model, loss_fn_for_form(setup["batch_form"], input_shape),
        lambda t: as_batch_form(*data_for(model, setup["batch"], seed=setup["seed"] + t), setup["batch_form"]),
        steps=setup["steps"], rtol=1e-10 if setup["method"] == "exact" else FD_RTOL, atol=1e-12)
    assert comparison.optimizer.stats.num_micro_batches == setup["num_micro_batches"]
    compared = {row.quantity.split()[0] for row in comparison.rows}
    assert {"grad", "param", "stats.loss", "stats.penalty"} <= compared
    assert ("generator" in compared) == (name in registry.PENALIZED)
