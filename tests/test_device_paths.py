"""Device paths, on every available device (the CPU always; CUDA when present): each device against itself
and regopt.reference.

Random penalties (FT, UJ) are held to ``regopt.reference`` with the same seeded generator on the same device;
finite differences to the exact method; the finite-difference replay of dropout masks; generator resume;
float16 with a dynamic loss scale; bfloat16 statistics; channels_last against contiguous. The devices come
from ``REGOPT_TEST_DEVICES`` (comma-separated, default "cpu,cuda"; CUDA skips without a GPU).
Checks that compare two devices, or that exist on CUDA only (host synchronizations), are in test_cuda.py.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regopt
from regopt import reference, registry
from support import (RANDOM, assert_close_models, assert_models_match, cnn, constructors, data_for, device_params,
                     every_optimizer, float_batch, float_cnn, logits_closure, mlp, on, stats_vector)

DEVICES = device_params()


@pytest.mark.parametrize("name", list(RANDOM))
@pytest.mark.parametrize("device", DEVICES)
def test_random_penalties_on_device_equal_the_reference_loop_on_device(device, name):
    method = registry.METHODS[name]
    model, batch = on(device, cnn(12), data_for(cnn(12), 7))
    ref_model = copy.deepcopy(model)
    opt = method.build(model.parameters(), generator=torch.Generator(device).manual_seed(9), lr=0.1, momentum=0.9,
                       micro_batch_size=3, penalty=0.3)
    sgd = torch.optim.SGD(ref_model.parameters(), lr=0.1, momentum=0.9)
    ref_generator = torch.Generator(device).manual_seed(9)
    for _ in range(2):
        opt.step(logits_closure(model), batch)
        stats = reference.step(sgd, logits_closure(ref_model), batch, micro_batch_size=3, penalty=0.3,
                               generator=ref_generator, **method.reference_options)
        assert opt.stats.penalty.item() == pytest.approx(stats.penalty, rel=1e-10)
    assert_close_models(model, ref_model)


@pytest.mark.parametrize("name", list(RANDOM))
@pytest.mark.parametrize("device", DEVICES)
def test_random_penalties_finite_differences_track_exact_on_device(device, name):
    """Same seed, same draws: the finite-difference penalty step is the exact one up to O(ε) (≈ 1.1 ε here)."""
    make = registry.METHODS[name].build
    model, batch = on(device, cnn(13), data_for(cnn(13), 8))

    def update(opt, m):
        start = [p.detach().clone() for p in m.parameters()]
        opt.step(logits_closure(m), batch)
        return torch.cat([(p.detach() - s).flatten() for p, s in zip(m.parameters(), start)]), opt.stats.penalty
    plain = copy.deepcopy(model)
    loss_part, _ = update(regopt.MicroBatchSGD(plain.parameters(), lr=1.0, micro_batch_size=4), plain)
    parts = []
    for method in ("exact", "finite_difference"):
        m = copy.deepcopy(model)
        opt = make(m.parameters(), generator=torch.Generator(device).manual_seed(4), lr=1.0, micro_batch_size=4,
                   penalty=1.0, method=method, fd_eps=1e-6)
        parts.append(update(opt, m))
    (exact, exact_penalty), (fd, fd_penalty) = parts
    torch.testing.assert_close(fd_penalty, exact_penalty, rtol=1e-10, atol=0)  # same draws, same R_j
    exact_part, fd_part = exact - loss_part, fd - loss_part
    assert exact_part.norm() > 0.1 * exact.norm()  # the penalty is a real part of the step
    assert (fd_part - exact_part).norm() <= 1e-5 * exact_part.norm()


# -- randomness --------------------------------------------------------------------------------------
class RecordingDropout(nn.Module):
    """F.dropout on the global RNG of the input's device, recording each mask (h is never exactly 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.masks: list[torch.Tensor] = []

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = F.dropout(h, 0.5, training=True)
        self.masks.append(out != 0)
        return out


