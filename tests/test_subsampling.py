"""The penalty on a random subset of micro-batches (``penalty_micro_batches = m``), float64.

P̂ = Σ_{j∈S} (k/m) w_j ∇R_j over m of the k micro-batches, S uniform without replacement. The
subsets are enumerated through ``regopt.engine.sample_penalty_subset`` (monkeypatched to return each
in turn, drawing nothing), so every enumeration starts from the same generator state. An unsampled
micro-batch still makes (and discards) its penalty draw, so micro-batch j gets the same FT labels /
UJ direction whichever S is drawn: the average over all subsets must equal the full step *exactly*
(same draws), and each subset must equal its own sum, computed micro-batch by micro-batch with
``regopt.reference`` (whose draws, taken in the same order from a generator in the same state, are
the same numbers).
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import regopt
from regopt import engine, hvp, reference, registry

from dist_support import launch
from support import logits_closure, mlp, requires_cuda

B, SIZE = 7, 2  # k = 4 micro-batches of sizes 2, 2, 2, 1 (a ragged tail)
K = 4
PENALTY = 0.3
SEED = 11
FD_EPS = 1e-6


def make_optimizer(name: str, model, method: str = "exact", m: int | None = None, seed: int = SEED, **kwargs):
    return registry.build(name, model.parameters(), lr=0.1, micro_batch_size=SIZE, penalty=PENALTY, method=method,
                          fd_eps=FD_EPS, generator=torch.Generator().manual_seed(seed), penalty_micro_batches=m,
                          **kwargs)


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (B,), generator=g)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def one_step(name, method, m, model, subset=None, monkeypatch=None):
    """The applied gradient (G + λP̂, left in .grad) and stats of one step from ``model``'s state."""
    if subset is not None:
        monkeypatch.setattr(engine, "sample_penalty_subset", lambda count, size, generator: frozenset(subset))
    model = copy.deepcopy(model)
    opt = make_optimizer(name, model, method, m)
    opt.step(logits_closure(model), batch())
    return flat(p.grad for p in model.parameters()), opt.stats


