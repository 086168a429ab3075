"""benchmarks/fd_faithfulness.py: the finite-difference estimates, their exact reference, and the script's output."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import fd_faithfulness as fd
from regopt import reference, registry


def _smooth_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 4)).double().train()


def _relu_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).double().train()


def _batch(shape: tuple[int, ...], size: int = 32, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn((size, *shape), generator=g, dtype=torch.float64), torch.randint(0, 4, (size,), generator=g)


def _measure(model, x, y, name, eps, variants, check_eps=None):
    micros = fd.split_micro_batches(x, y, 8)
    draws = fd.draw_randomness(model, micros, fd.PENALTIES[name], seed=5)
    return fd.measure_batch(model, micros, fd.PENALTIES[name], draws, eps, variants, check_eps)


@pytest.mark.parametrize("name", ["GN", "FT", "UJ"])
def test_differences_converge_at_their_order_on_a_smooth_model(name):
    """tanh + BatchNorm (smooth): forward error ∝ ε (×10 per decade), central ∝ ε² (×100), cosine → 1."""
    eps = (1e-2, 1e-3, 1e-4)
    bm = _measure(_smooth_model(), *_batch((6,)), name, eps, ("forward", "central"))
    err = {key: fd.compare(p, bm.exact)[1] for key, p in bm.estimates.items()}
    for big, small in [(1e-2, 1e-3), (1e-3, 1e-4)]:
        assert 5 < err["forward", big] / err["forward", small] < 20
    assert 50 < err["central", 1e-2] / err["central", 1e-3] < 200
    assert fd.compare(bm.estimates["forward", 1e-4], bm.exact)[0] > 1 - 1e-6
    assert err["central", 1e-3] < err["forward", 1e-3] / 10
    assert all(math.isnan(f) for f in bm.flips.values())  # no ReLU: nothing to flip


def test_relative_step_is_eps_times_parameter_norm():
    """forward-rel at ε is forward at ε·‖θ‖, bit for bit."""
    model = _smooth_model()
    theta_norm = float(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).norm())
    assert fd.step_size("forward-rel", 1e-3, theta_norm) == pytest.approx(1e-3 * theta_norm, rel=1e-12)
    assert fd.shifts_needed(["central-rel"], [1e-3], 2.0) == [-2e-3, 2e-3]
    x, y = _batch((6,))
    rel = _measure(model, x, y, "GN", (1e-3,), ("forward-rel",))
    bm = _measure(model, x, y, "GN", (1e-3 * rel.theta_norm,), ("forward",))
    assert torch.equal(fd.flatten(rel.estimates["forward-rel", 1e-3]),
                       fd.flatten(bm.estimates["forward", 1e-3 * rel.theta_norm]))


@pytest.mark.parametrize("name", ["GN", "FT", "AJ", "UJ"])
def test_exact_and_forward_match_regopt_on_a_relu_cnn(name):
    """P_exact is regopt.reference's penalty gradient (same draws); 'forward' is regopt.hvp.finite_difference."""
    model = _relu_cnn()
    x, y = _batch((1, 8, 8))
    bm = _measure(model, x, y, name, (1e-2,), ("forward",), check_eps=1e-2)
    assert bm.regopt_check is not None and bm.regopt_check < 1e-12

    def closure(xs, ys):
        logits = model(xs)
        return F.cross_entropy(logits, ys), logits

    grads = []
    for penalty in (0.0, 1.0):
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        reference.step(sgd, closure, (x, y), micro_batch_size=8, penalty=penalty,
                       generator=torch.Generator().manual_seed(5), **registry.METHODS[name].reference_options)
        grads.append(fd.flatten([p.grad for p in model.parameters()]))
    expected = grads[1] - grads[0]
    assert expected.norm() > 0
    torch.testing.assert_close(fd.flatten(bm.exact), expected, rtol=1e-9, atol=1e-12 * float(expected.norm()))
    # Through ReLU kinks the step-ε difference is not the exact product; the flip fraction sees the kinks.
    assert 0 <= bm.flips["forward", 1e-2] < 1 and 0 <= bm.switches["forward", 1e-2] < 1


