"""Hypothesis strategies for property tests of regopt optimizers on your model (needs the ``test`` extra).

Compose them in ``@given``::

    @given(mb=micro_batchings(), groups=parameter_groups(4), penalty=penalty_options())
    def test_gn(mb, groups, penalty):
        make = lambda params: regopt.GradNormSGD(groups(params), micro_batch_size=mb.micro_batch_size, **penalty)
        assert_matches_reference(make, model, loss_fn, batch_of(mb.batch_size))

| strategy | draws |
|---|---|
| :func:`micro_batchings` | k micro-batches of \\|M\\| examples, the last one ragged (1..\\|M\\|), B = (k − 1)\\|M\\| + tail |
| :func:`sgd_options` | one group's lr, momentum, dampening, nesterov (only with momentum), weight decay, maximize |
| :func:`penalty_options` | λ, the method (exact or finite differences), the penalty subset size m (or None) |
| :func:`parameter_groups` | a split of a model's parameter list into consecutive groups, each with its options |
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

try:
    from hypothesis import strategies as st
except ImportError as error:  # hypothesis is optional for regopt, required here
    raise ImportError(
        "regopt.testing.strategies needs hypothesis, which is not installed: install regopt's test extra, "
        "pip install 'regopt[test]' (or pip install hypothesis). regopt.testing.assert_matches_reference "
        "works without it"
    ) from error

import torch

METHODS = ("exact", "finite_difference")


class MicroBatching(NamedTuple):
    """k micro-batches of ``micro_batch_size`` examples in a batch of ``batch_size``, the last one possibly smaller."""

    num_micro_batches: int
    micro_batch_size: int
    batch_size: int


@st.composite
def micro_batchings(draw, min_micro_batches: int = 2, max_micro_batches: int = 5, max_micro_batch_size: int = 4,
                    ragged: bool = True) -> MicroBatching:
    """k in [min, max] micro-batches of |M| in [1, max] examples; the last holds 1..|M| (|M| if not ``ragged``)."""
    count = draw(st.integers(min_micro_batches, max_micro_batches))
    size = draw(st.integers(1, max_micro_batch_size))
    tail = draw(st.integers(1, size)) if ragged else size
    return MicroBatching(count, size, (count - 1) * size + tail)


@st.composite
def sgd_options(draw, lrs: Sequence[float] = (0.02, 0.05, 0.3), momenta: Sequence[float] = (0.0, 0.5, 0.9),
                weight_decays: Sequence[float] = (0.0, 1e-2)) -> dict[str, Any]:
    """One parameter group's torch.optim.SGD hyperparameters (nesterov only where SGD allows it)."""
    momentum = draw(st.sampled_from(momenta))
    nesterov = momentum > 0 and draw(st.booleans())
    return {
        "lr": draw(st.sampled_from(lrs)),
        "momentum": momentum,
        "dampening": 0.0 if nesterov or momentum == 0 else draw(st.sampled_from([0.0, 0.3])),
        "nesterov": nesterov,
        "weight_decay": draw(st.sampled_from(weight_decays)),
        "maximize": draw(st.booleans()),
    }


@st.composite
def penalty_options(draw, num_micro_batches: int | None = None, methods: Sequence[str] = METHODS,
                    min_penalty: float = 0.01, max_penalty: float = 1.0) -> dict[str, Any]:
    """``penalty`` (λ), ``method`` and ``penalty_micro_batches`` (None, or m in 1..k; 1..4 if k is not given)."""
    return {
        "penalty": draw(st.floats(min_penalty, max_penalty)),
        "method": draw(st.sampled_from(list(methods))),
        "penalty_micro_batches": draw(st.none() | st.integers(1, num_micro_batches or 4)),
    }


@dataclass(frozen=True)
class ParameterGroups:
    """A split of a parameter list at ``cuts`` into consecutive groups with ``options`` each; call it on the
    parameters (of any copy of the model) to get the groups for a torch.optim optimizer."""

    cuts: tuple[int, ...]
    options: tuple[dict[str, Any], ...]

    def __call__(self, params: Sequence[torch.Tensor]) -> list[dict[str, Any]]:
        params = list(params)
        bounds = [0, *self.cuts, len(params)]
        return [{"params": params[a:b], **options} for a, b, options in zip(bounds, bounds[1:], self.options)]


@st.composite
def parameter_groups(draw, num_params: int, max_groups: int = 3, options: st.SearchStrategy | None = None
                     ) -> ParameterGroups:
    """1..``max_groups`` consecutive groups of a list of ``num_params`` parameters (``len(list(model.parameters()))``),
    each with options drawn from ``options`` (default :func:`sgd_options`)."""
    count = draw(st.integers(1, max(1, min(max_groups, num_params))))
    cuts = draw(st.sets(st.integers(1, num_params - 1), min_size=count - 1, max_size=count - 1)) if count > 1 else set()
    chosen = options if options is not None else sgd_options()
    return ParameterGroups(tuple(sorted(cuts)), tuple(draw(chosen) for _ in range(count)))


__all__ = ["METHODS", "MicroBatching", "ParameterGroups", "micro_batchings", "parameter_groups", "penalty_options",
           "sgd_options"]