def reference_terms(name, model, data=None):
    """Per micro-batch, from regopt.reference: (w_j, g_j, λ∇R_j, R_j), draws in the optimizer's order."""
    generator = torch.Generator().manual_seed(SEED)
    x, y = batch() if data is None else data
    penalized = registry.METHODS[name].regularizer
    terms = []
    for start in range(0, len(x), SIZE):
        part, grads, penalty = (x[start:start + SIZE], y[start:start + SIZE]), {}, 0.0
        for regularizer in ("none", penalized):  # "none" draws nothing
            copied = copy.deepcopy(model)
            sgd = torch.optim.SGD(copied.parameters(), lr=0.0)
            stats = reference.step(sgd, logits_closure(copied), part, micro_batch_size=SIZE, regularizer=regularizer,
                                   penalty=PENALTY, generator=generator)
            grads[regularizer], penalty = flat(p.grad for p in copied.parameters()), stats.penalty
        g = grads["none"]
        terms.append((part[0].shape[0] / len(x), g, grads[penalized] - g, penalty))
    return terms


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("name", registry.PENALIZED)
@pytest.mark.parametrize("m", [1, K - 1])
def test_the_average_over_all_subsets_is_the_full_penalty_and_each_subset_its_own_sum(name, method, m, monkeypatch):
    model = mlp(3)
    full_grad, full_stats = one_step(name, method, None, model)
    expected_terms = reference_terms(name, model)
    large_batch_grad = sum(w * g for w, g, _, _ in expected_terms)
    grads, penalties = [], []
    for subset in itertools.combinations(range(K), m):
        grad, stats = one_step(name, method, m, model, subset, monkeypatch)
        own = large_batch_grad + sum(K / m * expected_terms[j][0] * expected_terms[j][2] for j in subset)
        own_penalty = sum(K / m * expected_terms[j][0] * expected_terms[j][3] for j in subset)
        if method == "exact":  # weights k/m · w_j, ragged tail included
            torch.testing.assert_close(grad, own, rtol=1e-12, atol=1e-12)
        else:  # the forward difference errs by O(ε) in the penalty part alone (measured: up to 1.1 ε)
            assert (grad - own).norm() <= 3 * FD_EPS * (own - large_batch_grad).norm()
        torch.testing.assert_close(stats.penalty.item(), own_penalty, rtol=1e-12, atol=1e-12)  # R_j: no difference
        assert (grad - full_grad).abs().max() > 1e-6  # each subset is a different, noisy estimate
        # G, the loss and Σ_j w_j ‖g_j‖² stay exact: every micro-batch still computes g_j.
        torch.testing.assert_close(stats.loss, full_stats.loss, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.micro_grad_sq_norm, full_stats.micro_grad_sq_norm, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(stats.grad_norm, full_stats.grad_norm, rtol=1e-12, atol=1e-12)
        assert stats.num_micro_batches == K
        grads.append(grad)
        penalties.append(stats.penalty)
    torch.testing.assert_close(torch.stack(grads).mean(0), full_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.stack(penalties).mean(), full_stats.penalty, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("name", ["GN", "FT", "UJ"])
def test_m_at_least_k_is_the_full_penalty_bit_for_bit(name, method):
    runs = []
    for m in (None, K, K + 5):
        model = mlp(4)
        opt = make_optimizer(name, model, method, m, momentum=0.9)
        stats = [opt.step(logits_closure(model), batch(t)) for t in range(2)]
        runs.append((list(model.parameters()), opt.stats, opt.generator.get_state(), stats))
    for params, stats, state, losses in runs[1:]:
        assert all(torch.equal(p, q) for p, q in zip(params, runs[0][0]))
        assert torch.equal(stats.penalty, runs[0][1].penalty) and torch.equal(stats.loss, runs[0][1].loss)
        assert torch.equal(state, runs[0][2])  # no subset was drawn
        assert all(torch.equal(a, b) for a, b in zip(losses, runs[0][3]))


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("m", [1, 2, K - 1])
def test_unsampled_micro_batches_take_the_first_order_path(method, m, monkeypatch):
    calls, closure_calls = Counter(), Counter()
    differentiate = hvp.METHODS[method]

    def counting(*args, **kwargs):
        calls[method] += 1
        return differentiate(*args, **kwargs)

    monkeypatch.setitem(hvp.METHODS, method, counting)
    model = mlp(5)
    opt = make_optimizer("GN", model, method, m)
    closure = logits_closure(model)

    def counted(x, y):
        closure_calls["forward"] += 1
        return closure(x, y)

    opt.step(counted, batch())
    assert calls[method] == m  # the penalty work: on the m sampled micro-batches only
    assert closure_calls["forward"] == K + (m if method == "finite_difference" else 0)  # replays: sampled only


@pytest.mark.parametrize("bad", [True, False, 0, -1, 1.5, "2", 2.0])
@pytest.mark.parametrize("name", ["GN", "FT", "AJ"])
def test_invalid_penalty_micro_batches_are_refused(name, bad):
    with pytest.raises(ValueError, match="Invalid penalty_micro_batches"):
        make_optimizer(name, mlp(0), m=bad)


@pytest.mark.parametrize("make", [lambda p: regopt.MicroBatchSGD(p, micro_batch_size=2, penalty_micro_batches=1),
                                  lambda p: regopt.GraftedSGD(p, micro_batch_size=2, penalty_micro_batches=1)])
def test_unpenalized_optimizers_take_no_penalty_micro_batches(make):
    with pytest.raises(TypeError, match="penalty_micro_batches"):
        make(mlp(0).parameters())


def _train(opt, model, steps, first=0):
    for t in range(first, first + steps):
        opt.step(logits_closure(model), batch(t))


@pytest.mark.parametrize("name", ["GN", "FT"])
def test_resuming_from_state_dict_draws_the_same_subsets(name):
    straight = mlp(6)
    opt = make_optimizer(name, straight, m=2, momentum=0.9)
    _train(opt, straight, 5)

    first = mlp(6)
    opt_first = make_optimizer(name, first, m=2, momentum=0.9)
    _train(opt_first, first, 2)
    resumed = copy.deepcopy(first)
    opt_resumed = make_optimizer(name, resumed, m=2, momentum=0.9, seed=999)  # its own seed is overwritten
    opt_resumed.load_state_dict(copy.deepcopy(opt_first.state_dict()))
    _train(opt_resumed, resumed, 3, first=2)
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), straight.parameters()))

    other = mlp(6)  # the check can fail: another seed draws other subsets
    _train(make_optimizer(name, other, m=2, momentum=0.9, seed=999), other, 5)
    assert not all(torch.equal(p, q) for p, q in zip(other.parameters(), straight.parameters()))


