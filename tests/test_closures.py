"""regopt/closures.py: the three spellings of a step (plain, keyword with a trainer's hook, BatchClosure), the
hook's place in the step, and the errors that say how to call ``step`` (the trainer's automatic-optimization
call included)."""

from __future__ import annotations

import copy

import pytest
import torch

import regopt
from support import assert_same_state, cnn, data_for, logits_closure, snapshot
from test_drop_in import ALL, SGD_OPTIONS


def _pair(name, seed=3):
    model = cnn(seed)
    twin = copy.deepcopy(model)
    return (model, ALL[name](model.parameters(), micro_batch_size=3, **SGD_OPTIONS),
            twin, ALL[name](twin.parameters(), micro_batch_size=3, **SGD_OPTIONS))


@pytest.mark.parametrize("name", list(ALL))
@pytest.mark.parametrize("spelling", ["keywords", "keywords with a hook", "BatchClosure"])
def test_every_spelling_takes_the_plain_step_bit_for_bit(name, spelling):
    model, opt, twin, twin_opt = _pair(name)
    for seed in range(2):
        batch = data_for(model, 7, seed=seed)
        opt.step(logits_closure(model), batch)
        fn = logits_closure(twin)
        if spelling == "keywords":
            twin_opt.step(batch=batch, loss_fn=fn)
        elif spelling == "keywords with a hook":
            twin_opt.step(lambda: None, batch=batch, loss_fn=fn)
        else:
            twin_opt.step(regopt.BatchClosure(fn, batch))
    assert_same_state(snapshot(model, opt), snapshot(twin, twin_opt))


@pytest.mark.parametrize("name", ["LB", "GN", "FT", "GRAFT-iter"])
def test_the_hook_runs_once_after_grad_is_written_and_before_the_update(name):
    model, opt, twin, twin_opt = _pair(name)
    batch = data_for(model, 7)
    before = [p.detach().clone() for p in model.parameters()]
    seen = []

    def hook():  # what Lightning's on_before_optimizer_step hooks would see
        seen.append(([p.detach().clone() for p in model.parameters()], [p.grad.clone() for p in model.parameters()],
                     opt.stats))
        return "ignored"

    loss = opt.step(hook, batch=batch, loss_fn=logits_closure(model))
    twin_opt.step(logits_closure(twin), batch)
    assert len(seen) == 1
    params_then, grads_then, stats_then = seen[0]
    assert all(torch.equal(a, b) for a, b in zip(params_then, before))  # not yet updated
    assert all(torch.equal(a, b.grad) for a, b in zip(grads_then, twin.parameters()))  # the applied gradient
    assert stats_then is opt.stats and torch.equal(loss, opt.stats.loss)  # this step's statistics
    assert_same_state(snapshot(model, opt), snapshot(twin, twin_opt))


@pytest.mark.parametrize("name", ["LB", "GN", "FT"])
def test_a_hook_that_raises_leaves_everything_as_before_the_step(name):
    model, opt, _, _ = _pair(name)
    opt.step(logits_closure(model), data_for(model, 7))
    before, stats = snapshot(model, opt), opt.stats

    def hook():
        raise RuntimeError("a callback failed")

    with pytest.raises(RuntimeError, match="a callback failed"):
        opt.step(hook, batch=data_for(model, 7, seed=1), loss_fn=logits_closure(model))
    assert_same_state(before, snapshot(model, opt))
    assert opt.stats is stats


def test_a_skipped_step_calls_the_hook_once_after_the_rollback():
    model = cnn(4)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, skip_nonfinite=True)
    opt.step(logits_closure(model), data_for(model, 7))
    before, calls = snapshot(model, opt), []

    def nonfinite(x, y):
        loss, logits = logits_closure(model)(x, y)
        return loss * float("inf"), logits

    opt.step(lambda: calls.append([None if p.grad is None else p.grad.clone() for p in model.parameters()]),
             batch=data_for(model, 7, seed=1), loss_fn=nonfinite)
    assert opt.stats.skipped and len(calls) == 1
    assert all(torch.equal(a, b) for a, b in zip(calls[0], before["grads"]))  # .grad as before the step
    after = snapshot(model, opt)
    assert all(torch.equal(a, b) for a, b in zip(after["params"], before["params"]))


