"""The presets of the reproduction (the settings a user names with --preset) and the defaults under them.

Every preset trains its penalized methods with exact penalty gradients (the paper's double
backprop, ``grad_method="exact"``) unless ``--method finite_difference`` is given: on the ReLU
networks of every preset the finite difference is not the paper's penalty (benchmarks/RESULTS_fd.md).
"""

from __future__ import annotations

from typing import Any

from .methods import BASE_METHODS

_PAPER_PENALTIES = {"GN": 0.01, "FT": 0.01, "AJ": 1e-3, "UJ": 1e-3}

PRESETS: dict[str, dict[str, Any]] = {
    # Proves the pipeline end to end in minutes on 2 CPU cores; too short to show the paper's effect. Always the
    # embedded Fashion-MNIST subset (benchmarks/fashion_mnist_subset/), so it gives the same numbers everywhere.
    "quick": dict(
        description="embedded Fashion-MNIST subset, small BN CNN (8-16-32), every method, exact penalties; a pipeline "
                    "check (minutes on CPU), far too short to show the paper's effect",
        dataset="fashion-mnist-subset", model="small-cnn", model_kwargs={"widths": [8, 16, 32]},
        batch_size=256, micro_batch_size=32, steps=40, eval_every=5, eval_size=2000, test_size=2000,
        bn_recalibrate=4, seeds=1, cpu_threads=1,  # tiny ops: one thread beats two, and never oversubscribes
        methods=list(BASE_METHODS) + ["GN-|M|=128"],
        lr={"default": 0.1}, penalty=dict(_PAPER_PENALTIES),
    ),
    # The first 10,000 training images, so that SB trains ~38 epochs in 3,000 steps and LB reaches ~zero training
    # loss. Its SB−LB test gap is small and not established (+0.50 points, 95% interval over 3 seeds [-0.10, +1.10];
    # benchmarks/RESULTS_fmnist.md): this preset measures it, it does not promise more. Needs the full
    # Fashion-MNIST (see benchmarks/data.py for where it is looked for).
    "fmnist": dict(
        description="Fashion-MNIST (first 10,000 training images), BN CNN 16-32-64, |B|=1024, |M|=128, "
                    "lr 0.1, 3,000 steps: the calibrated small setting (see benchmarks/RESULTS_fmnist.md)",
        dataset="fashion-mnist", train_size=10_000, model="small-cnn", model_kwargs={"widths": [16, 32, 64]},
        batch_size=1024, micro_batch_size=128, steps=3000, eval_every=50, eval_size=None, test_size=None,
        bn_recalibrate=8, seeds=2,
        methods=["SB", "LB", "GN", "FT", "AJ", "UJ", "GRAFT-ext", "GN-|M|=1024"],
        lr={"default": 0.1}, penalty=dict(_PAPER_PENALTIES),
    ),
    # Scouted on an H200 (benchmarks/results/fmnist_h200_scout_gap/, table in benchmarks/RESULTS_fmnist.md): of five
    # one-change variants of `fmnist`, half the training images gave the largest held-out SB − LB gap per FLOP
    # (+0.34 points best held-out, +0.55 test, 4 seeds; neither interval excludes zero with evaluation noise).
    # Penalties at the λ the held-out accuracy of `fmnist` seeds 0-2 chose (GN) or the paper's (FT: never swept).
    "fmnist-5k": dict(
        description="Fashion-MNIST (first 5,000 training images), BN CNN 16-32-64, |B|=1024, |M|=128, lr 0.1, "
                    "3,000 steps: the scouted setting with the largest held-out SB-LB gap per FLOP",
        dataset="fashion-mnist", train_size=5_000, model="small-cnn", model_kwargs={"widths": [16, 32, 64]},
        batch_size=1024, micro_batch_size=128, steps=3000, eval_every=50, eval_size=None, test_size=None,
        bn_recalibrate=8, seeds=8, first_seed=100,
        methods=["SB", "LB", "GN", "FT", "GN-sub=2"],
        lr={"default": 0.1}, penalty={"GN": 0.01, "FT": 0.01, "AJ": 1e-3, "UJ": 1e-3},
    ),
    "cifar10-resnet18": dict(
        description="the paper's ResNet-18 / CIFAR-10 protocol and hyperparameters",
        dataset="cifar10", model="resnet18", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=list(BASE_METHODS) + ["GN-|M|=2560"],
        lr={"default": 0.1}, penalty={"GN": 0.01, "FT": 0.01, "AJ": 1e-3, "UJ": 1e-3},
        paper_test_acc={"SB": 92.64, "LB": 89.83, "GN": 91.75, "FT": 91.50, "AJ": 90.13, "UJ": 90.15,
                        "GRAFT-iter": 92.12, "GRAFT-ext": 92.16, "NGD": 92.10, "GN-|M|=2560": 65.09},
    ),
    "cifar100-resnet18": dict(
        description="the paper's ResNet-18 / CIFAR-100 protocol and hyperparameters",
        dataset="cifar100", model="resnet18", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=list(BASE_METHODS) + ["FT-|M|=2560"],
        lr={"default": 0.1, "LB": 0.5}, penalty={"GN": 0.01, "FT": 0.01, "AJ": 5e-5, "UJ": 1e-3},
        paper_test_acc={"SB": 71.31, "LB": 67.27, "GN": 70.65, "FT": 71.20, "AJ": 66.08, "UJ": 66.26,
                        "GRAFT-iter": 68.30, "GRAFT-ext": 68.40, "NGD": 66.83, "FT-|M|=2560": 64.89},
    ),
    "cifar10-vgg11": dict(
        description="the paper's VGG-11 (no BatchNorm) / CIFAR-10 protocol and hyperparameters",
        dataset="cifar10", model="vgg11", model_kwargs={},
        batch_size=5120, micro_batch_size=128, steps=5000, eval_every=20, eval_size=None, test_size=None,
        bn_recalibrate=0, seeds=1,
        methods=["SB", "LB", "GN", "FT", "AJ"],
        lr={"SB": 0.15, "default": 0.01}, penalty={"GN": 0.5, "FT": 0.5, "AJ": 2e-5},
        paper_test_acc={"SB": 78.19, "LB": 73.90, "GN": 77.62, "FT": 78.40, "AJ": 74.09},
    ),
}

DEFAULTS: dict[str, Any] = dict(
    momentum=0.0, weight_decay=0.0, grad_method="exact", checkpoint_every=None, eval_batch_size=1000,
    data_root=None, download=False, synthetic=None, paper_test_acc=None, train_size=None, heldout_size=None,
    cpu_threads=None, deterministic=True,
)