def test_a_failed_or_skipped_step_leaves_the_generator_as_it_was():
    model = mlp(7)
    opt = make_optimizer("FT", model, m=2, skip_nonfinite=True)
    closure = logits_closure(model)
    before = opt.generator.get_state()

    def failing(x, y):
        if x.shape[0] == 1:  # the ragged last micro-batch: after the subset and the earlier draws
            raise RuntimeError("boom")
        return closure(x, y)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing, batch())
    assert torch.equal(opt.generator.get_state(), before)

    def nonfinite(x, y):
        loss, logits = closure(x, y)
        return loss * float("nan") if x.shape[0] == 1 else loss, logits

    opt.step(nonfinite, batch())
    assert opt.stats.skipped and torch.equal(opt.generator.get_state(), before)
    opt.step(closure, batch())
    assert not torch.equal(opt.generator.get_state(), before)  # a step taken does draw


@settings(max_examples=50, deadline=None)
@given(count=st.integers(1, 12), data=st.data(), seed=st.integers(0, 2**32))
def test_the_sampler_draws_distinct_indices_from_the_generator_state(count, data, seed):
    size = data.draw(st.integers(1, count))
    generator = torch.Generator().manual_seed(seed)
    state = generator.get_state()
    subset = engine.sample_penalty_subset(count, size, generator)
    assert len(subset) == size and subset <= set(range(count))
    assert (count == 1) or not torch.equal(generator.get_state(), state)  # the draw advances the generator
    generator.set_state(state)
    assert engine.sample_penalty_subset(count, size, generator) == subset


def test_the_sampler_is_uniform_over_subsets():
    generator, draws = torch.Generator().manual_seed(0), 6000
    counts = Counter(engine.sample_penalty_subset(4, 2, generator) for _ in range(draws))
    assert len(counts) == 6  # C(4, 2)
    assert all(abs(c - draws / 6) < 0.1 * draws / 6 for c in counts.values())  # fixed seed: deterministic


def test_the_global_rng_draws_when_no_generator_is_given():
    torch.manual_seed(3)
    first = [engine.sample_penalty_subset(8, 2, None) for _ in range(5)]
    torch.manual_seed(3)
    assert [engine.sample_penalty_subset(8, 2, None) for _ in range(5)] == first
    assert len(set(first)) > 1


def test_the_device_rule_seeds_a_host_generator_from_the_state_bytes():
    a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    perm = lambda g: torch.randperm(16, generator=engine.host_generator(g.get_state())).tolist()
    assert perm(a) == perm(a) and perm(a) != perm(b)


