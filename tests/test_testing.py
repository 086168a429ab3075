"""regopt.testing: assert_matches_reference passes where the step is right, fails (with a readable table) where it
is not, and its hypothesis strategies compose into a property test; hypothesis stays optional."""

from __future__ import annotations

import dataclasses
import importlib
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import regopt
from regopt import penalties
from regopt.testing import assert_matches_reference, compare_with_reference
from support import cnn, data_for, mlp


def loss_fn(model, x, y):
    logits = model(x)
    return F.cross_entropy(logits, y), logits


def gn(params, **options):
    return regopt.GradNormSGD(params, lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.3, **options)


class NoisyGradSGD(torch.optim.SGD):
    """torch.optim.SGD that adds 1e-6 to every .grad before its update: a fast path perturbed from outside."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.add_(1e-6)
        return super().step(closure)


def test_a_correct_step_matches_and_the_model_is_left_alone():
    model = cnn(0)  # BatchNorm: running statistics compared too
    before = [t.clone() for t in model.state_dict().values()]
    comparison = assert_matches_reference(gn, model, loss_fn, data_for(model, 10), steps=2)
    assert comparison.ok and comparison.max_rel_err < 1e-12
    quantities = {row.quantity for row in comparison.rows}
    assert {"grad 0.weight", "param 4.bias", "buffer 1.running_var", "state 0.weight.momentum_buffer",
            "stats.penalty", "generator state"} <= quantities
    assert {row.step for row in comparison.rows} == {1, 2}
    assert "all" in comparison.table() and "comparisons match" in comparison.table()
    assert all(torch.equal(a, b) for a, b in zip(before, model.state_dict().values()))


def test_a_wrapper_around_adamw_is_compared_with_its_own_update_and_state():
    model = mlp(1)

    def make(params):
        return regopt.GradNorm(torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1), micro_batch_size=2, penalty=0.3)

    comparison = assert_matches_reference(make, model, loss_fn, data_for(model, 7), steps=3)
    assert {"state 0.weight.exp_avg", "state 0.weight.exp_avg_sq"} <= {row.quantity for row in comparison.rows}


def test_a_perturbed_update_fails_with_a_table_naming_step_and_tensor():
    model = mlp(2)
    made = []

    def make(params):  # the optimizer under test gets the noisy base; the reference's base is plain SGD
        base = (NoisyGradSGD if not made else torch.optim.SGD)(params, lr=0.1)
        made.append(base)
        return regopt.MicroBatch(base, micro_batch_size=2)

    with pytest.raises(AssertionError) as info:
        assert_matches_reference(make, model, loss_fn, data_for(model, 6), steps=2)
    table = str(info.value)
    assert "comparisons differ" in table and "rtol=1e-07" in table
    lines = [line for line in table.splitlines() if "DIFFERS" in line]
    assert any(line.split()[:3] == ["1", "grad", "0.weight"] for line in lines), table
    assert any(line.split()[:3] == ["2", "param", "2.bias"] for line in lines), table
    assert not any("stats.loss" in line and line.split()[0] == "1" for line in lines)  # step 1's loss is right


def test_a_silently_different_penalty_fails():
    model = mlp(3)

    def make(params):
        optimizer = gn(params)
        # the penalty's S_j is 1.01 L_j, still named grad_norm: R_j is off by 2 %
        optimizer._penalty = dataclasses.replace(penalties.GRAD_NORM,
                                                 scalar=lambda loss, logits, draw, mask=None: 1.01 * loss)
        return optimizer

    comparison = compare_with_reference(make, model, loss_fn, data_for(model, 9), steps=1)
    failing = {row.quantity for row in comparison.failures}
    assert "stats.penalty" in failing and "grad 0.weight" in failing
    assert "stats.loss" not in failing  # the loss itself is untouched
    penalty_row = next(row for row in comparison.rows if row.quantity == "stats.penalty")
    assert penalty_row.rel_err == pytest.approx(1.01**2 - 1, rel=1e-6)


def test_a_loss_fn_that_is_not_deterministic_between_calls_fails():
    model = mlp(4)
    calls = []

    def drifting_loss_fn(model, x, y):
        calls.append(None)
        logits = model(x)
        return F.cross_entropy(logits, y) * (1 + 1e-3 * len(calls)), logits

    with pytest.raises(AssertionError, match=r"step's return \(mean loss\)"):
        assert_matches_reference(gn, model, drifting_loss_fn, data_for(model, 9), steps=1)


def test_dropout_draws_the_same_masks_on_both_sides():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 4)).double()
    assert_matches_reference(gn, model, loss_fn, data_for(mlp(0), 9), steps=2)
    fd = assert_matches_reference(lambda p: gn(p, method="finite_difference", fd_eps=1e-7), model, loss_fn,
                                  data_for(mlp(0), 9), steps=2)
    assert fd.norm_wise and "as vectors" in fd.table()


def test_finite_differences_are_compared_as_vectors_and_fail_at_a_coarse_eps():
    model = mlp(6)
    batch = data_for(model, 9)
    assert_matches_reference(lambda p: gn(p, method="finite_difference", fd_eps=1e-7), model, loss_fn, batch)
    with pytest.raises(AssertionError, match="as one vector"):
        assert_matches_reference(lambda p: gn(p, method="finite_difference", fd_eps=0.3), model, loss_fn, batch)


def test_dict_batches_a_new_batch_per_step_and_every_method():
    model = mlp(7)

    def dict_loss_fn(model, inputs, labels):
        return loss_fn(model, inputs, labels)

    batches = lambda t: dict(zip(("inputs", "labels"), data_for(model, 8, seed=t)))  # noqa: E731
    for name, make in {
        "FT": lambda p: regopt.FisherTraceSGD(p, lr=0.1, micro_batch_size=3, penalty=0.2, penalty_micro_batches=2),
        "UJ": lambda p: regopt.JacobianRegSGD(p, lr=0.1, micro_batch_size=3, penalty=0.2, kind="unit"),
        "GRAFT-ext": lambda p: regopt.GraftedSGD(p, lr=0.1, micro_batch_size=3, mode="external", norms=[0.5, 2.0]),
    }.items():
        comparison = assert_matches_reference(make, model, dict_loss_fn, batches, steps=2)
        assert comparison.optimizer.stats.num_micro_batches == 3, name


def test_something_that_is_not_a_regopt_optimizer_is_refused():
    model = mlp(0)
    with pytest.raises(TypeError, match="not a regopt optimizer"):
        assert_matches_reference(lambda p: torch.optim.SGD(p, lr=0.1), model, loss_fn, data_for(model, 4))


# -- strategies ------------------------------------------------------------------------------------------
from regopt.testing.strategies import micro_batchings, parameter_groups, penalty_options  # noqa: E402


@settings(max_examples=15)
@given(micro=micro_batchings(max_micro_batches=3), groups=parameter_groups(4), options=penalty_options(3))
def test_the_strategies_compose_into_a_property_test(micro, groups, options):
    assert 1 <= micro.batch_size - (micro.num_micro_batches - 1) * micro.micro_batch_size <= micro.micro_batch_size
    model = mlp(8)
    params = list(model.parameters())
    assert [p for group in groups(params) for p in group["params"]] == params
    make = lambda p: regopt.GradNormSGD(groups(p), micro_batch_size=micro.micro_batch_size,  # noqa: E731
                                        fd_eps=1e-7, **options)
    assert_matches_reference(make, model, loss_fn, data_for(model, micro.batch_size), steps=2,
                             rtol=1e-9 if options["method"] == "exact" else 1e-4)


def _forget_modules(monkeypatch, prefix: str) -> None:
    for name in [name for name in sys.modules if name == prefix or name.startswith(prefix + ".")]:
        monkeypatch.delitem(sys.modules, name)


def test_hypothesis_is_optional_and_its_absence_is_named(monkeypatch):
    monkeypatch.setattr(regopt, "testing", sys.modules["regopt.testing"])  # put back after the re-import
    _forget_modules(monkeypatch, "regopt.testing")
    _forget_modules(monkeypatch, "hypothesis")
    monkeypatch.setitem(sys.modules, "hypothesis", None)  # import hypothesis now raises ImportError
    testing = importlib.import_module("regopt.testing")
    assert callable(testing.assert_matches_reference)
    with pytest.raises(ImportError, match=r"pip install 'regopt\[test\]'"):
        importlib.import_module("regopt.testing.strategies")


def test_the_documented_pytest_example_runs(monkeypatch):
    """docs/testing.md's example, with its model factory supplied by a stand-in module."""
    import re
    import types
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "testing.md").read_text()
    section = page[page.index("## Test regopt on your model"):]
    source = re.findall(r"```python\n(.*?)```", section, re.S)[0]
    assert len(source.strip().splitlines()) <= 18
    models = types.ModuleType("my_package.models")
    models.build_model = lambda num_classes: nn.Sequential(nn.Conv2d(3, 2, 5, stride=4), nn.Tanh(), nn.Flatten(),
                                                           nn.Linear(2 * 7 * 7, num_classes))
    monkeypatch.setitem(sys.modules, "my_package", types.ModuleType("my_package"))
    monkeypatch.setitem(sys.modules, "my_package.models", models)
    namespace: dict = {}
    exec(compile(source, "docs/testing.md", "exec"), namespace)
    namespace["test_gradnorm_on_my_model"]()
