import math

import pytest
import torch

import regopt
from support import cnn, data_for, loss_closure


def test_stats_are_tensors_and_consistent():
    model = cnn(12)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=4, penalty=0.1)
    assert opt.stats is None
    loss = opt.step(loss_closure(model), data_for(model, 10))
    stats = opt.stats
    assert isinstance(stats, regopt.StepStats) and stats.num_micro_batches == 3 and not stats.skipped
    assert all(t.dim() == 0 and not t.requires_grad for t in (stats.loss, stats.penalty, stats.micro_grad_sq_norm,
                                                                stats.grad_norm))
    assert torch.equal(loss, stats.loss)
    # For GN the penalty is the tracked quantity itself, and Jensen: ‖G‖² ≤ Σ w ‖g_j‖².
    assert torch.equal(stats.penalty, stats.micro_grad_sq_norm)
    assert stats.grad_norm.item() ** 2 <= stats.micro_grad_sq_norm.item()
    assert stats.micro_grad_rms_norm.item() == pytest.approx(math.sqrt(stats.micro_grad_sq_norm.item()))
    with pytest.raises(AttributeError):
        stats.loss = loss
