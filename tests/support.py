"""Shared test helpers: small float64 models, batches, closures and state comparison."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from regopt import registry

CLASSES = 4


def mlp(seed: int, width: int = 5, inputs: int = 3, outputs: int = CLASSES, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(inputs, width), act(), nn.Linear(width, outputs)).double()


def cnn(seed: int, batch_norm: bool = True, outputs: int = CLASSES, act: type[nn.Module] = nn.Tanh) -> nn.Module:
    """A 1×6×6 → ``outputs`` conv net (BatchNorm2d optional)."""
    torch.manual_seed(seed)
    # No conv bias before BatchNorm: its gradient is exactly zero in theory, pure roundoff in practice.
    layers = [nn.Conv2d(1, 3, 3, bias=not batch_norm)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(3))
    layers += [act(), nn.Flatten(), nn.Linear(3 * 4 * 4, outputs)]
    return nn.Sequential(*layers).double()


def float_cnn() -> nn.Module:
    """A float32 1×6×6 → 5 conv net with BatchNorm, for autocast and loss-scaling checks."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5))


def float_batch(size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(size, 1, 6, 6, generator=g), torch.randint(0, 5, (size,), generator=g)


def data_for(model: nn.Module, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    first = model[0]
    shape = (size, 1, 6, 6) if isinstance(first, nn.Conv2d) else (size, first.in_features)
    outputs = model[-1].out_features
    return torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(0, outputs, (size,), generator=g)


def loss_closure(model: nn.Module):
    return lambda x, y: F.cross_entropy(model(x), y)


def logits_closure(model: nn.Module):
    def closure(x, y):
        logits = model(x)
        return F.cross_entropy(logits, y), logits
    return closure


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Everything a failed step must leave alone: parameters, buffers, .grad, optimizer state.

    regopt's ``state_dict()`` carries the step count, the loss scale and the generator's state too.
    """
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "buffers": [b.clone() for b in model.buffers()],
        "state": copy.deepcopy(optimizer.state_dict()),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for a, b in zip(before["params"], after["params"]):
        assert torch.equal(a, b)
    for a, b in zip(before["grads"], after["grads"]):
        assert (a is None and b is None) or torch.equal(a, b)
    assert len(before["buffers"]) == len(after["buffers"])
    for a, b in zip(before["buffers"], after["buffers"]):  # BatchNorm running statistics included
        assert torch.equal(a, b), (a, b)
    assert_nested_equal(before["state"], after["state"])


def assert_unchanged(before: dict, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The step since ``before = snapshot(model, optimizer)`` changed nothing observable."""
    assert_same_state(before, snapshot(model, optimizer))


def assert_nested_equal(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), (a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_nested_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_nested_equal(x, y)
    else:
        assert a == b


def assert_close_models(a: nn.Module, b: nn.Module, rtol: float = 1e-10, atol: float = 1e-12) -> None:
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)
    for p, q in zip(a.buffers(), b.buffers()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


# -- devices -------------------------------------------------------------------------------------------
def device_params() -> list:
    """The devices a device-path test runs on: ``REGOPT_TEST_DEVICES`` (comma-separated, default "cpu,cuda");
    a CUDA device without CUDA skips."""
    names = os.environ.get("REGOPT_TEST_DEVICES", "cpu,cuda").split(",")
    return [pytest.param(torch.device(name), id=name,
                         marks=[pytest.mark.cuda, requires_cuda] if name.startswith("cuda") else [])
            for name in names]


# -- optimizers by name (regopt.registry) ----------------------------------------------------------------
VARIANTS = {"exact": "exact", "fd": "finite_difference", "finite_difference": "finite_difference"}  # method=


def constructor(name: str, *, penalty: float | None = None, norms=None, seed: int | None = None,
                device: torch.device | str = "cpu"):
    """constructor(params, **kw) of the regopt.registry method ``name``, with λ = ``penalty``, GRAFT-ext's
    ``norms`` and, for the methods that draw every step (FT, UJ), a fresh generator seeded ``seed`` on ``device``.

    ``name`` may end in a variant of ``VARIANTS`` ("GN-fd": ``method="finite_difference"``). The options a method
    does not take, given here or to the constructor, are left out (λ for LB, a generator for the grafts).
    """
    base, variant = (name, None) if name in registry.METHODS else name.rsplit("-", 1)
    entry = registry.method(base)
    fixed = dict(penalty=penalty, norms=norms, method=VARIANTS[variant] if variant else None)
    fixed = {k: v for k, v in fixed.items() if v is not None}

    def make(params, **options):
        drawn = {"generator": torch.Generator(device).manual_seed(seed)} if entry.random and seed is not None else {}
        return entry.build(params, **entry.keep({**fixed, **drawn, **options}))
    return make


def constructors(names, **fixed) -> dict:
    """name -> :func:`constructor` (name, **fixed), in the order of ``names``."""
    return {name: constructor(name, **fixed) for name in names}


# FT and UJ draw every step; the others draw nothing here (no penalty subsets).
RANDOM = [name for name, entry in registry.METHODS.items() if entry.random]
DETERMINISTIC = constructors(["LB", "GN-exact", "GN-finite_difference", "AJ-exact", "AJ-finite_difference",
                              "GRAFT-iter", "GRAFT-ext", "NGD"], penalty=0.3, norms=lambda t: 0.5 + t)


def every_optimizer(device: torch.device) -> dict:
    """name -> constructor for all optimizers, FT and UJ with a seeded generator on ``device``."""
    random = [f"{name}-{method}" for name in RANDOM for method in ("exact", "finite_difference")]
    return constructors([*DETERMINISTIC, *random], penalty=0.3, norms=lambda t: 0.5 + t, seed=5, device=device)


def on(device: torch.device, model: nn.Module, batch: tuple[torch.Tensor, ...]):
    """A copy of ``model`` and ``batch`` on ``device``."""
    return copy.deepcopy(model).to(device), tuple(t.to(device) for t in batch)


def assert_models_match(a: nn.Module, b: nn.Module, rtol: float, atol: float) -> None:
    """Parameters and buffers of two models (on any devices) agree."""
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def stats_vector(opt) -> torch.Tensor:
    s = opt.stats
    return torch.stack([s.loss, s.penalty, s.micro_grad_sq_norm, s.grad_norm]).cpu()
