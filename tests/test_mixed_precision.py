"""Autocast (bfloat16, float16) and float16 loss scaling, measured against float64 where precision allows."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import reference
from support import (assert_close_models, assert_same_state, cnn, constructors, data_for, float_batch, float_cnn,
                     logits_closure, snapshot)

MAKERS = constructors(["LB", "GN", "GN-fd", "FT", "AJ", "UJ", "GRAFT-iter"], penalty=0.1, seed=0)


@pytest.mark.parametrize("name", list(MAKERS))
def test_bfloat16_autocast_keeps_statistics_in_float32_and_tracks_float32(name):
    models = [float_cnn(), float_cnn()]
    opts = [MAKERS[name](m.parameters(), lr=0.1, micro_batch_size=4) for m in models]
    batch = float_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opts[0].step(logits_closure(models[0]), batch)
    opts[1].step(logits_closure(models[1]), batch)
    low, full = opts[0].stats, opts[1].stats
    for field in ("loss", "penalty", "micro_grad_sq_norm", "grad_norm"):
        got, want = getattr(low, field), getattr(full, field)
        assert got.dtype == torch.float32
        assert got.item() == pytest.approx(want.item(), rel=5e-2, abs=1e-3), field
    assert all(p.grad.dtype == torch.float32 for p in models[0].parameters())


def test_only_the_closure_runs_under_autocast():
    model = float_cnn()
    seen = []

    def closure(x, y):
        seen.append(torch.is_autocast_enabled("cpu"))
        return logits_closure(model)(x, y)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=6, penalty=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        opt.step(closure, float_batch())
        assert torch.is_autocast_enabled("cpu")
    assert seen == [True, True]


@pytest.mark.parametrize("name", ["LB", "GN", "GN-fd", "FT", "AJ", "UJ"])
def test_a_static_loss_scale_is_exact_in_float64(name):
    a, b = cnn(0), cnn(0)
    scaled = MAKERS[name](a.parameters(), lr=0.1, micro_batch_size=3, loss_scale=1024.0)
    plain = MAKERS[name](b.parameters(), lr=0.1, micro_batch_size=3)
    for t in range(2):
        batch = data_for(a, 7, seed=t)
        scaled.step(logits_closure(a), batch)
        plain.step(logits_closure(b), batch)
        torch.testing.assert_close(scaled.stats.penalty, plain.stats.penalty, rtol=1e-12, atol=1e-15)
    assert_close_models(a, b, rtol=1e-9, atol=1e-12)


def test_dynamic_loss_scale_skips_backs_off_and_grows(monkeypatch):
    monkeypatch.setattr(regopt.optimizers, "_DYNAMIC_SCALE_GROWTH_INTERVAL", 2)
    model = cnn(1)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.1,
                             loss_scale="dynamic")
    assert opt.current_loss_scale == 2.0**16
    batch = data_for(model, 7)
    opt.step(logits_closure(model), batch)
    before = snapshot(model, opt)

    def overflowing(x, y):
        loss, logits = logits_closure(model)(x, y)
        return loss * float("inf"), logits
    opt.step(overflowing, batch)  # no error: skipped, scale halved, growth streak reset
    assert opt.stats.skipped and opt.current_loss_scale == 2.0**15
    after = snapshot(model, opt)
    assert before["state"]["state"]["regopt"].pop("loss_scale_streak") == 1
    assert before["state"]["state"]["regopt"].pop("loss_scale") == 2.0**16
    assert after["state"]["state"]["regopt"].pop("loss_scale_streak") == 0
    assert after["state"]["state"]["regopt"].pop("loss_scale") == 2.0**15
    assert_same_state(before, after)  # nothing else changed
    opt.step(logits_closure(model), batch)
    opt.step(logits_closure(model), batch)
    assert not opt.stats.skipped and opt.current_loss_scale == 2.0**16 and opt.step_count == 3
    restored = regopt.GradNormSGD(cnn(1).parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, loss_scale="dynamic")
    restored.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert restored.current_loss_scale == 2.0**16


def test_float16_autocast_with_dynamic_loss_scale_trains():
    model = float_cnn()
    reference = copy.deepcopy(model)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.05, micro_batch_size=4, penalty=0.1, loss_scale="dynamic")
    full = regopt.GradNormSGD(reference.parameters(), lr=0.05, micro_batch_size=4, penalty=0.1)
    batch = float_batch()
    taken = 0
    for _ in range(25):
        with torch.autocast("cpu", dtype=torch.float16):
            opt.step(logits_closure(model), batch)
        taken += not opt.stats.skipped
    for _ in range(taken):
        full.step(logits_closure(reference), batch)
    assert taken >= 5
    assert opt.stats.loss.item() == pytest.approx(full.stats.loss.item(), rel=2e-2)


def test_bad_loss_scale():
    with pytest.raises(ValueError, match="Invalid loss_scale value"):
        regopt.GradNormSGD(cnn(0).parameters(), micro_batch_size=2, penalty=0.1, loss_scale=0.0)
    with pytest.raises(TypeError, match="Invalid loss_scale value"):
        regopt.GradNormSGD(cnn(0).parameters(), micro_batch_size=2, penalty=0.1, loss_scale="static")


# -- the penalty gradient in low precision, against float64 ------------------------------------------------
LOSS_WEIGHT = 1e-3  # a loss of about 1e-3 (late in training): float16 gradients of it underflow without a scale


def small_loss_closure(model):
    def closure(x, y):
        logits = model(x)
        return LOSS_WEIGHT * F.cross_entropy(logits, y), logits
    return closure


def applied_gradient(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double()


def low_precision_gradients(dtype: torch.dtype, loss_scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(G, P) of one step of GN (λ = 1) under ``dtype`` autocast: P = applied(GN) − applied(LB), lr = 0."""
    grads = []
    for make in (MAKERS["LB"], lambda p, **k: regopt.GradNormSGD(p, penalty=1.0, **k)):
        model = float_cnn()
        opt = make(model.parameters(), lr=0.0, micro_batch_size=4, loss_scale=loss_scale)
        for _ in range(20):  # a dynamic scale halves until the double backward no longer overflows
            with torch.autocast("cpu", dtype=dtype):
                opt.step(small_loss_closure(model), float_batch())
            if not opt.stats.skipped:
                break
        assert not opt.stats.skipped
        grads.append(applied_gradient(model))
    return grads[0], grads[1] - grads[0]


