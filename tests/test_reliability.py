"""Reliability: fuzzed bad input and faults leave everything unchanged; unsupported setups say what to do;
resumed runs are bit-identical; long runs do not leak."""

from __future__ import annotations

import gc
import io
import resource

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import regopt
from regopt import registry
from support import (assert_close_models, assert_same_state, assert_unchanged, cnn, constructors, data_for,
                     logits_closure, mlp, snapshot)

# every penalized optimizer gets the caller's generator
OPTIMIZERS = constructors([*registry.NAMES, "GN-fd"], penalty=0.2, norms=lambda t: 0.5)
fuzz = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.function_scoped_fixture])


def _primed(name, seed=0):
    """A model and optimizer after one good step: momentum, .grad, generator and step count all exist."""
    model = mlp(seed)
    opt = OPTIMIZERS[name](model.parameters(), generator=torch.Generator().manual_seed(seed), lr=0.1, momentum=0.9,
                           micro_batch_size=3)
    opt.step(logits_closure(model), data_for(model, 7))
    return model, opt


@st.composite
def malformed_batches(draw):
    x, y = data_for(mlp(0), 6)
    kind = draw(st.sampled_from(["sizes", "non-tensor", "nested", "empty", "scalar-leaf", "container"]))
    if kind == "sizes":
        cut = draw(st.integers(0, 5))
        layout = draw(st.sampled_from(["tuple", "list", "dict"]))
        parts = (x, y[:cut])
        batch = {"tuple": parts, "list": list(parts), "dict": {"x": parts[0], "y": parts[1]}}[layout]
        return batch, ValueError, "disagree on the leading" if cut else "disagree on the leading|empty"
    if kind == "non-tensor":
        junk = draw(st.sampled_from([None, 3, "y", [1, 2, 3, 4, 5, 6], 2.5]))
        return (x, junk), TypeError, r"batch\[1\] must be a Tensor"
    if kind == "nested":
        return (x, (y, y)), TypeError, r"batch\[1\] must be a Tensor, got tuple"
    if kind == "empty":
        return draw(st.sampled_from([(), [], {}, (x[:0], y[:0])])), ValueError, "empty"
    if kind == "scalar-leaf":
        return (x, torch.tensor(1)), ValueError, "0-dimensional"
    return draw(st.sampled_from([{1, 2}, 7, "batch"])), TypeError, "batch must be a Tensor"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@fuzz
@given(case=malformed_batches())
def test_fuzzed_batches_raise_and_change_nothing(name, case):
    batch, error, match = case
    model, opt = _primed(name)
    before = snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step(logits_closure(model), batch)
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@fuzz
@given(batch_size=st.integers(1, 12), bad_call=st.integers(0, 11),
       fault=st.sampled_from(["raise", "nan-loss", "inf-loss", "inf-logits", "nan-logits", "wrong-dtype"]))
def test_fuzzed_faults_raise_and_change_nothing(name, batch_size, bad_call, fault):
    model, opt = _primed(name)
    micro_batches = -(-batch_size // 3)
    calls_per_micro_batch = 2 if name.endswith("-fd") else 1  # finite differences replay the closure
    bad_call %= micro_batches * calls_per_micro_batch
    bad_micro, in_replay = divmod(bad_call, calls_per_micro_batch)
    calls = []
    error = ValueError("closure failed")

    def closure(x, y):
        calls.append(1)
        if len(calls) - 1 == bad_call:
            if fault == "raise":
                raise error
            if fault == "wrong-dtype":
                x = x.float()  # float32 input into a float64 model: torch's own error propagates
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if len(calls) - 1 == bad_call and fault.endswith("-loss"):
            loss = loss * float(fault.split("-")[0])
        if len(calls) - 1 == bad_call and fault.endswith("-logits"):
            logits = logits * float(fault.split("-")[0])  # non-finite penalty for the logit penalties
        return loss, logits

    before = snapshot(model, opt)
    penalized_by_logits = name in {"FT", "AJ", "UJ"}
    expect_error = fault in {"raise", "wrong-dtype", "nan-loss", "inf-loss"} or (
        penalized_by_logits and fault.endswith("-logits"))
    if not expect_error:  # logits unused by this optimizer: an ordinary step, taken
        steps = opt.step_count
        opt.step(closure, data_for(model, batch_size))
        assert not opt.stats.skipped and opt.step_count == steps + 1 and torch.isfinite(opt.stats.loss)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before["params"]))
        return
    expected, match = {"raise": (ValueError, "closure failed"),
                       "wrong-dtype": (RuntimeError, "must have the same dtype")}.get(fault, (FloatingPointError, "non-finite"))
    with pytest.raises(expected, match=match) as info:
        opt.step(closure, data_for(model, batch_size))
    if fault == "raise":
        assert info.value is error
    elif expected is FloatingPointError:
        assert f"on micro-batch {bad_micro} of {micro_batches}" in str(info.value)
        term = "penalty gradient" if in_replay else "loss L_j" if fault.endswith("loss") else "penalty R_j"
        assert term in str(info.value)
    assert_unchanged(before, model, opt)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_skip_nonfinite_skips_on_any_term(name):
    model = mlp(1)
    opt = OPTIMIZERS[name](model.parameters(), generator=torch.Generator().manual_seed(0), lr=0.1, momentum=0.9,
                           micro_batch_size=3, skip_nonfinite=True)
    opt.step(logits_closure(model), data_for(model, 7))
    before = snapshot(model, opt)
    loss = opt.step(lambda x, y: (F.cross_entropy(model(x), y) * float("nan"), model(x)), data_for(model, 7))
    assert opt.stats.skipped and torch.isnan(loss)
    assert_unchanged(before, model, opt)


