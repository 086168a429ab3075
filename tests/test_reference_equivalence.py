"""Every optimizer equals regopt.reference (the paper's literal loop) in float64, over random setups.

A setup (tests/strategies.py) draws every option together: k ≥ 2 micro-batches, parameter groups
with their own maximize, momentum, nesterov and weight decay, exact or finite-difference penalty
gradients, the penalty on m of the k micro-batches, clipping, loss scaling, tuple/dict/tensor batches.
Clipping is torch.nn.utils.clip_grad_norm_ before SGD's update; loss scaling changes nothing in float64.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import regopt
from regopt import reference

from strategies import as_batch_form, closure_for_form, setups, split_into_groups
from support import cnn, data_for, logits_closure, mlp

# name -> (constructor, reference keyword arguments); every penalized optimizer gets a generator (the subset draw)
OPTIMIZERS = {
    "LB": (lambda params, **kw: regopt.MicroBatchSGD(params, **kw), {}),
    "GN": (lambda params, **kw: regopt.GradNormSGD(params, **kw), {"regularizer": "grad_norm"}),
    "FT": (lambda params, **kw: regopt.FisherTraceSGD(params, **kw), {"regularizer": "fisher_trace"}),
    "AJ": (lambda params, **kw: regopt.JacobianRegSGD(params, kind="average", **kw), {"regularizer": "average_jacobian"}),
    "UJ": (lambda params, **kw: regopt.JacobianRegSGD(params, kind="unit", **kw), {"regularizer": "unit_jacobian"}),
    "GRAFT-iter": (lambda params, **kw: regopt.GraftedSGD(params, mode="iterative", **kw), {"graft": "iterative"}),
    "GRAFT-ext": (lambda params, **kw: regopt.GraftedSGD(params, mode="external", norms=[0.7, 1.3, 0.2], **kw),
                  {"graft": "external"}),
    "NGD": (lambda params, **kw: regopt.GraftedSGD(params, mode="normalized", **kw), {"graft": "normalized"}),
}
PENALIZED = {"GN", "FT", "AJ", "UJ"}


class ClippingSGD(torch.optim.SGD):
    """torch.optim.SGD that first clips .grad to ``max_grad_norm`` (regopt's order: after grafting, before SGD)."""

    def __init__(self, params, max_grad_norm: float | None):
        super().__init__(params, lr=0.1)
        self.max_grad_norm = max_grad_norm

    def step(self, closure=None):
        if self.max_grad_norm is not None:
            params = [p for group in self.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        return super().step(closure)


FD_EPS = 1e-8  # ≈ √eps(float64): the forward difference's O(ε) error and its rounding, balanced
FD_RTOL = 1e-4  # 70× the largest ‖fd − exact‖ / ‖exact‖ seen over 600 drawn setups (1.4e-6)


def assert_close_tensors(got: list[torch.Tensor], want: list[torch.Tensor], method: str) -> None:
    """Elementwise to float64 round-off (exact); in norm to FD_RTOL (finite differences: O(ε) in λ∇R_j)."""
    assert len(got) == len(want)
    if method == "exact" or not got:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        return
    a, b = (torch.cat([t.reshape(-1) for t in tensors]) for tensors in (got, want))
    assert (a - b).norm() <= FD_RTOL * b.norm() + 1e-12, ((a - b).norm(), b.norm())


BUILD = {"mlp": mlp, "cnn": lambda seed: cnn(seed, batch_norm=False), "cnn_bn": cnn}


def build_pair(name: str, setup: dict):
    """(model, regopt optimizer, reference model, ClippingSGD) from one initialization."""
    make, _ = OPTIMIZERS[name]
    fast_model = BUILD[setup["model"]](setup["seed"])
    slow_model = copy.deepcopy(fast_model)
    options = {"micro_batch_size": setup["micro_batch_size"], "max_grad_norm": setup["max_grad_norm"],
               "loss_scale": setup["loss_scale"]}
    if name in PENALIZED:
        options.update(penalty=setup["penalty"], generator=torch.Generator().manual_seed(7), method=setup["method"],
                       fd_eps=FD_EPS, penalty_micro_batches=setup["penalty_micro_batches"])
    fast = make(split_into_groups(list(fast_model.parameters()), setup), **options)
    slow = ClippingSGD(split_into_groups(list(slow_model.parameters()), setup), setup["max_grad_norm"])
    return fast_model, fast, slow_model, slow


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@settings(max_examples=100)
@given(data=st.data())
def test_optimizer_equals_reference(name, data):
    setup = data.draw(setups(penalized=name in PENALIZED), label="setup")
    _, reference_kwargs = OPTIMIZERS[name]
    fast_model, fast, slow_model, slow = build_pair(name, setup)
    slow_generator = torch.Generator().manual_seed(7)
    rel = 1e-10 if setup["method"] == "exact" else FD_RTOL
    input_shape = data_for(fast_model, 1)[0].shape[1:]
    for t in range(setup["steps"]):
        batch = as_batch_form(*data_for(fast_model, setup["batch"], seed=setup["seed"] + t), setup["batch_form"])
        fast_loss = fast.step(closure_for_form(logits_closure(fast_model), setup["batch_form"], input_shape), batch)
        expected = reference.step(
            slow, closure_for_form(logits_closure(slow_model), setup["batch_form"], input_shape), batch,
            micro_batch_size=setup["micro_batch_size"], penalty=setup["penalty"], generator=slow_generator,
            graft_norm=[0.7, 1.3, 0.2][t], penalty_micro_batches=setup["penalty_micro_batches"], **reference_kwargs)
        stats = fast.stats
        assert not stats.skipped and stats.num_micro_batches == expected.num_micro_batches == setup["num_micro_batches"]
        for got, want in [(fast_loss, expected.loss), (stats.loss, expected.loss), (stats.penalty, expected.penalty),
                          (stats.micro_grad_sq_norm, expected.micro_grad_sq_norm),
                          (stats.grad_norm, expected.grad_norm)]:
            assert got.item() == pytest.approx(want, rel=rel, abs=1e-12)
        assert [p.grad is None for p in fast_model.parameters()] == [q.grad is None for q in slow_model.parameters()]
        assert_close_tensors([p.grad for p in fast_model.parameters() if p.grad is not None],
                             [q.grad for q in slow_model.parameters() if q.grad is not None], setup["method"])
        assert_close_tensors([*fast_model.parameters(), *fast_model.buffers()],
                             [*slow_model.parameters(), *slow_model.buffers()], setup["method"])
    buffers = [(fast.state[p].get("momentum_buffer"), slow.state[q].get("momentum_buffer"))
               for p, q in zip(fast_model.parameters(), slow_model.parameters())]
    assert [a is None for a, _ in buffers] == [b is None for _, b in buffers]
    assert_close_tensors([a for a, _ in buffers if a is not None], [b for _, b in buffers if b is not None],
                         setup["method"])
    if name in PENALIZED:  # the same draws, in the same order: the generators end in the same state
        assert torch.equal(fast.generator.get_state(), slow_generator.get_state())