def float64_gradients() -> tuple[torch.Tensor, torch.Tensor]:
    """(G, P) of the same step by regopt.reference in float64."""
    grads = []
    for regularizer in ("none", "grad_norm"):
        model = float_cnn().double()
        x, y = float_batch()
        reference.step(torch.optim.SGD(model.parameters(), lr=0.0), small_loss_closure(model), (x.double(), y),
                       micro_batch_size=4, regularizer=regularizer, penalty=1.0)
        grads.append(applied_gradient(model))
    return grads[0], grads[1] - grads[0]


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.mark.parametrize("loss_scale", [1024.0, "dynamic"])
def test_float16_penalty_gradient_with_a_loss_scale_matches_float64(loss_scale):
    """float16 keeps 11 bits (eps 9.8e-4): G and P within 5e-3 of float64 (measured: 5e-4 and 9e-4).

    Without scaling the backward of R_j (∇R_j of a loss of 1e-3 is about 1e-6 of the activations' scale)
    P's error measured 0.17-1.0.
    """
    (grad, penalty_grad), (want_grad, want_penalty_grad) = low_precision_gradients(torch.float16, loss_scale), \
        float64_gradients()
    assert relative_error(grad, want_grad) < 5e-3
    assert relative_error(penalty_grad, want_penalty_grad) < 5e-3


def test_bfloat16_penalty_gradient_matches_float64():
    """bfloat16 keeps 8 bits (eps 7.8e-3): G and P within 3e-2 of float64 (measured: 4e-3 and 9e-3)."""
    (grad, penalty_grad), (want_grad, want_penalty_grad) = low_precision_gradients(torch.bfloat16, None), \
        float64_gradients()
    assert relative_error(grad, want_grad) < 3e-2
    assert relative_error(penalty_grad, want_penalty_grad) < 3e-2


# -- the dynamic loss scale, step by step ---------------------------------------------------------------------
def grad_scaler_rule(scale: float, streak: int, found_inf: bool, growth_interval: int) -> tuple[float, int]:
    """torch.amp.GradScaler's own update (torch._amp_update_scale_: ×0.5 on inf, ×2 after growth_interval finite)."""
    scale_t, streak_t = torch.tensor([scale]), torch.tensor([streak], dtype=torch.int32)
    torch._amp_update_scale_(scale_t, streak_t, torch.tensor([float(found_inf)]), 2.0, 0.5, growth_interval)
    return scale_t.item(), int(streak_t.item())


def test_dynamic_loss_scale_follows_grad_scaler_step_by_step(monkeypatch):
    """Overflows at chosen steps: after every step, scale and growth streak are GradScaler's."""
    monkeypatch.setattr(regopt.optimizers, "_DYNAMIC_SCALE_GROWTH_INTERVAL", 3)
    model = cnn(2)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.01, micro_batch_size=3, penalty=0.1, loss_scale="dynamic")
    batch = data_for(model, 7)

    def overflowing(x, y):
        loss, logits = logits_closure(model)(x, y)
        return loss * float("inf"), logits
    scale, streak, taken = 2.0**16, 0, 0
    pattern = "ffiffffifiiffffffifff"  # f: a finite step, i: an overflow (grows, backs off, resets mid-streak)
    for t, kind in enumerate(pattern):
        opt.step(logits_closure(model) if kind == "f" else overflowing, batch)
        scale, streak = grad_scaler_rule(scale, streak, kind == "i", 3)
        taken += kind == "f"
        extra = opt.state_dict()["state"]["regopt"]
        assert opt.stats.skipped == (kind == "i"), t
        assert (opt.current_loss_scale, extra["loss_scale"], extra["loss_scale_streak"]) == (scale, scale, streak), t
        assert opt.step_count == taken, t
    assert scale != 2.0**16  # the pattern moved the scale both ways
