"""Reproduce the paper's experiments: small-batch vs large-batch SGD and the mechanisms that close the gap.

    python benchmarks/reproduce.py --preset quick            # the default: embedded Fashion-MNIST subset, every method
    python benchmarks/reproduce.py --preset fmnist --device cuda --seeds 3 --jobs 8 --time-budget 300
    python benchmarks/reproduce.py --preset fmnist --methods SB LB GN 'GN@λ=0.03' 'GN@λ=0.1' --seeds 2 --jobs 2
    python benchmarks/reproduce.py --preset cifar10-resnet18 --device cuda --seeds 3 --download
    torchrun --nproc_per_node=4 benchmarks/reproduce.py --preset cifar10-resnet18
    python benchmarks/reproduce.py --resume --out results/quick/20250101-120000

Methods (names used in tables, plots and metrics.csv; grammar ``BASE[@λ=VALUE][-|M|=SIZE]``):

| name | optimizer |
|---|---|
| ``SB`` | torch.optim.SGD on batches of |M| (small-batch SGD) |
| ``LB`` | regopt.MicroBatchSGD on batches of |B| (large-batch SGD, ghost BatchNorm over |M|) |
| ``GN`` ``FT`` ``AJ`` ``UJ`` | regopt.GradNormSGD / FisherTraceSGD / JacobianRegSGD(kind="average" / "unit") |
| ``GRAFT-iter`` | regopt.GraftedSGD(mode="iterative"), lr = SB's lr |
| ``GRAFT-ext`` | regopt.GraftedSGD(mode="external"), norms recorded from this run's SB run (same seed) |
| ``NGD`` | regopt.GraftedSGD(mode="normalized"), lr = SB's mean step length lr·mean_t ‖g_t‖ unless given |
| ``<NAME>@λ=<v>`` | a penalized method with λ = v (the λ sweep, e.g. ``GN@λ=0.03``; ``@lambda=`` also reads) |
| ``<NAME>-|M|=<n>`` | method NAME with micro-batch size n (the large-micro-batch sweep, e.g. ``GN-|M|=2560``) |

Penalty gradients are exact (double backprop, the paper's) unless ``--method finite_difference``.

Protocol (docs/method.md): the same initialization per seed for every method, constant lr, momentum 0
and weight decay 0 unless overridden, the same number of optimizer steps for every method,
held-out accuracy every ``eval_every`` steps, test accuracy of the best held-out checkpoint.
Runs that need SB's recorded norms (GRAFT-ext, NGD) run after SB, which is added if not asked for.

The code, one job per module (``benchmarks/repro/``): ``presets``/``config`` (what runs),
``methods`` (names → optimizers), ``training`` (one run's loop), ``evaluation`` (BatchNorm
recalibration, accuracy), ``driver`` (run order, --jobs, --resume, --time-budget, torchrun), ``folder``
(--out: new or empty unless --resume, locked while a run writes it), ``cli`` (the options, checked up front) and
``benchmarks/report.py`` (summary.md with mean ± std and intervals over seeds, curves.png, metrics.csv).
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.repro.cli import main, make_parser, script_main  # noqa: E402
from benchmarks.repro.config import build_config  # noqa: E402
from benchmarks.repro.evaluation import recalibrate_batchnorm  # noqa: E402
from benchmarks.repro.methods import BASE_METHODS, PENALIZED, MethodSpec, parse_method, run_order  # noqa: E402
from benchmarks.repro.presets import DEFAULTS, PRESETS  # noqa: E402
from benchmarks.repro.training import CheckpointError, Interrupted  # noqa: E402

__all__ = ["BASE_METHODS", "DEFAULTS", "PENALIZED", "PRESETS", "CheckpointError", "Interrupted", "MethodSpec",
           "build_config", "main", "make_parser", "parse_method", "recalibrate_batchnorm", "run_order", "script_main"]

if __name__ == "__main__":
    script_main()
