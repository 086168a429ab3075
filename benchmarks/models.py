"""Models of the reproduction benchmark.

- ``resnet18``: CIFAR ResNet-18 (3×3 stem, stride 1, no max-pool, BatchNorm; 11.2M parameters for 10 classes).
- ``vgg11``: VGG-11 without BatchNorm or dropout (conv stack + one linear layer), as in the paper.
- ``vgg16``: VGG-16 with BatchNorm.
- ``small-cnn``: a small BatchNorm CNN for 28×28 inputs (Fashion-MNIST): three 3×3 conv-BN-ReLU-maxpool
  blocks and a linear layer on the flattened 3×3 map.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

MODELS = ("resnet18", "vgg11", "vgg16", "small-cnn")


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3×3 stem conv (stride 1), no max-pool, four stages, global average pool."""

    def __init__(self, num_blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 10, in_channels: int = 3,
                 width: int = 64) -> None:
        super().__init__()
        self.in_planes = width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages = []
        for i, blocks in enumerate(num_blocks):
            stages.append(self._stage(width * 2**i, blocks, stride=1 if i == 0 else 2))
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(width * 2 ** (len(num_blocks) - 1), num_classes)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.linear(out)


def resnet18(num_classes: int = 10, in_channels: int = 3, width: int = 64) -> ResNet:
    return ResNet((2, 2, 2, 2), num_classes, in_channels, width)


VGG_CONFIGS = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
}


class VGG(nn.Module):
    """CIFAR VGG: 3×3 conv (+ optional BatchNorm) + ReLU stacks with max-pools, then one linear layer."""

    def __init__(self, config: str = "vgg11", num_classes: int = 10, in_channels: int = 3,
                 batch_norm: bool = False, width_multiplier: float = 1.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in VGG_CONFIGS[config]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out = max(1, int(v * width_multiplier))
            layers.append(nn.Conv2d(channels, out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(out))
            layers.append(nn.ReLU(inplace=True))
            channels = out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x)
        out = torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1)
        return self.classifier(out)


class SmallCNN(nn.Module):
    """conv-BN-ReLU-maxpool ×3 (28 → 14 → 7 → 3), flatten the 3×3 map, linear: for 28×28 inputs.

    The classifier sees the 3×3 spatial map (``pool_size``; other input sizes are average-pooled
    to it), not a global average: on Fashion-MNIST a global-average head trains much more slowly.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, widths: Sequence[int] = (32, 64, 128),
                 batch_norm: bool = True, pool_size: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers += [nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool_size = pool_size
        self.classifier = nn.Linear(channels * pool_size * pool_size, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = self.features(x)
        if out.shape[-2:] != (self.pool_size, self.pool_size):
            out = nn.functional.adaptive_avg_pool2d(out, self.pool_size)
        return self.classifier(torch.flatten(out, 1))


def build_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Model ``name`` (one of MODELS); ``kwargs`` go to its constructor (e.g. ``widths`` for small-cnn)."""
    if name == "resnet18":
        return resnet18(num_classes, in_channels, **kwargs)
    if name == "vgg11":
        return VGG("vgg11", num_classes, in_channels, batch_norm=False, **kwargs)
    if name == "vgg16":
        return VGG("vgg16", num_classes, in_channels, batch_norm=True, **kwargs)
    if name == "small-cnn":
        return SmallCNN(num_classes, in_channels, **kwargs)
    raise ValueError(f"unknown model {name!r} (expected one of {', '.join(MODELS)})")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
