"""``opt.backward(loss_fn, batch)`` + ``opt.step()``: the gradient of ``step(loss_fn, batch)`` in ``.grad``, the
update apart, and every contract of the one-call form carried over."""

from __future__ import annotations

import pytest
import torch

import regopt
from regopt import registry
from support import assert_same_state, cnn, constructor, data_for, logits_closure, mlp, snapshot

NAMES = registry.NAMES  # LB, GN, FT, AJ, UJ and the grafts


def _pair(name: str, seed: int = 0, **options):
    """Two identical models with an optimizer each (the same generator seed for FT and UJ)."""
    models = [cnn(seed), cnn(seed)]
    make = constructor(name, penalty=0.1, norms=[0.5, 0.4, 0.3], seed=7)
    return models, [make(m.parameters(), lr=0.1, micro_batch_size=3, momentum=0.9, **options) for m in models]


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("name", NAMES)
def test_step_is_zero_grad_backward_and_step_bit_for_bit(name):
    (one, two), (opt_one, opt_two) = _pair(name, max_grad_norm=0.5)
    x, y = data_for(one, 8)
    for _ in range(3):
        loss_one = opt_one.step(logits_closure(one), (x, y))
        opt_two.zero_grad()
        loss_two = opt_two.backward(logits_closure(two), (x, y))
        assert opt_two.step() is None
        assert torch.equal(loss_one, loss_two) and _same(one, two)
        assert all(torch.equal(p.grad, q.grad) for p, q in zip(one.parameters(), two.parameters()))
    extras = [opt.state_dict()["state"]["regopt"] for opt in (opt_one, opt_two)]
    assert extras[0].keys() == extras[1].keys() and extras[0]["step"] == 3
    assert all(torch.equal(torch.as_tensor(extras[0][k]), torch.as_tensor(extras[1][k])) for k in extras[0])


@pytest.mark.parametrize("name", ["LB", "GN", "FT", "AJ", "UJ"])
def test_two_weighted_backward_calls_equal_one_on_the_concatenated_batch(name):
    (one, two), (opt_one, opt_two) = _pair(name)
    x, y = data_for(one, 12)
    opt_one.backward(logits_closure(one), (x, y))
    for part in (slice(0, 6), slice(6, 12)):  # micro-batches of 3: the halves split where the whole does
        opt_two.backward(logits_closure(two), (x[part], y[part]), weight=0.5)
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-12, atol=1e-14)
    opt_one.step(), opt_two.step()
    for p, q in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-12, atol=1e-14)


def test_backward_adds_to_grad_as_loss_backward_does():
    model = mlp(1)
    opt = regopt.GradNorm(torch.optim.AdamW(model.parameters(), lr=1e-3), micro_batch_size=2, penalty=0.1)
    x, y = data_for(model, 4)
    opt.backward(logits_closure(model), (x, y))
    once = [p.grad.clone() for p in model.parameters()]
    opt.backward(logits_closure(model), (x, y))
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-14, atol=0)
    assert opt.step_count == 0 and not opt.state[next(model.parameters())]  # nothing updated yet


@pytest.mark.parametrize("name", ["GRAFT-iter", "GRAFT-ext", "NGD"])
def test_grafting_refuses_to_accumulate_and_changes_nothing(name):
    (model, _), (opt, _) = _pair(name)
    x, y = data_for(model, 6)
    opt.backward(logits_closure(model), (x, y))
    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="grafting rescales a whole step's gradient"):
        opt.backward(logits_closure(model), (x, y))
    assert_same_state(before, snapshot(model, opt))
    opt.zero_grad()
    opt.backward(logits_closure(model), (x, y))  # after zero_grad it computes again


def test_a_failed_backward_changes_nothing():
    (model, _), (opt, _) = _pair("FT")
    x, y = data_for(model, 9)
    opt.backward(logits_closure(model), (x, y))
    calls = []

    def fails_on_the_second_micro_batch(x, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return logits_closure(model)(x, y)

    before = snapshot(model, opt)
    with pytest.raises(RuntimeError, match="^boom$"):
        opt.backward(fails_on_the_second_micro_batch, (x, y))
    assert_same_state(before, snapshot(model, opt))  # .grad, BatchNorm statistics and the generator included


def test_a_skipped_backward_leaves_grad_and_makes_the_next_step_a_no_op():
    (model, _), (opt, _) = _pair("GN", skip_nonfinite=True)
    x, y = data_for(model, 6)
    opt.backward(logits_closure(model), (x, y))
    before = snapshot(model, opt)

    def nonfinite(x, y):
        loss, logits = logits_closure(model)(x, y)
        return loss * float("nan"), logits

    opt.backward(nonfinite, (x, y))
    assert opt.stats.skipped
    assert_same_state(before, snapshot(model, opt))
    opt.step()
    assert_same_state(before, snapshot(model, opt))  # no update, no step counted
    opt.zero_grad()
    opt.backward(logits_closure(model), (x, y))
    opt.step()
    assert opt.step_count == 1 and not all(torch.equal(a, b) for a, b in zip(before["params"], model.parameters()))


def test_dynamic_loss_scale_halves_at_the_step_after_a_skipped_backward():
    (model, _), (opt, _) = _pair("GN", loss_scale="dynamic")
    x, y = data_for(model, 6)
    start = opt.current_loss_scale

    def nonfinite(x, y):
        loss, logits = logits_closure(model)(x, y)
        return loss * float("inf"), logits

    opt.backward(nonfinite, (x, y))
    assert opt.current_loss_scale == start  # the scale changes with the update it belongs to
    opt.step()
    assert opt.current_loss_scale == start / 2 and opt.step_count == 0


def test_step_without_backward_is_the_bases_update_from_grad():
    """As torch.optim: whatever .grad holds (here a plain loss.backward()), clipped by max_grad_norm."""
    ours, theirs = mlp(2), mlp(2)
    opt = regopt.MicroBatch(torch.optim.AdamW(ours.parameters(), lr=1e-2), micro_batch_size=4, max_grad_norm=0.1)
    reference = torch.optim.AdamW(theirs.parameters(), lr=1e-2)
    x, y = data_for(ours, 8)
    for model in (ours, theirs):
        logits_closure(model)(x, y)[0].backward()
    torch.nn.utils.clip_grad_norm_(list(theirs.parameters()), 0.1)
    opt.step()
    reference.step()
    assert all(torch.equal(p, q) for p, q in zip(ours.parameters(), theirs.parameters()))


@pytest.mark.parametrize("call, error, match", [
    (lambda opt, fn, b: opt.backward(None, b), TypeError, "loss_fn must be callable"),
    (lambda opt, fn, b: opt.backward(fn, None), TypeError, "needs a batch"),
    (lambda opt, fn, b: opt.backward(fn, b, weight=-1.0), ValueError, "Invalid weight: -1.0"),
    (lambda opt, fn, b: opt.backward(fn, b, weight=float("nan")), ValueError, "Invalid weight: nan"),
])
def test_bad_backward_calls_are_refused_and_change_nothing(call, error, match):
    (model, _), (opt, _) = _pair("GN")
    batch = data_for(model, 6)
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        call(opt, logits_closure(model), batch)
    assert_same_state(before, snapshot(model, opt))
