"""benchmarks/models.py: architectures and output shapes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import models


def _has(model: nn.Module, kind: type) -> bool:
    return any(isinstance(m, kind) for m in model.modules())


def test_resnet18_cifar_shape_and_size():
    model = models.build_model("resnet18", num_classes=10)
    assert 11_100_000 < models.count_parameters(model) < 11_250_000  # the CIFAR ResNet-18's 11.17M
    assert isinstance(model.conv1, nn.Conv2d) and model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert not _has(model, nn.MaxPool2d) and _has(model, nn.BatchNorm2d)
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert models.build_model("resnet18", num_classes=100).linear.out_features == 100


def test_vgg11_has_no_batchnorm_or_dropout():
    model = models.build_model("vgg11", num_classes=10)
    assert not _has(model, nn.BatchNorm2d) and not _has(model, nn.Dropout)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 8
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg16_has_batchnorm():
    model = models.build_model("vgg16", num_classes=100, width_multiplier=0.125)
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    with torch.no_grad():
        assert model.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("widths", [(32, 64, 128), (4, 8)])
def test_small_cnn_28x28(widths):
    model = models.build_model("small-cnn", num_classes=10, in_channels=1, widths=widths)
    assert _has(model, nn.BatchNorm2d)
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    out.sum().backward()


def test_unknown_model():
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet50")
