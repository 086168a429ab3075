"""What one optimizer step measured."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepStats:
    """Statistics of the last step, as 0-dim tensors on the parameters' device (no host sync).

    Attributes:
        loss: Σ_j w_j L_j, the mean loss over the batch.
        penalty: Σ_j w_j R_j, the regularizer without λ (zero for unpenalized optimizers).
        micro_grad_sq_norm: Σ_j w_j ‖g_j‖², the paper's "average micro-batch gradient norm"
            (squared, as the authors logged it), for every optimizer.
        grad_norm: ‖Σ_j w_j g_j‖, the norm of the large-batch loss gradient G (NaN in a distributed
            step with ``exact_grad_norm=False``, which all-reduces G + λP alone).
        num_micro_batches: k, the number of micro-batches in the step (all ranks together).
        skipped: whether the update was skipped because a term was non-finite.
    """

    loss: Tensor
    penalty: Tensor
    micro_grad_sq_norm: Tensor
    grad_norm: Tensor
    num_micro_batches: int
    skipped: bool = False

    @property
    def micro_grad_rms_norm(self) -> Tensor:
        """sqrt(Σ_j w_j ‖g_j‖²): the root-mean-square micro-batch gradient norm."""
        return torch.sqrt(self.micro_grad_sq_norm)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Every statistic as a Python float, keys prefixed by ``prefix``, for ``LightningModule.log_dict``,
        TensorBoard or W&B: ``loss``, ``penalty``, ``micro_grad_sq_norm``, ``micro_grad_rms_norm``,
        ``grad_norm``, ``num_micro_batches`` and ``skipped`` (1.0 or 0.0).

        One host sync (one device-to-host copy of the four tensors); the optimizer never calls it, so a step
        stays free of syncs: call it when you log, e.g. every N steps.
        """
        values = torch.stack([self.loss, self.penalty, self.micro_grad_sq_norm, self.grad_norm]).double().tolist()
        loss, penalty, micro_grad_sq_norm, grad_norm = values
        stats = {
            "loss": loss,
            "penalty": penalty,
            "micro_grad_sq_norm": micro_grad_sq_norm,
            "micro_grad_rms_norm": micro_grad_sq_norm**0.5 if micro_grad_sq_norm >= 0 else float("nan"),
            "grad_norm": grad_norm,
            "num_micro_batches": float(self.num_micro_batches),
            "skipped": float(self.skipped),
        }
        return {prefix + key: value for key, value in stats.items()}
