"""Evaluation: held-out / test accuracy in eval mode, after recomputing BatchNorm statistics.

With ``bn_recalibrate = n > 0`` every BatchNorm's running statistics are first recomputed
(cumulative average, momentum=None) from n unaugmented training micro-batches of |M| examples,
so that evaluation does not depend on the last ~10 micro-batches' statistics, which at a high
learning rate lag behind the weights (worth +0.3 to +0.4 points of held-out accuracy on average
in the Fashion-MNIST probes, see benchmarks/RESULTS_fmnist.md). Training itself never reads
running statistics, so this changes what is measured, not the trajectory.

Under torchrun each rank's running statistics follow its own micro-batches. Recalibration draws
the same micro-batches on every rank (same seed), so the ranks agree after it; without it
(``bn_recalibrate = 0``), and before the --compare-bn-eval diagnostic, the floating-point buffers
are averaged over the ranks (:func:`regopt.distributed.average_buffers`, one all-reduce), so the
sharded evaluation sees every rank's statistics, the same on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from benchmarks import data as data_lib
from regopt.distributed import average_buffers

from .distributed import Dist, sum_across


def _bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, data: data_lib.DataSplits, num_batches: int, batch_size: int,
                          seed: int) -> None:
    """Recompute BatchNorm running statistics as the average over ``num_batches`` unaugmented training
    micro-batches of ``batch_size`` (the training BN batch size), drawn by ``seed``; same on every rank."""
    layers = _bn_layers(model)
    if not layers or num_batches <= 0:
        return
    momenta = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    was_training = model.training
    model.train()
    g = torch.Generator().manual_seed(seed)
    n = len(data.train)
    indices = torch.randperm(n, generator=g)[: num_batches * batch_size].to(data.device)
    for chunk in indices.split(batch_size):
        model(data.normalize(data.train.images[chunk]))
    for m, momentum in zip(layers, momenta):
        m.momentum = momentum
    model.train(was_training)


@torch.no_grad()
def evaluate(model: nn.Module, data: data_lib.DataSplits, split: str, batch_size: int, limit: int | None,
             ctx: Dist) -> float:
    """Accuracy on the first ``limit`` examples of ``split`` in eval mode (sharded over ranks)."""
    was_training = model.training
    model.eval()
    stats = torch.zeros(2, dtype=torch.float64, device=data.device)
    for i, (x, y) in enumerate(data.eval_batches(split, batch_size, limit)):
        if i % ctx.world_size != ctx.rank:
            continue
        stats[0] += (model(x).argmax(1) == y).sum()
        stats[1] += y.numel()
    stats = sum_across(stats, ctx)
    model.train(was_training)
    correct, total = stats.tolist()
    return correct / max(total, 1.0)


def heldout_accuracy(model: nn.Module, data: data_lib.DataSplits, config: Mapping[str, Any], micro_batch_size: int,
                     seed: int, step: int, ctx: Dist) -> tuple[float, float | None]:
    """Held-out accuracy at ``step`` after BatchNorm recalibration, and (with --compare-bn-eval) the accuracy
    with the running statistics training left (None otherwise)."""
    running_bn_acc = None
    if ctx.world_size > 1 and (config["bn_recalibrate"] <= 0 or config.get("compare_bn_eval")):
        average_buffers(model)  # every rank's running statistics, the same on every rank
    if config.get("compare_bn_eval") and config["bn_recalibrate"] > 0:  # calibration diagnostic
        running_bn_acc = evaluate(model, data, "heldout", config["eval_batch_size"], config["eval_size"], ctx)
    recalibrate_batchnorm(model, data, config["bn_recalibrate"], micro_batch_size, seed=1_000 * seed + step)
    return evaluate(model, data, "heldout", config["eval_batch_size"], config["eval_size"], ctx), running_bn_acc


def accuracy_on_test(model: nn.Module, data: data_lib.DataSplits, config: Mapping[str, Any], ctx: Dist) -> float:
    """Accuracy on the (first ``test_size`` examples of the) test split."""
    return evaluate(model, data, "test", config["eval_batch_size"], config.get("test_size"), ctx)
