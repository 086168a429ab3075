"""regopt's wrappers around a base torch.optim optimizer (MicroBatch, GradNorm, FisherTrace, JacobianReg, Grafted).

Each wrapper hands the base the gradient it computes (G + λP, G − λP in a maximize group, s · G/‖G‖ when
grafting, clipped to ``max_grad_norm``) and lets the base take its own update. Checked in float64 against the
literal loop of tests/naive_base.py (FT and UJ, which draw, against ``regopt.reference``) around a second copy
of the same base, for every torch.optim optimizer that updates from ``.grad`` and timm's Lamb and Lars; the
``*SGD`` classes bit for bit against the wrapper around torch.optim.SGD; resuming from ``torch.save``d state;
the param_groups, state, schedulers and hooks the wrapper shares with its base; and the bases it refuses.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import regopt
from regopt import reference, registry
from regopt.testing.strategies import ParameterGroups, micro_batchings, parameter_groups, sgd_options

from naive_base import naive_step
from strategies import MODELS
from support import assert_close_models, assert_nested_equal, cnn, data_for, logits_closure, loss_closure, mlp

BUILD = {"mlp": mlp, "cnn": lambda seed: cnn(seed, batch_norm=False), "cnn_bn": cnn}
LAMBDA = 0.3

# name -> (base class, its options besides lr / weight_decay / maximize, which each parameter group draws)
BASES = {
    "SGD-nesterov": (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    "SGD-fused": (torch.optim.SGD, {"momentum": 0.5, "fused": True}),
    "Adam": (torch.optim.Adam, {}),
    "Adam-fused": (torch.optim.Adam, {"fused": True}),
    "AdamW-amsgrad": (torch.optim.AdamW, {"amsgrad": True}),
    "AdamW-fused-amsgrad": (torch.optim.AdamW, {"fused": True, "amsgrad": True}),
    "NAdam": (torch.optim.NAdam, {"decoupled_weight_decay": True}),
    "RAdam": (torch.optim.RAdam, {}),
    "Adamax": (torch.optim.Adamax, {}),
    "RMSprop-centered-momentum": (torch.optim.RMSprop, {"momentum": 0.5, "centered": True}),
    "Adagrad": (torch.optim.Adagrad, {"lr_decay": 0.01}),
    "Adagrad-fused": (torch.optim.Adagrad, {"fused": True}),
    "Adadelta": (torch.optim.Adadelta, {}),
    "ASGD": (torch.optim.ASGD, {"t0": 1.0}),  # averaging from the second step on: the ax state moves
    "Rprop": (torch.optim.Rprop, {}),
}

# registry name -> naive_step's keyword arguments; the methods that draw (FT, UJ) step regopt.reference instead
NAIVE = {
    "LB": {},
    "GN": {"regularizer": "grad_norm", "penalty": LAMBDA},
    "AJ": {"regularizer": "average_jacobian", "penalty": LAMBDA},
    "GRAFT-iter": {"graft": True},
}
COMPARED = (*NAIVE, "FT", "UJ")
# Float64 round-off only: the two sides sum the same terms in another order. The largest relative difference
# seen over 2,250 drawn setups was 1.4e-12 (centered RMSprop, whose denominator √(v − m²) subtracts).
RTOL, ATOL = 1e-10, 1e-12


def wrap(name: str, base: torch.optim.Optimizer, **options) -> regopt.MicroBatch:
    """The registry's method ``name`` around ``base``, with λ = LAMBDA and ``options`` where the method takes them."""
    method = registry.method(name)
    return method.wrap(base, **method.keep({"penalty": LAMBDA, **options}))


def accepts(base_class: type, option: str) -> bool:
    return option in inspect.signature(base_class).parameters


@st.composite
def base_group_options(draw, base_class: type) -> dict:
    """One parameter group's lr, and weight decay and maximize where the base has them."""
    options = {"lr": draw(st.sampled_from([1e-3, 0.01, 0.1]))}
    if accepts(base_class, "weight_decay"):
        options["weight_decay"] = draw(st.sampled_from([0.0, 0.01]))
    if accepts(base_class, "maximize"):
        options["maximize"] = draw(st.booleans())
    return options


