"""regopt: large-batch SGD with the generalization of small-batch SGD.

Drop-in ``torch.optim.Optimizer`` wrappers around a base optimizer (SGD, AdamW, ...) that split
each batch into micro-batches and penalize the average micro-batch gradient norm (GN), the Fisher trace (FT) or the
Jacobian (AJ, UJ), or graft a small-batch step length onto the large-batch direction,
after Novack et al., "Disentangling the Mechanisms Behind Implicit Regularization in
SGD", ICLR 2023.
"""

from .closures import BatchClosure
from .grafting import Grafted, GradNormRecorder
from .optimizers import MicroBatch
from .penalized import FisherTrace, GradNorm, JacobianReg
from .sgd import FisherTraceSGD, GradNormSGD, GraftedSGD, JacobianRegSGD, MicroBatchSGD
from .stats import StepStats

__all__ = [
    "BatchClosure",
    "FisherTrace",
    "FisherTraceSGD",
    "GradNorm",
    "GradNormRecorder",
    "GradNormSGD",
    "Grafted",
    "GraftedSGD",
    "JacobianReg",
    "JacobianRegSGD",
    "MicroBatch",
    "MicroBatchSGD",
    "StepStats",
]
__version__ = "0.1.0"
