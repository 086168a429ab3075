"""The default process group is the world group *at step time*; ranks agree on which parameters a step updates.

Two gloo ranks on 127.0.0.1 (CPU, float64), spawned once for the module. Each rank builds its model and
optimizer *before* ``dist.init_process_group`` (the order a launcher that initializes late produces), then
steps on its shard of one batch; the test process computes the single-process steps to compare with.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import regopt
from dist_support import launch

WORLD = 2
SHARD = 4  # examples per rank; micro-batches of 2, so the ranks' micro-batches are the single process's
OPTIONS = dict(lr=0.1, momentum=0.9, weight_decay=0.1, micro_batch_size=2)


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    model.extra = nn.Parameter(torch.full((4,), 0.5, dtype=torch.float64))  # used by some micro-batches only
    return model


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD * SHARD, 3, generator=generator, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 1, 2, 3, 1])  # label 0 only in rank 0's first micro-batch
    return x, y


def _closure(model: nn.Module):
    def run(x, y):
        logits = model(x)
        if bool((y == 0).any()):  # a branch that only some micro-batches (and ranks) take
            logits = logits + model.extra
        return F.cross_entropy(logits, y), logits
    return run


def _flat(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def _steps(opt: regopt.MicroBatchSGD, model: nn.Module, batch, count: int = 2) -> list[float]:
    for _ in range(count):
        opt.step(_closure(model), batch)
    return _flat(model)


def _before_init(rank: int, world_size: int) -> dict:
    """Built before ``dist.init_process_group``: one optimizer with the default group, one with none."""
    default_model, alone_model = _model(), _model()
    default_opt = regopt.GradNormSGD(default_model.parameters(), penalty=0.2, **OPTIONS)
    alone_opt = regopt.GradNormSGD(alone_model.parameters(), penalty=0.2, process_group=None, **OPTIONS)
    return dict(default=(default_opt, default_model), alone=(alone_opt, alone_model),
                group_before_init=default_opt.process_group is None)


def _worker(rank: int, world_size: int, built: dict) -> dict:
    x, y = _batch()
    mine = (x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD])
    default_opt, default_model = built["default"]
    return {"group_before_init": built["group_before_init"],
            "group_at_step": default_opt.process_group is dist.group.WORLD,
            "default": _steps(default_opt, default_model, mine),
            "alone": _steps(*built["alone"], mine)}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    # tests/dist_support.py: file-store rendezvous, start-up barrier, per-rank stall check
    return launch(_worker, WORLD, tmp_path_factory.mktemp("default_group"), before_init=_before_init)


def _single_process(batch) -> list[float]:
    model = _model()
    opt = regopt.GradNormSGD(model.parameters(), penalty=0.2, process_group=None, **OPTIONS)
    return _steps(opt, model, batch)


def test_an_optimizer_built_before_init_process_group_shares_its_steps(ranks):
    expected = torch.tensor(_single_process(_batch()))  # the step on the concatenation of the shards
    for r in ranks:
        assert r["group_before_init"] and r["group_at_step"]
        torch.testing.assert_close(torch.tensor(r["default"]), expected, rtol=1e-10, atol=1e-12)
    assert ranks[0]["default"] == ranks[1]["default"]  # before the fix each rank trained alone and drifted


def test_a_parameter_one_rank_uses_is_updated_on_every_rank(ranks):
    # `extra` is reached on rank 0 only; rank 1 must still apply the reduced gradient, weight decay and momentum.
    extra = slice(-4, None)
    start = _flat(_model())[extra]
    for r in ranks:
        assert r["default"][extra] != start


def test_an_explicit_none_process_group_never_communicates(ranks):
    x, y = _batch()
    for rank, r in enumerate(ranks):
        own = (x[rank * SHARD:(rank + 1) * SHARD], y[rank * SHARD:(rank + 1) * SHARD])
        torch.testing.assert_close(torch.tensor(r["alone"]), torch.tensor(_single_process(own)), rtol=0, atol=0)