@st.composite
def wrapper_setups(draw, base_name: str) -> dict:
    """A model, k ≥ 2 micro-batches (a ragged tail or not), one or two parameter groups, a method, clipping."""
    base_class, options = BASES[base_name]
    batching = draw(micro_batchings())
    if "fused" not in options and accepts(base_class, "foreach"):
        options = {**options, "foreach": draw(st.booleans())}
    return {
        "model": draw(st.sampled_from(MODELS)), "seed": draw(st.integers(0, 2**16)),
        "micro_batch_size": batching.micro_batch_size, "batch": batching.batch_size,
        "groups": draw(parameter_groups(4, max_groups=2, options=base_group_options(base_class))),
        "base": (base_class, options), "method": draw(st.sampled_from(COMPARED)),
        "max_grad_norm": draw(st.sampled_from([None, 0.5])), "steps": draw(st.integers(2, 3)),
    }


def make_base(setup: dict, model: nn.Module) -> torch.optim.Optimizer:
    base_class, options = setup["base"]
    return base_class(setup["groups"](model.parameters()), **options)


def assert_same_base_state(fast: torch.optim.Optimizer, slow: torch.optim.Optimizer, fast_model: nn.Module,
                           slow_model: nn.Module) -> None:
    """The bases' per-parameter state (exp_avg, momentum_buffer, step, …) agree, parameter by parameter."""
    for p, q in zip(fast_model.parameters(), slow_model.parameters()):
        mine, theirs = fast.state.get(p, {}), slow.state.get(q, {})
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(value, theirs[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{key}: {m}")
            else:
                assert value == theirs[key], key


def run_both(setup: dict) -> None:
    """``setup["steps"]`` steps of the wrapper and of the naive loop (or regopt.reference) from one model."""
    fast_model = BUILD[setup["model"]](setup["seed"])
    slow_model = copy.deepcopy(fast_model)
    name, naive = setup["method"], NAIVE.get(setup["method"])
    clip = None if naive is None else setup["max_grad_norm"]  # regopt.reference does not clip
    base, slow = make_base(setup, fast_model), make_base(setup, slow_model)
    opt = wrap(name, base, micro_batch_size=setup["micro_batch_size"], max_grad_norm=clip,
               generator=torch.Generator().manual_seed(7))
    slow_generator = torch.Generator().manual_seed(7)
    for t in range(setup["steps"]):
        batch = data_for(fast_model, setup["batch"], seed=setup["seed"] + t)
        opt.step(logits_closure(fast_model), batch)
        if naive is None:
            reference.step(slow, logits_closure(slow_model), batch, micro_batch_size=setup["micro_batch_size"],
                           penalty=LAMBDA, generator=slow_generator, **registry.method(name).reference_options)
        else:
            naive_step(slow, slow_model, batch, micro_batch_size=setup["micro_batch_size"], max_grad_norm=clip, **naive)
        for p, q in zip(fast_model.parameters(), slow_model.parameters()):
            assert (p.grad is None) == (q.grad is None)
        assert_close_models(fast_model, slow_model, rtol=RTOL, atol=ATOL)
    assert_same_base_state(base, slow, fast_model, slow_model)
    if naive is None:  # the same draws, in the same order
        assert torch.equal(opt.generator.get_state(), slow_generator.get_state())


# -- 1. every base against the naive loop -------------------------------------------------------------------------

@pytest.mark.parametrize("base_name", list(BASES))
@settings(max_examples=10)
@given(data=st.data())
def test_wrapper_around_base_equals_the_naive_loop(base_name, data):
    """Parameters, buffers, which .grad are None, the base's state (and FT/UJ's generator) after every step."""
    run_both(data.draw(wrapper_setups(base_name), label="setup"))


def test_grafting_around_adam_hands_adam_the_grafted_gradient():
    """Adam renormalizes its step, but the wrapper still hands it s · G/‖G‖: the naive loop's Adam, step for step."""
    run_both({"model": "cnn_bn", "seed": 3, "micro_batch_size": 3, "batch": 11,
              "groups": ParameterGroups((2,), ({"lr": 0.01, "weight_decay": 0.01}, {"lr": 0.1, "maximize": True})),
              "base": (torch.optim.Adam, {}), "method": "GRAFT-iter", "max_grad_norm": None, "steps": 3})


# -- 2. the *SGD classes are the wrappers around torch.optim.SGD -------------------------------------------------

def regopt_options(name: str, clip: float | None) -> dict:
    """The options of method ``name`` in the comparisons below: FT and UJ draw from a generator seeded 3."""
    return registry.method(name).keep({"micro_batch_size": 3, "max_grad_norm": clip, "penalty": LAMBDA,
                                       "generator": torch.Generator().manual_seed(3), "norms": [0.7, 1.3, 0.2]})


@pytest.mark.parametrize("name", registry.NAMES)
@settings(max_examples=5)
@given(groups=parameter_groups(5, max_groups=2, options=sgd_options()),
       implementation=st.sampled_from([{}, {"foreach": True}, {"foreach": False}, {"fused": True}]),
       clip=st.sampled_from([None, 0.5]))
def test_sgd_class_is_bit_identical_to_the_wrapper_around_torch_sgd(name, groups, implementation, clip):
    ours, theirs = cnn(1), cnn(1)
    sgd_class = registry.build(name, groups(ours.parameters()), **implementation, **regopt_options(name, clip))
    wrapper = registry.wrap(name, torch.optim.SGD(groups(theirs.parameters()), **implementation),
                            **regopt_options(name, clip))
    for t in range(3):
        batch = data_for(ours, 8, seed=t)
        assert torch.equal(sgd_class.step(logits_closure(ours), batch), wrapper.step(logits_closure(theirs), batch))
        for p, q in zip([*ours.parameters(), *ours.buffers()], [*theirs.parameters(), *theirs.buffers()]):
            assert torch.equal(p, q)
            assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad)
    assert_nested_equal(sgd_class.state_dict(), wrapper.state_dict())


# -- 3. resuming from a saved state_dict ----------------------------------------------------------------------------

def adamw_wrapper(name: str, model: nn.Module, generator_seed: int | None):
    """``name`` around AdamW; FT draws from a generator seeded ``generator_seed``, or None: its own generator,
    seeded from torch.initial_seed() (which the model's builder just set)."""
    base = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05, amsgrad=True)
    generator = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
    return wrap(name, base, micro_batch_size=3, generator=generator)


