"""Randomness without ``generator=``: a penalized optimizer draws from a generator of its own (seeded from
``torch.initial_seed()``, saved in ``state_dict()``), so that a resumed run reproduces the uninterrupted one; and a
failed or skipped step leaves the global RNG as it was (the closure's own draws, dropout, included)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from support import assert_same_state, data_for, logits_closure, mlp, snapshot


def _dropout_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 4)).double()


def _ft(model: nn.Module, **kwargs) -> regopt.FisherTraceSGD:
    return regopt.FisherTraceSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.5,
                                 penalty_micro_batches=2, **kwargs)


def test_fisher_trace_without_a_generator_resumes_the_uninterrupted_run():
    batches = [data_for(mlp(0), 9, seed=t) for t in range(4)]
    straight = mlp(1)
    torch.manual_seed(0)
    opt = _ft(straight)
    for batch in batches:
        opt.step(logits_closure(straight), batch)

    first = mlp(1)
    torch.manual_seed(0)
    first_opt = _ft(first)
    for batch in batches[:2]:
        first_opt.step(logits_closure(first), batch)
    checkpoint = copy.deepcopy({"model": first.state_dict(), "optimizer": first_opt.state_dict()})
    resumed = mlp(99)
    resumed.load_state_dict(checkpoint["model"])
    torch.manual_seed(123)  # a new process: another global RNG, another seed at construction
    resumed_opt = _ft(resumed)
    resumed_opt.load_state_dict(checkpoint["optimizer"])
    for batch in batches[2:]:
        resumed_opt.step(logits_closure(resumed), batch)
    assert_same_state(snapshot(straight, opt), snapshot(resumed, resumed_opt))


def test_the_seed_before_construction_fixes_the_draws():
    penalties = []
    for seed in (0, 0, 1):
        model = mlp(2)  # (seeds the global RNG itself)
        torch.manual_seed(seed)
        opt = _ft(model)
        opt.step(logits_closure(model), data_for(model, 9))
        penalties.append(opt.stats.penalty)
    assert torch.equal(penalties[0], penalties[1]) and not torch.equal(penalties[0], penalties[2])


def test_a_successful_step_does_not_draw_its_penalty_from_the_global_rng():
    model = mlp(3)
    opt = _ft(model)
    before = torch.get_rng_state()
    opt.step(logits_closure(model), data_for(model, 9))
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("generator", [None, "given"])
def test_a_failed_step_leaves_the_global_rng_as_it_was(generator):
    model = _dropout_model(4)
    opt = _ft(model, generator=torch.Generator().manual_seed(1) if generator else None)
    calls = []

    def loss_fn(x, y):  # draws dropout masks from the global RNG, then fails on the third micro-batch
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("planted failure")
        return logits_closure(model)(x, y)

    before, rng = snapshot(model, opt), torch.get_rng_state()
    with pytest.raises(RuntimeError, match="planted failure"):
        opt.step(loss_fn, data_for(model, 9))
    assert torch.equal(torch.get_rng_state(), rng)
    assert_same_state(before, snapshot(model, opt))


def test_a_skipped_step_leaves_the_global_rng_as_it_was():
    model = _dropout_model(5)
    opt = regopt.MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=3, skip_nonfinite=True)
    rng = torch.get_rng_state()
    opt.step(lambda x, y: F.cross_entropy(model(x), y) * float("nan"), data_for(model, 9))
    assert opt.stats.skipped and torch.equal(torch.get_rng_state(), rng)
