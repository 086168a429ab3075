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
import torch.nn.functional as F
from hypothesis import HealthCheck, Verbosity, settings
from hypothesis import strategies as st

from regopt.testing.strategies import micro_batchings, parameter_groups, penalty_options

settings.register_profile("ci", print_blob=True, verbosity=Verbosity.normal, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

MODELS = ("mlp", "cnn", "cnn_bn")
BATCH_FORMS = ("tuple", "dict", "tensor")
LOSS_SCALES = (None, "dynamic", 1024.0, 3.0)  # 3: a scale that is not a power of two rounds


@st.composite
def setups(draw, penalized: bool) -> dict:
    """One optimizer setup; ``penalized`` adds the penalty's options (method, m)."""
    count, size, batch = draw(micro_batchings())
    setup = {
        "model": draw(st.sampled_from(MODELS)),
        "seed": draw(st.integers(0, 2**16)),
        "num_micro_batches": count,
        "micro_batch_size": size,
        "batch": batch,
        # consecutive slices of the parameter list (every test model has at least 4 parameters)
        "groups": draw(parameter_groups(4)),
        "penalty": 0.0,
        "method": "exact",
        "penalty_micro_batches": None,
    }
    if penalized:
        setup.update(draw(penalty_options(count)))
    return setup | {
        "max_grad_norm": draw(st.none() | st.sampled_from([0.05, 0.5, 5.0])),
        "loss_scale": draw(st.sampled_from(LOSS_SCALES)),
        "batch_form": draw(st.sampled_from(BATCH_FORMS)),
        "steps": draw(st.integers(1, 3)),
    }


def as_batch_form(x: torch.Tensor, y: torch.Tensor, form: str):
    """(x, y) as a tuple, a dict ``{"inputs", "labels"}`` or one tensor ``[x.flatten(1), y]``."""
    if form == "tuple":
        return x, y
    if form == "dict":
        return {"inputs": x, "labels": y}
    return torch.cat([x.flatten(1), y.to(x.dtype).unsqueeze(1)], dim=1)


def loss_fn_for_form(form: str, input_shape: tuple[int, ...]):
    """``loss_fn(model, x, y) -> (cross-entropy, logits)`` adapted to how ``as_batch_form`` packed the batch."""
    def loss_fn(model, x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    if form == "tuple":
        return loss_fn
    if form == "dict":
        return lambda model, inputs, labels: loss_fn(model, inputs, labels)
    return lambda model, t: loss_fn(model, t[:, :-1].reshape(-1, *input_shape), t[:, -1].long())