# -- known-unsupported setups ----------------------------------------------------------------------------------

class TinyAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q, self.out = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        h = self.q(x).view(x.shape[0], 1, 2, 2)
        return self.out(F.scaled_dot_product_attention(h, h, h).reshape(x.shape[0], 4))


def _attention_closure(model):
    return lambda x, y: F.cross_entropy(model(x), y)


@pytest.mark.parametrize("build", [TinyAttention, lambda: torch.compile(
    nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), backend="aot_eager")], ids=["sdpa", "compiled"])
def test_models_without_double_backward_point_to_finite_difference(build):
    model = build()
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    exact = regopt.GradNormSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.1)
    before = snapshot(model, exact)
    with pytest.raises(RuntimeError, match="method='finite_difference'"):
        exact.step(_attention_closure(model), batch)
    assert_same_state(before, snapshot(model, exact))
    fd = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, method="finite_difference")
    fd.step(_attention_closure(model), batch)
    assert torch.isfinite(fd.stats.penalty) and fd.stats.penalty > 0


def test_sparse_gradients_are_refused():
    embedding = nn.Embedding(5, 3, sparse=True)
    opt = regopt.GradNormSGD(embedding.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1)
    before = embedding.weight.detach().clone()
    with pytest.raises(TypeError, match="sparse gradients are not supported"):
        opt.step(lambda i, y: F.cross_entropy(embedding(i), y), (torch.randint(0, 5, (6,)), torch.randint(0, 3, (6,))))
    assert torch.equal(embedding.weight, before) and embedding.weight.grad is None


def test_complex_parameters_are_refused():
    weight = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    opt = regopt.MicroBatchSGD([weight], lr=0.1, micro_batch_size=2)
    with pytest.raises(TypeError, match="complex parameters are not supported"):
        opt.step(lambda x: (weight * x).abs().sum(), torch.randn(4, 3, dtype=torch.complex64))


# -- resume ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["GN", "GN-fd", "FT", "UJ", "GRAFT-ext"])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stop=st.integers(1, 5), seed=st.integers(0, 100), subset=st.sampled_from([None, 1, 2]),
       loss_scale=st.sampled_from([None, "dynamic"]))