@requires_cuda
def test_a_cuda_generator_draws_without_a_host_sync_and_resumes():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 4)).cuda()
    generator = torch.Generator("cuda").manual_seed(0)
    opt = regopt.GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=2, penalty=0.1, generator=generator,
                             penalty_micro_batches=1)
    x, y = torch.randn(8, 3, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    closure = lambda a, b: F.cross_entropy(model(a), b)
    opt.step(closure, (x, y))  # warm-up
    state = generator.get_state()
    subsets = [engine.sample_penalty_subset(4, 1, generator) for _ in range(8)]
    assert not torch.equal(generator.get_state(), state) and len(set(subsets)) > 1  # each draw advances it
    generator.set_state(state)
    assert [engine.sample_penalty_subset(4, 1, generator) for _ in range(8)] == subsets
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        engine.sample_penalty_subset(4, 1, generator)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- distributed: two gloo ranks, m per rank -------------------------------------------------------------
SHARDS = (6, 3)  # rank 0: micro-batches 0, 1, 2 (k_0 = 3); rank 1: 3, 4 of sizes 2, 1 (k_1 = 2)
FIRST = (0, 3)   # the global index of each rank's first micro-batch


def _global_batch():
    g = torch.Generator().manual_seed(5)
    return torch.randn(sum(SHARDS), 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (sum(SHARDS),), generator=g)


def _rank_step(rank: int, m: int, local_subset) -> dict:
    """One GN step on this rank's shard with the sampler returning ``local_subset`` (None: the real sampler)."""
    if local_subset is not None:
        def fixed(count, size, generator):
            assert size < count  # the rule min(m, k_r): never asked to sample all of a rank's micro-batches
            return frozenset(local_subset)
        engine.sample_penalty_subset = fixed
    start = sum(SHARDS[:rank])
    x, y = _global_batch()
    model = mlp(8)
    opt = make_optimizer("GN", model, m=m, seed=SEED + rank)
    opt.step(logits_closure(model), (x[start:start + SHARDS[rank]], y[start:start + SHARDS[rank]]))
    return {"grad": flat(p.grad for p in model.parameters()), "penalty": opt.stats.penalty.item(),
            "loss": opt.stats.loss.item()}


def _two_rank_worker(rank: int, world_size: int) -> dict:
    sampler = engine.sample_penalty_subset
    results = {}
    for s0, s1 in itertools.product(range(3), range(2)):  # m = 1: one of 3 on rank 0, one of 2 on rank 1
        results[("m=1", s0, s1)] = _rank_step(rank, 1, [(s0,), (s1,)][rank])
    results["m=2"] = _rank_step(rank, 2, (0, 2) if rank == 0 else None)  # rank 1: min(2, 2) = all, no draw
    engine.sample_penalty_subset = sampler
    results["real"] = _rank_step(rank, 1, None)
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    return launch(_two_rank_worker, 2, tmp_path_factory.mktemp("subsampling_ranks"))


def _expected(terms, sampled: dict[int, float]):
    """G + Σ_j weight_j · w_j λ∇R_j and the penalty estimate, over the global micro-batches."""
    grad = sum(w * g for w, g, _, _ in terms) + sum(c * terms[j][0] * terms[j][2] for j, c in sampled.items())
    return grad, sum(c * terms[j][0] * terms[j][3] for j, c in sampled.items())


def test_distributed_subsampling_weights_each_ranks_sample_by_k_r_over_m_r(two_ranks):
    terms = reference_terms("GN", mlp(8), _global_batch())
    full, full_penalty = _expected(terms, {j: 1.0 for j in range(5)})
    grads, penalties = [], []
    for s0, s1 in itertools.product(range(3), range(2)):
        expected, penalty = _expected(terms, {FIRST[0] + s0: 3.0, FIRST[1] + s1: 2.0})
        for r in two_ranks:
            torch.testing.assert_close(r[("m=1", s0, s1)]["grad"], expected, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(r[("m=1", s0, s1)]["penalty"], penalty, rtol=1e-12, atol=1e-12)
        grads.append(two_ranks[0][("m=1", s0, s1)]["grad"])
        penalties.append(two_ranks[0][("m=1", s0, s1)]["penalty"])
    # Rank 0's and rank 1's subsets are independent: the average over all pairs is the full global penalty.
    torch.testing.assert_close(torch.stack(grads).mean(0), full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sum(penalties) / len(penalties), full_penalty, rtol=1e-12, atol=1e-12)
    expected, penalty = _expected(terms, {0: 1.5, 2: 1.5, 3: 1.0, 4: 1.0})  # m = 2: 2 of 3 on rank 0, all on rank 1
    for r in two_ranks:
        torch.testing.assert_close(r["m=2"]["grad"], expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(r["m=2"]["penalty"], penalty, rtol=1e-12, atol=1e-12)


def test_distributed_ranks_with_their_own_draws_apply_the_same_step(two_ranks):
    assert torch.equal(two_ranks[0]["real"]["grad"], two_ranks[1]["real"]["grad"])
    assert two_ranks[0]["real"]["loss"] == two_ranks[1]["real"]["loss"]