def test_kink_patterns_count_relu_flips_and_max_pool_switches():
    """A shift that moves one input across zero flips exactly that ReLU and switches exactly its pooling window."""
    model = nn.Sequential(nn.ReLU(), nn.MaxPool2d(2))
    x = torch.tensor([[[[1.0, -1.0], [-2.0, 0.5]], [[1.0, 2.0], [3.0, 4.0]]]])  # (1, 2, 2, 2): two windows
    with fd.kink_patterns(model) as base:
        model(x.clone())
    shifted = x.clone()
    shifted[0, 0, 0, 1] = 3.0  # channel 0: a ReLU flips and the window's argmax moves; channel 1 unchanged
    with fd.kink_patterns(model) as kinks:
        model(shifted)
    assert fd.changed_fraction(base["relu"], kinks["relu"]) == 1 / 8
    assert fd.changed_fraction(base["maxpool"], kinks["maxpool"]) == 1 / 2
    assert math.isnan(fd.changed_fraction([], []))


def test_script_writes_the_tables_and_json(tmp_path, capsys):
    out, tables = tmp_path / "fd.json", tmp_path / "fd.md"
    argv = ["--dataset", "synthetic", "--train-size", "64", "--widths", "2", "4", "4", "--batch-size", "32",
            "--micro-batch-size", "16", "--steps-at", "0", "2", "--eps", "1e-2", "1e-3", "--penalties", "GN", "UJ",
            "--batches", "1", "--out", str(out), "--markdown", str(tables), "--cache", str(tmp_path / "ck.pt")]
    result = fd.main(argv)
    saved = json.loads(out.read_text())
    assert {"config", "environment", "checkpoints", "headline", "rows", "batches", "norms", "regopt_check",
            "timing"} <= set(saved)
    assert [c["step"] for c in saved["checkpoints"]] == [0, 2]
    assert all({"flip_mean", "pool_switch_mean", "cos_min", "rel_err_max"} <= set(r) for r in saved["rows"])
    assert saved["environment"]["data"] == "synthetic" and saved["environment"]["wall_s"] > 0
    # (2 steps × 2 penalties × 2 dtypes) × (4 variants × 2 ε + the exact row)
    assert len(saved["rows"]) == 8 * (4 * 2 + 1) == len(result["rows"])
    for row in saved["rows"]:
        assert 0 <= row["rel_err_mean"] < math.inf and -1 - 1e-9 <= row["cos_mean"] <= 1 + 1e-9
        if row["variant"] == "exact":
            assert row["rel_err_mean"] < (1e-5 if row["dtype"] == "float32" else 1e-13)
    assert {(c["dtype"], c["step"], c["penalty"]) for c in saved["regopt_check"]} == {
        (d, s, p) for d in ("float32", "float64") for s in (0, 2) for p in ("GN", "UJ")}
    assert all(c["rel_diff"] < (1e-6 if c["dtype"] == "float32" else 1e-12) for c in saved["regopt_check"])
    assert "| float64 forward |" in tables.read_text() and "| float64 forward |" in capsys.readouterr().out
    # The cached trajectory is reused: the same rows again.
    again = fd.main(argv)
    assert [r["rel_err_mean"] for r in again["rows"]] == [r["rel_err_mean"] for r in saved["rows"]]


def test_smooth_twin_of_the_small_cnn_converges_and_keeps_theta():
    """silu + average pooling: the same parameters, no ReLU or max-pool left, forward error ∝ ε."""
    from benchmarks import models

    torch.manual_seed(0)
    relu = models.build_model("small-cnn", 4, 1, widths=[2, 3, 4]).double().train()
    smooth = fd.swap_nonsmooth(models.build_model("small-cnn", 4, 1, widths=[2, 3, 4]).double().train(), "silu", "avg")
    smooth.load_state_dict(relu.state_dict())  # same parameter names and shapes
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in smooth.modules())
    assert sum(isinstance(m, nn.SiLU) for m in smooth.modules()) == 3
    bm = _measure(smooth, *_batch((1, 28, 28), size=16), "AJ", (1e-2, 1e-3), ("forward",))
    err = {e: fd.compare(bm.estimates["forward", e], bm.exact)[1] for e in (1e-2, 1e-3)}
    assert 5 < err[1e-2] / err[1e-3] < 20 and err[1e-3] < 1e-2


def test_defaults_are_the_fmnist_preset():
    """The script's defaults are the reproduction's `fmnist` setting (so its trajectory is that preset's LB run)."""
    from benchmarks.repro.presets import PRESETS

    preset = PRESETS["fmnist"]
    assert preset["model"] == "small-cnn" and preset["dataset"] == "fashion-mnist"
    assert fd.FMNIST == dict(train_size=preset["train_size"], widths=preset["model_kwargs"]["widths"],
                             batch_size=preset["batch_size"], micro_batch_size=preset["micro_batch_size"],
                             lr=preset["lr"]["default"], momentum=0.0)
