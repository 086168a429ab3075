"""Shared by the examples: the Fashion-MNIST subset shipped in this repository, a small BatchNorm CNN, and the
optimizer (the gradient-norm penalty around SGD with momentum, or around AdamW).

Each example runs from the repository root (``python examples/plain_loop.py``) in well under a minute on
two CPU cores, with no download: the data is ``benchmarks/fashion_mnist_subset/`` (8,000 training images).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.data reads the embedded subset

from benchmarks.data import load_fashion_mnist_subset  # noqa: E402

import regopt  # noqa: E402

BASES = ("sgd", "adamw")


def fashion_mnist(train_size: int = 2048, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """(train, test) as float images normalized like Fashion-MNIST, the training set shuffled once by ``seed``
    (so a DataLoader with ``shuffle=False`` gives the same batches in every process, resumed or prepared)."""
    splits = load_fashion_mnist_subset(train_size=train_size)
    mean, std = splits.mean[0], splits.std[0]

    def tensors(split):
        return (split.images.float() / 255 - mean) / std, split.labels

    x, y = tensors(splits.train)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return TensorDataset(x[order], y[order]), TensorDataset(*tensors(splits.test))


def small_cnn(seed: int = 0) -> nn.Module:
    """Conv-BN-ReLU ×2, global pooling, a linear head: 10 classes from 1×28×28 images (about 1.6k parameters)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    )


def gradnorm_optimizer(params, base: str = "sgd", micro_batch_size: int = 64,
                       penalty: float = 0.01) -> regopt.GradNorm:
    """The gradient-norm penalty λ = ``penalty`` around ``base``: regopt computes the penalized gradient of
    each large batch, the base optimizer applies its own update with it. ``"sgd"``: SGD with momentum 0.9
    (``GradNormSGD`` is ``GradNorm(torch.optim.SGD(...))``); ``"adamw"``: torch.optim.AdamW, wrapped."""
    if base == "adamw":
        adamw = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.05)
        return regopt.GradNorm(adamw, micro_batch_size=micro_batch_size, penalty=penalty)
    if base != "sgd":
        raise ValueError(f"Invalid base: {base!r} (expected one of {', '.join(map(repr, BASES))})")
    return regopt.GradNormSGD(params, lr=0.1, momentum=0.9, micro_batch_size=micro_batch_size, penalty=penalty)


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    x, y = data.tensors
    correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct
