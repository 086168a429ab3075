"""GraftedSGD: each mode's closed form, the zero-gradient case, and the external-norm round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import regopt
from support import assert_same_state, cnn, data_for, loss_closure, mlp, snapshot


def _micro_gradients(model, x, y, micro):
    """(G, [g_j]) computed by hand."""
    params = list(model.parameters())
    grads = [torch.autograd.grad(F.cross_entropy(model(x[i:i + micro]), y[i:i + micro]), params)
             for i in range(0, len(x), micro)]
    weights = [len(x[i:i + micro]) / len(x) for i in range(0, len(x), micro)]
    G = [sum(w * g[k] for w, g in zip(weights, grads)) for k in range(len(params))]
    return G, grads


def _norm(tensors):
    return torch.sqrt(sum((t ** 2).sum() for t in tensors))


@pytest.mark.parametrize("mode", ["iterative", "external", "normalized"])
def test_one_step_is_the_closed_form(mode):
    model = mlp(0)
    x, y = data_for(model, 7)
    G, micro_grads = _micro_gradients(model, x, y, 3)
    s = {"iterative": sum(_norm(g) for g in micro_grads) / len(micro_grads), "external": 0.37,
         "normalized": 1.0}[mode]
    before = [p.detach().clone() for p in model.parameters()]
    opt = regopt.GraftedSGD(model.parameters(), lr=0.2, micro_batch_size=3, mode=mode,
                            norms=[0.37] if mode == "external" else None)
    opt.step(loss_closure(model), (x, y))
    for p, p0, g in zip(model.parameters(), before, G):
        torch.testing.assert_close(p.detach(), p0 - 0.2 * s * g / _norm(G), rtol=1e-12, atol=1e-14)
    step = _norm([p.detach() - p0 for p, p0 in zip(model.parameters(), before)])
    assert step.item() == pytest.approx(0.2 * float(s), rel=1e-12)


def test_zero_gradient_gives_zero_step_not_nan():
    model = mlp(1)
    opt = regopt.GraftedSGD(model.parameters(), lr=0.2, micro_batch_size=2, mode="normalized")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda x, y: 0.0 * model(x).sum(), data_for(model, 4))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert opt.stats.grad_norm.item() == 0.0


def test_external_norms_running_out_raises_and_changes_nothing():
    model = mlp(2)
    opt = regopt.GraftedSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=2, mode="external",
                            norms=[1.0])
    batch = data_for(model, 4)
    opt.step(loss_closure(model), batch)
    before = snapshot(model, opt)
    with pytest.raises(IndexError, match=r"norms has 1 entries but step 1 needs norms\[1\]"):
        opt.step(loss_closure(model), batch)
    assert_same_state(before, snapshot(model, opt))


def test_external_norms_must_be_finite():
    model = mlp(2)
    opt = regopt.GraftedSGD(model.parameters(), lr=0.1, micro_batch_size=2, mode="external",
                            norms=lambda t: float("nan"))
    with pytest.raises(ValueError, match=r"Invalid norms\[0\]: nan"):
        opt.step(loss_closure(model), data_for(model, 4))


@pytest.mark.parametrize("small_batch", ["torch", "regopt"])
def test_external_norms_round_trip_from_a_recorded_small_batch_run(small_batch):
    sb_model = cnn(3)
    if small_batch == "torch":
        sb = torch.optim.SGD(sb_model.parameters(), lr=0.1)
    else:
        sb = regopt.MicroBatchSGD(sb_model.parameters(), lr=0.1, micro_batch_size=4)
    recorder = regopt.GradNormRecorder(sb)
    expected = []
    for t in range(3):
        x, y = data_for(sb_model, 4, seed=t)
        if small_batch == "torch":
            sb.zero_grad()
            F.cross_entropy(sb_model(x), y).backward()
            sb.step()
        else:
            sb.step(loss_closure(sb_model), (x, y))
        expected.append(_norm([p.grad for p in sb_model.parameters()]).item())
    recorder.remove()
    norms = recorder.norms()
    assert norms == pytest.approx(expected, rel=1e-12) and len(norms) == 3

    model = cnn(4)
    opt = regopt.GraftedSGD(model.parameters(), lr=0.1, micro_batch_size=4, mode="external", norms=norms)
    for t in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(loss_closure(model), data_for(model, 16, seed=10 + t))
        step = _norm([p.detach() - q for p, q in zip(model.parameters(), before)])
        assert step.item() == pytest.approx(0.1 * norms[t], rel=1e-10)
    assert opt.step_count == 3 and opt.state_dict()["state"]["regopt"]["step"] == 3


def test_recorder_with_no_steps():
    model = mlp(5)
    assert regopt.GradNormRecorder(torch.optim.SGD(model.parameters(), lr=0.1)).norms() == []


@pytest.mark.parametrize("kind", ["tensor", "numpy"])
def test_external_norms_accept_a_tensor_or_a_numpy_array(kind):
    import numpy as np
    recorded = [0.3, 0.6]
    norms = torch.tensor(recorded, dtype=torch.float64) if kind == "tensor" else np.array(recorded)
    model = mlp(6)
    opt = regopt.GraftedSGD(model.parameters(), lr=0.1, micro_batch_size=2, mode="external", norms=norms)
    for t in range(2):
        before = [p.detach().clone() for p in model.parameters()]
        opt.step(loss_closure(model), data_for(model, 4, seed=t))
        step = _norm([p.detach() - q for p, q in zip(model.parameters(), before)])
        assert step.item() == pytest.approx(0.1 * recorded[t], rel=1e-12)
    with pytest.raises(ValueError, match="norms must be one-dimensional"):
        regopt.GraftedSGD(model.parameters(), micro_batch_size=2, mode="external", norms=torch.ones(2, 2))


@pytest.mark.parametrize("small_batch", ["torch", "regopt"])
def test_recorder_records_the_applied_gradient_after_clipping(small_batch):
    # The recorded norm is the small-batch run's step length divided by lr (momentum 0): what grafting reproduces.
    model = mlp(7)
    if small_batch == "torch":
        sb = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        sb = regopt.MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=4, max_grad_norm=1e-2)
    recorder = regopt.GradNormRecorder(sb)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = data_for(model, 4)
    if small_batch == "torch":
        sb.zero_grad()
        F.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-2)
        sb.step()
    else:
        sb.step(loss_closure(model), (x, y))
    step = _norm([p.detach() - q for p, q in zip(model.parameters(), before)])
    assert recorder.norms() == pytest.approx([1e-2], rel=1e-4)  # clip_grad_norm_ divides by ‖g‖ + 1e-6
    assert recorder.norms()[0] == pytest.approx(step.item() / 0.1, rel=1e-10)
