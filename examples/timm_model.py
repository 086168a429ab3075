"""regopt with a timm model: a small Vision Transformer on Fashion-MNIST, exact gradient-norm penalty.

    python examples/timm_model.py --steps 10

The exact penalty differentiates each micro-batch's gradient again (double backprop). timm's attention
uses PyTorch's fused scaled-dot-product kernels by default, which have no double backward, so regopt's
exact step refuses them with an error that names the switches. Either build the model with
``fused_attn=False`` (or set ``TIMM_FUSED_ATTN=0`` before importing timm), which keeps the paper's exact
penalty, or keep fused attention and use ``method="finite_difference"`` (a different regularizer on
ReLU/GELU networks: see benchmarks/RESULTS_fd.md). This example shows the error, then trains with the first.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from _common import accuracy, fashion_mnist

import regopt


def vit(fused_attn: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=28, patch_size=7, in_chans=1,
                              num_classes=10, embed_dim=64, depth=2, num_heads=2)
    for module in model.modules():  # timm's Attention blocks read this flag on every forward
        if hasattr(module, "fused_attn"):
            module.fused_attn = fused_attn
    return model


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--micro-batch-size", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    train, test = fashion_mnist()
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=False, drop_last=True)
    first = next(iter(loader))

    fused = vit(fused_attn=True)
    optimizer = regopt.GradNormSGD(fused.parameters(), lr=0.05, micro_batch_size=args.micro_batch_size, penalty=0.01)
    try:
        optimizer.step(lambda x, y: F.cross_entropy(fused(x), y), first)
        print("fused attention: the exact step ran (this PyTorch build has a double backward for it)")
    except RuntimeError as error:
        print(f"fused attention, method='exact': {str(error).splitlines()[0][:160]}...")

    model = vit(fused_attn=False)
    optimizer = regopt.GradNormSGD(model.parameters(), lr=0.05, momentum=0.9, micro_batch_size=args.micro_batch_size,
                                   penalty=0.01)
    for step, batch in zip(range(args.steps), loader):
        optimizer.step(lambda x, y: F.cross_entropy(model(x), y), batch)
        if (step + 1) % 5 == 0:
            stats = optimizer.stats.as_dict()
            print(f"step {step + 1}: loss {stats['loss']:.4f}, micro_grad_sq_norm {stats['micro_grad_sq_norm']:.4f}")
    result = {"steps": args.steps, "test_accuracy": accuracy(model, test), "loss": optimizer.stats.as_dict()["loss"]}
    print(f"fused_attn=False, method='exact': {args.steps} steps, test accuracy {result['test_accuracy']:.4f}")
    return result


if __name__ == "__main__":
    main()