@pytest.mark.parametrize("name, seeded", [("GN", False), ("FT", True), ("FT", False)])
def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(name, seeded, tmp_path):
    batches = [data_for(cnn(0), 7, seed=t) for t in range(4)]
    straight_model = cnn(0)
    straight = adamw_wrapper(name, straight_model, generator_seed=11 if seeded else None)
    for batch in batches:
        straight.step(logits_closure(straight_model), batch)

    first_model = cnn(0)
    first = adamw_wrapper(name, first_model, generator_seed=11 if seeded else None)
    for batch in batches[:2]:
        first.step(logits_closure(first_model), batch)
    torch.save({"model": first_model.state_dict(), "optimizer": first.state_dict()}, tmp_path / "checkpoint.pt")

    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    resumed_model = cnn(5)  # another initialization and another generator: the checkpoint must restore both
    resumed_model.load_state_dict(checkpoint["model"])
    resumed = adamw_wrapper(name, resumed_model, generator_seed=12 if seeded else None)
    resumed.load_state_dict(checkpoint["optimizer"])
    for batch in batches[2:]:
        resumed.step(logits_closure(resumed_model), batch)

    for p, q in zip(resumed_model.state_dict().values(), straight_model.state_dict().values()):
        assert torch.equal(p, q)
    assert_nested_equal(resumed.state_dict(), straight.state_dict())
    assert resumed.state_dict()["state"]["regopt"]["step"] == 4


