"""Hypothesis strategies for whole optimizer setups, and the suite's hypothesis profiles.

A setup draws every option a step can take: the model, k ≥ 2 micro-batches (a ragged tail or
not), one to three parameter groups each with its own lr, momentum, dampening, nesterov, weight
decay and maximize, λ > 0, the differentiation method, the penalty subset size m, clipping, a
loss scale and the batch's form (tuple, dict or tensor).

The ``ci`` profile (loaded by tests/conftest.py for the whole suite) prints the failing example
and the blob that reproduces it (``@reproduce_failure``), and has no per-example deadline: a
loaded machine is slow, not wrong.
"""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import strategies as st

settings.register_profile("ci", print_blob=True, verbosity=Verbosity.normal, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

MODELS = ("mlp", "cnn", "cnn_bn")
BATCH_FORMS = ("tuple", "dict", "tensor")
LOSS_SCALES = (None, "dynamic", 1024.0, 3.0)  # 3: a scale that is not a power of two rounds


@st.composite
def group_options(draw) -> dict:
    """One parameter group's torch.optim.SGD hyperparameters (nesterov only where SGD allows it)."""
    momentum = draw(st.sampled_from([0.0, 0.5, 0.9]))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from([0.02, 0.05, 0.3])),
        "momentum": momentum,
        "dampening": 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.3])),
        "nesterov": nesterov,
        "weight_decay": draw(st.sampled_from([0.0, 1e-2])),
        "maximize": draw(st.booleans()),
    }


@st.composite
def micro_batching(draw) -> tuple[int, int, int]:
    """(k, |M|, B): k ≥ 2 micro-batches of |M| examples, the last one ragged (1..|M|)."""
    count = draw(st.integers(2, 5))
    size = draw(st.integers(1, 4))
    tail = draw(st.integers(1, size))
    return count, size, (count - 1) * size + tail


@st.composite
def setups(draw, penalized: bool) -> dict:
    """One optimizer setup; ``penalized`` adds the penalty's options (method, m)."""
    count, size, batch = draw(micro_batching())
    groups = draw(st.integers(1, 3))
    return {
        "model": draw(st.sampled_from(MODELS)),
        "seed": draw(st.integers(0, 2**16)),
        "num_micro_batches": count,
        "micro_batch_size": size,
        "batch": batch,
        # where the parameter list is cut into groups (every test model has at least 4 parameters)
        "group_cuts": sorted(draw(st.sets(st.integers(1, 3), min_size=groups - 1, max_size=groups - 1))),
        "groups": [draw(group_options()) for _ in range(groups)],
        "penalty": draw(st.floats(0.01, 1.0)) if penalized else 0.0,
        "method": draw(st.sampled_from(["exact", "finite_difference"])) if penalized else "exact",
        "penalty_micro_batches": draw(st.none() | st.integers(1, count)) if penalized else None,
        "max_grad_norm": draw(st.none() | st.sampled_from([0.05, 0.5, 5.0])),
        "loss_scale": draw(st.sampled_from(LOSS_SCALES)),
        "batch_form": draw(st.sampled_from(BATCH_FORMS)),
        "steps": draw(st.integers(1, 3)),
    }


def split_into_groups(params: list[torch.Tensor], setup: dict) -> list[dict]:
    """The parameter groups of ``setup``: consecutive slices of ``params`` with each group's options."""
    bounds = [0, *setup["group_cuts"], len(params)]
    return [{"params": params[a:b], **options} for a, b, options in zip(bounds, bounds[1:], setup["groups"])]


def as_batch_form(x: torch.Tensor, y: torch.Tensor, form: str):
    """(x, y) as a tuple, a dict ``{"inputs", "labels"}`` or one tensor ``[x.flatten(1), y]``."""
    if form == "tuple":
        return x, y
    if form == "dict":
        return {"inputs": x, "labels": y}
    return torch.cat([x.flatten(1), y.to(x.dtype).unsqueeze(1)], dim=1)


def closure_for_form(closure, form: str, input_shape: tuple[int, ...]):
    """``closure(x, y)`` adapted to how ``as_batch_form`` packed the batch."""
    if form == "tuple":
        return closure
    if form == "dict":
        return lambda inputs, labels: closure(inputs, labels)
    return lambda t: closure(t[:, :-1].reshape(-1, *input_shape), t[:, -1].long())
