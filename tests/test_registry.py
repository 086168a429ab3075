"""regopt.registry: every method builds in both forms and steps, and is the step regopt.reference names for it."""

from __future__ import annotations

import inspect

import pytest
import torch

import regopt
from regopt import reference, registry
from support import assert_close_models, data_for, logits_closure, mlp

SGD_OPTIONS = dict(lr=0.1, momentum=0.9)
GRAFT_NORM = 0.5


def _options(method: registry.Method, seed: int = 0) -> dict:
    """λ = 0.3, GRAFT-ext's s = 0.5 and a seeded generator, for the methods that take them."""
    return method.keep(dict(micro_batch_size=3, penalty=0.3, norms=[GRAFT_NORM] * 2,
                            generator=torch.Generator().manual_seed(seed)))


def test_the_table_holds_the_papers_methods_in_order():
    assert registry.NAMES == ("LB", "GN", "FT", "AJ", "UJ", "GRAFT-iter", "GRAFT-ext", "NGD")
    assert registry.PENALIZED == ("GN", "FT", "AJ", "UJ")
    assert registry.GRAFTS == ("GRAFT-iter", "GRAFT-ext", "NGD")
    assert [m.name for m in registry.METHODS.values()] == list(registry.NAMES)


@pytest.mark.parametrize("name", registry.NAMES)
def test_every_method_builds_and_steps_once(name):
    model = mlp(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = registry.build(name, model.parameters(), **SGD_OPTIONS, **_options(registry.METHODS[name]))
    assert isinstance(opt, registry.METHODS[name].cls) and isinstance(opt, torch.optim.Optimizer)
    loss = opt.step(logits_closure(model), data_for(model, 7))
    assert torch.isfinite(loss) and opt.stats.num_micro_batches == 3
    assert all(not torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert (opt.stats.penalty > 0) == registry.METHODS[name].penalized


@pytest.mark.parametrize("name", registry.NAMES)
def test_the_wrapper_form_around_torch_sgd_is_the_sgd_form_bit_for_bit(name):
    method = registry.METHODS[name]
    models = [mlp(1), mlp(1)]
    built = registry.build(name, models[0].parameters(), **SGD_OPTIONS, **_options(method))
    wrapped = registry.wrap(name, torch.optim.SGD(models[1].parameters(), **SGD_OPTIONS), **_options(method))
    assert isinstance(wrapped, method.wrapper) and not isinstance(wrapped, method.cls)
    for seed in (0, 1):
        batch = data_for(models[0], 7, seed=seed)
        built.step(logits_closure(models[0]), batch)
        wrapped.step(logits_closure(models[1]), batch)
    assert_close_models(models[0], models[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", registry.NAMES)
def test_each_method_steps_as_regopt_reference_with_its_reference_options(name):
    method = registry.METHODS[name]
    fast_model, slow_model = mlp(2), mlp(2)
    fast = method.build(fast_model.parameters(), **SGD_OPTIONS, **_options(method, seed=4))
    sgd = torch.optim.SGD(slow_model.parameters(), **SGD_OPTIONS)
    generator = torch.Generator().manual_seed(4)
    graft_norm = {"graft_norm": GRAFT_NORM} if name == "GRAFT-ext" else {}
    for seed in (0, 1):
        batch = data_for(fast_model, 7, seed=seed)
        fast.step(logits_closure(fast_model), batch)
        reference.step(sgd, logits_closure(slow_model), batch, micro_batch_size=3, penalty=0.3, generator=generator,
                       **method.reference_options, **graft_norm)
    assert_close_models(fast_model, slow_model, rtol=1e-10, atol=1e-12)


def test_reference_names_are_regopt_references_own():
    assert {m.regularizer for m in registry.METHODS.values()} == set(reference.REGULARIZERS)
    assert registry.METHODS["LB"].reference_options == {}
    assert registry.METHODS["AJ"].reference_options == {"regularizer": "average_jacobian"}
    assert registry.METHODS["NGD"].reference_options == {"graft": "normalized"}


@pytest.mark.parametrize("name", registry.PENALIZED)
def test_random_says_whether_a_step_with_the_full_penalty_draws(name):
    method = registry.METHODS[name]
    model = mlp(3)
    generator = torch.Generator().manual_seed(0)
    opt = method.build(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.3, generator=generator)
    before = generator.get_state()
    opt.step(logits_closure(model), data_for(model, 7))
    assert (not torch.equal(generator.get_state(), before)) == method.random


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.parametrize("form", ["cls", "wrapper"])
def test_takes_lists_the_options_each_form_has_beyond_the_first_order_ones(name, form):
    method = registry.METHODS[name]
    cls, first_order = (method.cls, regopt.MicroBatchSGD) if form == "cls" else (method.wrapper, regopt.MicroBatch)
    own = set(inspect.signature(cls).parameters) - set(inspect.signature(first_order).parameters) - set(method.options)
    if name in ("GRAFT-iter", "NGD"):
        own -= {"norms"}  # refused unless mode="external"
    assert own == set(method.takes)


def test_keep_leaves_out_only_the_options_of_other_methods():
    options = dict(lr=0.1, penalty=0.3, generator=None, norms=[1.0], misspelled=1)
    assert registry.METHODS["LB"].keep(options) == dict(lr=0.1, misspelled=1)
    assert registry.METHODS["GN"].keep(options) == dict(lr=0.1, penalty=0.3, generator=None, misspelled=1)
    assert registry.METHODS["GRAFT-ext"].keep(options) == dict(lr=0.1, norms=[1.0], misspelled=1)
    with pytest.raises(TypeError, match="misspelled"):  # what keep passes on still reaches the class
        registry.build("LB", mlp(0).parameters(), micro_batch_size=2, **registry.METHODS["LB"].keep(options))


def test_an_unknown_name_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown method 'SB': expected one of LB, GN, FT, AJ, UJ, GRAFT-iter"):
        registry.build("SB", mlp(0).parameters(), micro_batch_size=2)
    with pytest.raises(ValueError, match="unknown method 'GN-fd'"):
        registry.wrap("GN-fd", torch.optim.SGD(mlp(0).parameters()), micro_batch_size=2, penalty=0.1)


def test_a_method_option_cannot_be_overridden_silently():
    with pytest.raises(TypeError, match="multiple values for keyword argument 'kind'"):
        registry.build("AJ", mlp(0).parameters(), micro_batch_size=2, penalty=0.1, kind="unit")
    with pytest.raises(TypeError, match="multiple values for keyword argument 'mode'"):
        registry.wrap("NGD", torch.optim.SGD(mlp(0).parameters()), micro_batch_size=2, mode="iterative")