# -- 4. what the wrapper shares with its base ---------------------------------------------------------------------

def gradnorm_adamw(model: nn.Module, **options):
    base = torch.optim.AdamW(model.parameters(), **{"lr": 0.01, **options})
    return base, regopt.GradNorm(base, micro_batch_size=3, penalty=LAMBDA)


def test_the_wrapper_is_an_optimizer_sharing_the_bases_groups_state_and_defaults():
    base, opt = gradnorm_adamw(mlp(0))
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.base is base
    assert opt.param_groups is base.param_groups
    assert opt.state is base.state
    assert opt.defaults is base.defaults


@pytest.mark.parametrize("scheduled", ["wrapper", "base"])
def test_a_scheduler_on_either_sets_the_lr_the_step_uses(scheduled):
    """StepLR(γ=0) drops lr to 0 after one step: SGD without momentum then leaves the parameters where they are."""
    model = mlp(0)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = regopt.GradNorm(base, micro_batch_size=3, penalty=LAMBDA)
    scheduler = torch.optim.lr_scheduler.StepLR(opt if scheduled == "wrapper" else base, step_size=1, gamma=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(loss_closure(model), data_for(model, 7))
    assert not all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # lr = 0.1 moved them
    scheduler.step()
    assert base.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 0.0
    after_first = [p.detach().clone() for p in model.parameters()]
    opt.step(loss_closure(model), data_for(model, 7, seed=1))
    assert all(torch.equal(a, p) for a, p in zip(after_first, model.parameters()))


def test_a_lambda_scheduler_on_the_wrapper_moves_the_bases_lr_every_step():
    model = mlp(0)
    base, opt = gradnorm_adamw(model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 ** t)
    for t in range(3):
        assert base.param_groups[0]["lr"] == pytest.approx(0.01 * 0.5 ** t)
        opt.step(loss_closure(model), data_for(model, 7, seed=t))
        scheduler.step()


@pytest.mark.parametrize("added_to", ["wrapper", "base"])
def test_a_group_added_to_either_is_seen_by_both_and_stepped(added_to):
    model = mlp(0)
    base = torch.optim.AdamW(model[0].parameters(), lr=0.01, weight_decay=0.05)
    opt = regopt.GradNorm(base, micro_batch_size=3, penalty=LAMBDA)
    (opt if added_to == "wrapper" else base).add_param_group({"params": list(model[2].parameters()), "lr": 0.1})
    assert len(opt.param_groups) == len(base.param_groups) == 2
    head = [p.detach().clone() for p in model[2].parameters()]
    opt.step(loss_closure(model), data_for(model, 7))
    for before, p in zip(head, model[2].parameters()):
        assert not torch.equal(before, p)
        assert base.state[p]["exp_avg"].abs().sum() > 0


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_clears_the_gradient_the_step_left(set_to_none):
    model = mlp(0)
    _, opt = gradnorm_adamw(model)
    opt.step(loss_closure(model), data_for(model, 7))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        assert p.grad is None if set_to_none else torch.equal(p.grad, torch.zeros_like(p))


def test_repr_names_the_wrapper_and_its_base():
    base, opt = gradnorm_adamw(mlp(0), weight_decay=0.05)
    text = repr(opt)
    assert text.startswith("GradNorm(") and "penalty=0.3" in text
    assert all(line.strip() in text for line in repr(base).splitlines())  # the base's repr, indented


def test_step_hooks_on_the_wrapper_and_on_the_base_fire_once_per_step():
    model = mlp(0)
    base, opt = gradnorm_adamw(model)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o)))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o, model[0].weight.grad is not None)))
    base.register_step_pre_hook(lambda o, args, kwargs: calls.append(("base pre", o)))
    base.register_step_post_hook(lambda o, args, kwargs: calls.append(("base post", o)))
    for t in range(2):
        opt.step(loss_closure(model), data_for(model, 7, seed=t))
    step = [("pre", opt), ("base pre", base), ("base post", base), ("post", opt, True)]
    assert calls == step + step