def test_a_trainers_zero_argument_closure_without_a_batch_gets_the_recipe():
    model = cnn(5)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    before = snapshot(model, opt)

    def automatic_optimization_closure():  # what Lightning's automatic optimization passes
        raise AssertionError("must not be called")

    with pytest.raises(TypeError) as info:
        opt.step(automatic_optimization_closure)
    message = str(info.value)
    assert "zero-argument closure and no batch" in message and "automatic_optimization = False" in message
    assert "self.optimizers().step(batch=batch, loss_fn=" in message and "regopt.BatchClosure(" in message
    assert_same_state(before, snapshot(model, opt))


@pytest.mark.parametrize("call, match", [
    (lambda opt, fn, b: opt.step(fn), "needs a closure and a batch"),  # a micro-batch closure without the batch
    (lambda opt, fn, b: opt.step(loss_fn=fn), "loss_fn= but no batch="),
    (lambda opt, fn, b: opt.step(batch=b, loss_fn="not callable"), "loss_fn must be callable"),
    (lambda opt, fn, b: opt.step(3, batch=b, loss_fn=fn), "closure must be callable"),
    (lambda opt, fn, b: opt.step(lambda: fn(*b), b), "pass it by keyword"),  # Lightning's wrapped closure
    (lambda opt, fn, b: opt.step(regopt.BatchClosure(fn, b), b), "BatchClosure and also batch="),
    (lambda opt, fn, b: opt.step(regopt.BatchClosure(fn, b), loss_fn=fn), "BatchClosure and also batch="),
])
def test_mismatched_arguments_are_refused_with_the_right_spelling(call, match):
    model = cnn(6)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    before = snapshot(model, opt)
    with pytest.raises(TypeError, match=match):
        call(opt, logits_closure(model), data_for(model, 7))
    assert_same_state(before, snapshot(model, opt))


def test_calling_a_batch_closure_directly_says_where_it_belongs():
    model = cnn(7)
    with pytest.raises(TypeError, match="pass it to a regopt optimizer's step"):
        regopt.BatchClosure(logits_closure(model), data_for(model, 7))()


def test_a_closure_taking_star_args_is_still_a_micro_batch_closure():
    model, opt, twin, twin_opt = _pair("GN")
    batch = data_for(model, 7)
    opt.step(logits_closure(model), batch)
    twin_opt.step(lambda *parts: logits_closure(twin)(*parts), batch)
    assert_same_state(snapshot(model, opt), snapshot(twin, twin_opt))


def test_step_hooks_and_schedulers_see_the_keyword_spelling():
    model = cnn(8)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    seen = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(sorted(kwargs)))
    opt.step(batch=data_for(model, 7), loss_fn=logits_closure(model))
    scheduler.step()
    assert seen == [["batch", "loss_fn"]] and opt.param_groups[0]["lr"] == pytest.approx(0.05)


@pytest.mark.parametrize("call", [
    lambda opt, fn, b: opt.step(fn, b, loss_fn=fn),  # the same function twice
    lambda opt, fn, b: opt.step(lambda x, y: fn(x, y), b, loss_fn=fn),  # a second loss function, not a hook
    lambda opt, fn, b: opt.step(fn, batch=b, loss_fn=lambda x, y: fn(x, y)),
])
def test_a_loss_function_given_twice_is_refused_before_anything_runs(call):
    model = cnn(8)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    calls = []

    def fn(x, y):
        calls.append(1)
        return logits_closure(model)(x, y)

    before = snapshot(model, opt)
    with pytest.raises(TypeError, match="ambiguous") as info:
        call(opt, fn, data_for(model, 7))
    assert "step(loss_fn, batch)" in str(info.value) and "BatchClosure(loss_fn, batch)" in str(info.value)
    assert not calls
    assert_same_state(before, snapshot(model, opt))


def test_a_batch_given_first_names_the_accepted_spellings():
    model = cnn(9)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    batch = data_for(model, 7)
    with pytest.raises(TypeError, match=r"closure must be callable, got tuple\. Accepted: step\(loss_fn, batch\)"):
        opt.step(batch, logits_closure(model))