def test_interrupted_runs_resume_bit_identically(name, stop, seed, subset, loss_scale):
    """Saved after ``stop`` of 6 steps and resumed into a differently seeded model and generator: the same run.

    The generator (FT/UJ draws, penalty subsets), momentum, step count, loss scale and schedule all resume."""
    batches = [data_for(cnn(0), 7, seed=seed + t) for t in range(6)]
    options = {"loss_scale": loss_scale} | ({} if name.startswith("GRAFT") else {"penalty_micro_batches": subset})

    def fresh(model_seed):
        model = cnn(model_seed)
        generator = torch.Generator().manual_seed(model_seed)
        opt = OPTIMIZERS[name](model.parameters(), generator=generator, lr=0.1, momentum=0.9, micro_batch_size=3,
                               **options)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
        return model, opt, scheduler

    def train(model, opt, scheduler, part):
        torch.manual_seed(1000 + len(part))  # the global RNG differs between the runs; only generators matter
        for batch in part:
            opt.step(logits_closure(model), batch)
            scheduler.step()

    straight = fresh(seed)
    train(*straight, batches)
    first = fresh(seed)
    train(*first, batches[:stop])
    buffer = io.BytesIO()
    torch.save({"model": first[0].state_dict(), "opt": first[1].state_dict(), "sched": first[2].state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    resumed = fresh(seed + 1)
    resumed[0].load_state_dict(saved["model"])
    resumed[1].load_state_dict(saved["opt"])
    resumed[2].load_state_dict(saved["sched"])
    train(*resumed, batches[stop:])
    assert_close_models(straight[0], resumed[0], rtol=0, atol=0)
    assert_same_state(snapshot(*straight[:2]), snapshot(*resumed[:2]))  # momentum, step, scale, generator state


# -- soak --------------------------------------------------------------------------------------------------------

def _live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


SOAK_STEPS = 2000
SOAK_RSS_PER_STEP_KIB = 4  # resident memory may grow by less than this per step (maxrss, KiB)


@pytest.mark.slow
def test_soak_two_thousand_steps_without_growth():
    """No tensor outlives its step (counted exactly), and resident memory grows by less than
    SOAK_RSS_PER_STEP_KIB per step, for every optimizer over SOAK_STEPS steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randint(0, 3, (4,))
    closure = logits_closure(model)
    for name, make in OPTIMIZERS.items():
        opt = make(model.parameters(), generator=torch.Generator().manual_seed(0), lr=1e-3, micro_batch_size=2)
        for _ in range(50):
            opt.step(closure, (x, y))
        tensors, rss = _live_tensors(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for _ in range(SOAK_STEPS):
            opt.step(closure, (x, y))
        assert _live_tensors() <= tensors, name
        assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss < SOAK_RSS_PER_STEP_KIB * SOAK_STEPS, name
        assert torch.isfinite(opt.stats.loss) and torch.isfinite(opt.stats.penalty), name
        assert all(torch.isfinite(p).all() for p in model.parameters()), name


def _compiled_after_a_plain_backward():
    """A torch.compile'd model whose backward was first compiled by a plain backward() (for single use)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)), backend="aot_eager")
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    F.cross_entropy(model(batch[0][:3]), batch[1][:3]).backward()  # e.g. a warm-up or small-batch phase
    for p in model.parameters():
        p.grad = None
    return model, batch


def test_compiled_donated_buffers_error_points_exact_to_finite_difference():
    model, batch = _compiled_after_a_plain_backward()
    exact = regopt.GradNormSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=3, penalty=0.1)
    before = snapshot(model, exact)
    with pytest.raises(RuntimeError, match="method='finite_difference'") as info:
        exact.step(_attention_closure(model), batch)
    assert "donated buffers" in str(info.value)  # PyTorch's raw message before the fix, with no way out
    assert "TIMM_FUSED_ATTN=0" in str(info.value) and "SDPBackend.MATH" in str(info.value)
    assert_same_state(before, snapshot(model, exact))
    fd = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, method="finite_difference")
    fd.step(_attention_closure(model), batch)
    assert torch.isfinite(fd.stats.penalty) and fd.stats.penalty > 0


def test_compiled_donated_buffers_in_finite_differences_say_how_to_turn_them_off():
    # FT's finite differences take g_j and v_j from one graph (retain_graph=True), which donated buffers refuse too.
    model, batch = _compiled_after_a_plain_backward()
    closure = lambda x, y: (F.cross_entropy(model(x), y), model(x))
    ft = regopt.FisherTraceSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1, method="finite_difference")
    with pytest.raises(RuntimeError, match=r"donated_buffer = False` before the model is compiled"):
        ft.step(closure, batch)
    with torch._functorch.config.patch(donated_buffer=False):
        model, batch = _compiled_after_a_plain_backward()
        closure = lambda x, y: (F.cross_entropy(model(x), y), model(x))
        ft = regopt.FisherTraceSGD(model.parameters(), lr=0.1, micro_batch_size=3, penalty=0.1,
                                   method="finite_difference")
        ft.step(closure, batch)
    assert torch.isfinite(ft.stats.penalty) and ft.stats.penalty > 0
