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


def test_as_dict_gives_floats_for_loggers_with_a_prefix():
    model = cnn(13)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=4, penalty=0.1)
    opt.step(loss_closure(model), data_for(model, 10))
    stats = opt.stats
    logged = stats.as_dict(prefix="train/")
    assert list(logged) == ["train/" + k for k in ("loss", "penalty", "micro_grad_sq_norm", "micro_grad_rms_norm",
                                                   "grad_norm", "num_micro_batches", "skipped")]
    assert all(type(v) is float for v in logged.values())
    for key in ("loss", "penalty", "micro_grad_sq_norm", "grad_norm", "micro_grad_rms_norm"):
        assert logged["train/" + key] == pytest.approx(getattr(stats, key).item(), rel=1e-6)
    assert logged["train/num_micro_batches"] == 3.0 and logged["train/skipped"] == 0.0
    nan_norm = regopt.StepStats(stats.loss, stats.penalty, stats.micro_grad_sq_norm,
                                torch.tensor(float("nan")), 3, skipped=True)
    assert math.isnan(nan_norm.as_dict()["grad_norm"]) and nan_norm.as_dict()["skipped"] == 1.0