class FixedDropout(nn.Module):
    """Dropout with given masks, one per micro-batch (keyed by the micro-batch's storage offset)."""

    def __init__(self, masks: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self.masks = masks
        self.key = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.masks[self.key] * 2.0  # 1 / (1 - p), exact for p = 0.5


def dropout_mlp(dropout: nn.Module) -> nn.Sequential:
    torch.manual_seed(21)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), dropout, nn.Linear(16, 4)).double()


def device_rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


@pytest.mark.parametrize("device", DEVICES)
def test_finite_difference_pass_replays_the_dropout_masks_of_the_device_rng(device):
    recording = RecordingDropout()
    model = dropout_mlp(recording).to(device)
    fixed = FixedDropout({})
    fixed_model = dropout_mlp(fixed).to(device)
    x, y = (t.to(device) for t in data_for(mlp(0), 12))
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=4, penalty=0.5, method="finite_difference")
    torch.manual_seed(3)
    opt.step(logits_closure(model), (x, y))
    after_fd = device_rng_state(device)
    masks = recording.masks
    assert len(masks) == 6  # per micro-batch: the first pass, then the replay at the shifted parameters
    for j in range(3):
        assert torch.equal(masks[2 * j], masks[2 * j + 1]), f"micro-batch {j}: the replay drew another mask"
    assert not torch.equal(masks[0], masks[2])  # the RNG does advance between micro-batches

    # The same step with the first passes' masks fixed (no randomness at all) gives the same update.
    fixed.masks.update({j: masks[2 * j] for j in range(3)})
    fixed_opt = regopt.GradNormSGD(fixed_model.parameters(), lr=0.1, micro_batch_size=4, penalty=0.5,
                                   method="finite_difference")

    def fixed_closure(xb, yb):
        fixed.key = (xb.data_ptr() - x.data_ptr()) // (4 * x.stride(0) * x.element_size())
        return logits_closure(fixed_model)(xb, yb)
    fixed_opt.step(fixed_closure, (x, y))
    assert_models_match(fixed_model, model, rtol=1e-13, atol=1e-15)

    # The replay leaves the device RNG where one pass per micro-batch (the exact method) leaves it.
    exact_model = dropout_mlp(RecordingDropout()).to(device)
    exact = regopt.GradNormSGD(exact_model.parameters(), lr=0.1, micro_batch_size=4, penalty=0.5)
    torch.manual_seed(3)
    exact.step(logits_closure(exact_model), (x, y))
    assert torch.equal(device_rng_state(device), after_fd)


@pytest.mark.parametrize("name", list(RANDOM))
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("device", DEVICES)
def test_device_generator_resumes_bit_identically_from_a_state_dict(device, name, method):
    make = registry.METHODS[name].build
    model, batch = on(device, mlp(14, width=8), data_for(mlp(14, width=8), 9))

    def optimizer(m, seed):
        return make(m.parameters(), generator=torch.Generator(device).manual_seed(seed), lr=0.1, momentum=0.9,
                    micro_batch_size=3, penalty=0.3, method=method)
    opt = optimizer(model, 1)
    for _ in range(2):
        opt.step(logits_closure(model), batch)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    penalties = []
    for _ in range(2):
        opt.step(logits_closure(model), batch)
        penalties.append(opt.stats.penalty.item())

    buffer.seek(0)
    checkpoint = torch.load(buffer)
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(checkpoint["model"])
    other_seed = optimizer(resumed, 2)  # a different seed: only the loaded generator state can make it match
    other_seed.load_state_dict(checkpoint["opt"])
    resumed_penalties = []
    for _ in range(2):
        other_seed.step(logits_closure(resumed), batch)
        resumed_penalties.append(other_seed.stats.penalty.item())
    assert resumed_penalties == penalties
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(other_seed.generator.get_state(), opt.generator.get_state())


# -- float16 ----------------------------------------------------------------------------------------
FLOAT16 = constructors(["LB", "GN-exact", "GN-finite_difference"], penalty=0.1)