# -- 5. frozen and unused parameters -----------------------------------------------------------------------------

class PartlyTrained(nn.Module):
    """used → frozen (requires_grad=False) → logits; ``unused`` never enters the forward pass."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used, self.frozen, self.unused = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(torch.tanh(self.used(x)))


@pytest.mark.parametrize("name", registry.NAMES)
def test_frozen_and_unused_parameters_get_no_grad_no_state_and_no_weight_decay(name):
    model = PartlyTrained()
    base = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
    opt = wrap(name, base, micro_batch_size=3, generator=torch.Generator().manual_seed(0), norms=[0.5, 0.5])
    idle = [*model.frozen.parameters(), *model.unused.parameters()]
    for p in idle:  # a stale gradient from elsewhere must not reach AdamW either
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in idle]
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 4, (7,), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.step(logits_closure(model), (x, y))
    for p, was in zip(idle, before):
        assert p.grad is None and torch.equal(p, was) and len(base.state.get(p, {})) == 0
    for p in model.used.parameters():
        assert p.grad is not None and "exp_avg" in base.state[p]


# -- 6. bases the wrappers refuse ----------------------------------------------------------------------------------

def emptied(base: torch.optim.Optimizer, how: str) -> torch.optim.Optimizer:
    if how == "no groups":
        base.param_groups.clear()
    else:
        base.param_groups[0]["params"] = []
    return base


REFUSED = {  # name -> (a base for the parameters, the error, a pattern its message matches)
    "LBFGS": (lambda ps: torch.optim.LBFGS(ps), TypeError, r"LBFGS\.step needs closure"),
    "SparseAdam": (lambda ps: torch.optim.SparseAdam(ps), TypeError, "SparseAdam updates from sparse gradients"),
    "regopt SGD class": (lambda ps: regopt.GradNormSGD(ps, micro_batch_size=2, penalty=LAMBDA),
                         TypeError, "already a regopt optimizer"),
    "regopt wrapper": (lambda ps: regopt.MicroBatch(torch.optim.SGD(ps), micro_batch_size=2),
                       TypeError, "already a regopt optimizer"),
    "parameters": (lambda ps: iter(ps), TypeError, "must be a torch.optim.Optimizer"),
    "a module": (lambda ps: mlp(0), TypeError, "must be a torch.optim.Optimizer"),
    "no groups": (lambda ps: emptied(torch.optim.AdamW(ps), "no groups"), ValueError, "has no parameters"),
    "an empty group": (lambda ps: emptied(torch.optim.AdamW(ps), "an empty group"), ValueError, "has no parameters"),
}


@pytest.mark.parametrize("name", registry.NAMES)
@pytest.mark.parametrize("refused", list(REFUSED))
def test_a_base_the_wrapper_cannot_drive_is_refused(name, refused):
    make_base, error, pattern = REFUSED[refused]
    with pytest.raises(error, match=pattern):
        wrap(name, make_base(list(mlp(0).parameters())), micro_batch_size=2, norms=[1.0])


# -- 7. third-party bases: timm's Lamb and Lars ---------------------------------------------------------------------

@pytest.mark.parametrize("base_name", ["Lamb", "Lars"])
@pytest.mark.parametrize("name", ["GN", "GRAFT-iter"])
def test_timm_lamb_and_lars_wrapped_equal_the_naive_loop(base_name, name):
    timm_optim = pytest.importorskip("timm.optim")
    base_class = getattr(timm_optim, base_name)
    options = {"lr": 0.05, "weight_decay": 0.01} if base_name == "Lamb" else {"lr": 0.5, "momentum": 0.9}
    run_both({"model": "cnn_bn", "seed": 2, "micro_batch_size": 3, "batch": 8,
              "groups": ParameterGroups((1,), ({}, {"lr": options["lr"] / 2})), "base": (base_class, options),
              "method": name, "max_grad_norm": None, "steps": 2})