# regopt warns that fd_eps is small for half precision: true, and beside the point of these checks.
LOW_PRECISION_FD = pytest.mark.filterwarnings("ignore:fd_eps=.* is small for:UserWarning")


@LOW_PRECISION_FD
@pytest.mark.parametrize("name", list(FLOAT16))
@pytest.mark.parametrize("device", DEVICES)
def test_float16_autocast_with_dynamic_loss_scale_skips_an_overflow_and_recovers(device, name):
    model, batch = on(device, float_cnn(), float_batch())
    opt = FLOAT16[name](model.parameters(), lr=0.05, micro_batch_size=4, loss_scale="dynamic")
    closure = logits_closure(model)

    def step(closure):
        with torch.autocast(device.type, dtype=torch.float16):
            opt.step(closure, batch)
        return opt.stats.skipped

    for _ in range(20):  # the double backward may need a lower scale than 2^16 first
        if not step(closure):
            break
    assert not opt.stats.skipped and opt.step_count >= 1
    scale, taken = opt.current_loss_scale, opt.step_count
    before = [p.detach().clone() for p in model.parameters()]

    def overflowing(x, y):  # the scaled float16 activation gradients overflow to inf
        loss, logits = closure(x, y)
        return loss * 1e10, logits
    assert step(overflowing)
    assert opt.current_loss_scale == scale / 2 and opt.step_count == taken
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))

    assert not step(closure)  # recovers at the halved scale
    assert opt.step_count == taken + 1 and opt.current_loss_scale == scale / 2
    assert torch.isfinite(stats_vector(opt)).all()
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before))


@LOW_PRECISION_FD
@pytest.mark.parametrize("name", ["GN-exact", "GN-finite_difference"])
@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_autocast_on_device_keeps_float32_statistics(device, name):
    models = [on(device, float_cnn(), float_batch())[0] for _ in range(2)]
    batch = on(device, float_cnn(), float_batch())[1]
    opts = [FLOAT16[name](m.parameters(), lr=0.1, micro_batch_size=4) for m in models]
    with torch.autocast(device.type, dtype=torch.bfloat16):
        opts[0].step(logits_closure(models[0]), batch)
    opts[1].step(logits_closure(models[1]), batch)
    low, full = stats_vector(opts[0]), stats_vector(opts[1])
    assert low.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in models[0].parameters())
    torch.testing.assert_close(low, full, rtol=5e-2, atol=1e-3)


# -- memory format -------------------------------------------------------------------------------------
def two_conv_cnn(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(31)
    return nn.Sequential(nn.Conv2d(2, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 3),
                         nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)).to(dtype)


def channels_last_pair(device: torch.device, name: str, dtype: torch.dtype) -> list[nn.Module]:
    """Two steps of optimizer ``name`` from one initialization, contiguous and channels_last."""
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 2, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (10,), generator=g)
    models = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model = two_conv_cnn(dtype).to(device, memory_format=memory_format)
        xb = x.to(device).contiguous(memory_format=memory_format)
        opt = every_optimizer(device)[name](model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=4)
        for _ in range(2):
            opt.step(logits_closure(model), (xb, y.to(device)))
        models.append(model)
    assert models[1][0].weight.is_contiguous(memory_format=torch.channels_last)
    return models


@pytest.mark.parametrize("name", list(every_optimizer(torch.device("cpu"))))
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gives_the_step_of_contiguous_in_float64(device, name):
    contiguous, channels_last = channels_last_pair(device, name, torch.float64)
    assert_models_match(channels_last, contiguous, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("name", ["GN-exact", "GN-finite_difference"])
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_gives_the_step_of_contiguous_in_float32(device, name):
    """float32 takes the cuDNN NHWC kernels (double backward included); TF32 may differ between layouts."""
    contiguous, channels_last = channels_last_pair(device, name, torch.float32)
    assert_models_match(channels_last, contiguous, rtol=1e-2, atol=1e-3)
