"""Every rank decides alike: failures that one rank alone sees after the all-reduce, a trainer's hook, ranks
out of step, malformed calls, and global rank numbers in a subgroup.

One launch of two gloo ranks and one of three (CPU, float64, ``dist_support.launch``: a hang fails the launch
through its stall check) run every scenario; each scenario ends with every rank in the same state: all raise
with nothing changed, all skip, or all commit the same finite parameters (a clean step follows each failure,
so the group is shown to be in step afterwards).

* A non-finite penalty gradient on one rank (a zero input row into ``Linear(bias=False) → F.normalize``:
  L_j, g_j and R_j finite, the double backward NaN; or an overflow, ∇R = inf with R finite) raises on every
  rank, or skips on every rank with ``skip_nonfinite`` or loss scaling.
* A trainer's hook (``step(hook, batch=, loss_fn=)``) that raises on one rank: every rank rolls back.
* ``step(closure, None)`` on one rank: every rank raises, nobody waits for the timeout.
* A rank that made more step calls than the others (a step that raised on it alone): every rank raises,
  naming the counts, also when one rank's count is the mean of the others'.
* In a subgroup, messages name global ranks.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from dist_support import counting_host_reads, launch
from regopt import FisherTraceSGD, GradNormSGD, MicroBatchSGD
from regopt.distributed import Agreement
from test_distributed import (count_collectives, flat_params, make_batch, make_closure, make_model, per_rank,
                              scenarios, shard)

SHARD, MB = 4, 2  # examples per rank, micro-batch size
BAD = 1  # the rank that sees the problem


# --------------------------------------------------------------------------------------------------
# scenarios, run inside each rank


def normalized_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(5, 3, bias=False).double()


def normalized_closure(model: nn.Module, overflow: bool = False) -> Callable:
    """CE of F.normalize(model(x)); ``overflow``: plus 1e308·‖θ − θ̄‖², zero with a zero gradient, whose
    Hessian overflows (∇R_j = inf, R_j finite)."""
    def closure(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.normalize(model(x), dim=1)
        loss = F.cross_entropy(logits, y)
        if overflow:
            loss = loss + 1e308 * (model.weight - model.weight.detach()).pow(2).sum()
        return loss, logits
    return closure


def data(rank: int, world: int, poisoned: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHARD * world, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (SHARD * world,), generator=g)
    mine = slice(SHARD * rank, SHARD * rank + SHARD)
    x, y = x[mine].clone(), y[mine]
    if poisoned:
        x[1] = 0.0  # a zero row: normalize's double backward is NaN there
    return x, y


def attempt(step: Callable[[], Any]) -> str:
    try:
        step()
        return "stepped"
    except BaseException as error:  # noqa: BLE001  (the outcome is what the test checks)
        return f"{type(error).__name__}: {error}"


def state_of(model: nn.Module, opt: MicroBatchSGD) -> dict[str, Any]:
    return dict(params=flat_params(model), step_count=opt.step_count,
                grads=[None if p.grad is None else p.grad.tolist() for p in model.parameters()])


def nonfinite_penalty_gradient(rank: int, world: int, variant: str) -> dict[str, Any]:
    """Rank BAD's penalty gradient is non-finite (``variant``: the optimizer and its options); the others' is not."""
    model = normalized_model()
    cls = FisherTraceSGD if variant.startswith("FT") else GradNormSGD
    options = dict(skip=dict(skip_nonfinite=True), scaled=dict(loss_scale="dynamic")).get(variant.split("/")[-1], {})
    opt = cls(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3,
              generator=torch.Generator().manual_seed(rank), **options)
    overflow = variant.startswith("overflow") and rank == BAD
    closure = normalized_closure(model, overflow)
    before = state_of(model, opt)
    with count_collectives() as count:
        outcome = attempt(lambda: opt.step(closure, data(rank, world, rank == BAD and not overflow)))
    result = dict(outcome=outcome, unchanged=state_of(model, opt) == before, counts=dict(count),
                  skipped=opt.stats.skipped if opt.stats is not None else None, scale=opt.current_loss_scale)
    opt.step(normalized_closure(model), data(rank, world, poisoned=False))
    result.update(after=flat_params(model), after_finite=bool(torch.isfinite(torch.tensor(flat_params(model))).all()))
    return result


def raising_hook(rank: int, world: int, raising: tuple[int, ...], hooked: tuple[int, ...]) -> dict[str, Any]:
    """Ranks in ``hooked`` pass a trainer's hook, which raises on the ranks in ``raising``."""
    model = make_model()
    opt = GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3)
    mine = shard(make_batch(SHARD * world), SHARD * rank, SHARD * rank + SHARD)
    for p in model.parameters():
        p.grad = torch.full_like(p, 7.0)  # a stale .grad that a failed step must leave as it was
    calls = []

    def hook() -> None:
        calls.append([p.grad.clone() for p in model.parameters()])
        if rank in raising:
            raise ValueError(f"hook failed on rank {rank}")

    before = state_of(model, opt)
    with count_collectives() as count:
        if rank in hooked:
            outcome = attempt(lambda: opt.step(hook, batch=mine, loss_fn=make_closure(model)))
        else:
            outcome = attempt(lambda: opt.step(make_closure(model), mine))
    result = dict(outcome=outcome, unchanged=state_of(model, opt) == before, counts=dict(count),
                  hook_calls=len(calls), params=flat_params(model), step_count=opt.step_count)
    opt.step(make_closure(model), mine)
    result.update(after=flat_params(model))
    return result


def malformed_call(rank: int, world: int) -> dict[str, Any]:
    """Rank BAD calls step(closure, None); the others step on their shards."""
    model = make_model()
    opt = GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3)
    mine = shard(make_batch(SHARD * world), SHARD * rank, SHARD * rank + SHARD)
    before = state_of(model, opt)
    with count_collectives() as count:
        outcome = attempt(lambda: opt.step(make_closure(model), None if rank == BAD else mine))
    result = dict(outcome=outcome, unchanged=state_of(model, opt) == before, counts=dict(count))
    opt.step(make_closure(model), mine)
    result.update(after=flat_params(model), step_count=opt.step_count)
    return result


def extra_calls(rank: int, world: int, extra: dict[int, int]) -> dict[str, Any]:
    """Rank r first makes ``extra[r]`` step calls that raise on it alone (no trainable parameter, so it cannot
    join the all-reduce); then every rank steps, twice: both steps pair different call counts."""
    model = make_model()
    opt = MicroBatchSGD(model.parameters(), lr=0.1, micro_batch_size=MB)
    mine = shard(make_batch(SHARD * world), SHARD * rank, SHARD * rank + SHARD)
    alone = []
    for _ in range(extra.get(rank, 0)):
        model.requires_grad_(False)
        alone.append(attempt(lambda: opt.step(make_closure(model), mine)))
        model.requires_grad_(True)
    before = state_of(model, opt)
    outcomes, counts = [], []
    for _ in range(2):
        with count_collectives() as count:
            outcomes.append(attempt(lambda: opt.step(make_closure(model), mine)))
        counts.append(dict(count))
    return dict(alone=alone, outcomes=outcomes, counts=counts, unchanged=state_of(model, opt) == before)


def subgroup_failures(rank: int, world: int) -> dict[str, Any]:
    """Ranks 1 and 2 step in new_group([1, 2]); global rank 2 has an empty shard, then its hook raises."""
    group = dist.new_group([1, 2])
    if rank == 0:
        return {}
    model = make_model()
    opt = GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3, process_group=group)
    full = make_batch(2 * SHARD)
    mine = shard(full, SHARD * (rank - 1), SHARD * rank)
    empty = attempt(lambda: opt.step(make_closure(model), shard(full, 0, 0) if rank == 2 else mine))

    def hook() -> None:
        if rank == 2:
            raise ValueError("hook failed on rank 2")
    hooked = attempt(lambda: opt.step(hook, batch=mine, loss_fn=make_closure(model)))
    opt.step(make_closure(model), mine)
    return dict(empty=empty, hook=hooked, after=flat_params(model), step_count=opt.step_count)


def host_reads_per_step(rank: int, world: int) -> dict[str, Any]:
    """Host reads of one distributed step: GN and LB without a hook, GN with one; and the counter's control."""
    mine = shard(make_batch(SHARD * world), SHARD * rank, SHARD * rank + SHARD)
    out: dict[str, Any] = {}
    for name, cls, extra, hook in (("GN", GradNormSGD, dict(penalty=0.3), None),
                                   ("LB", MicroBatchSGD, {}, None),
                                   ("GN-hook", GradNormSGD, dict(penalty=0.3), lambda: None)):
        model = make_model()
        opt = cls(model.parameters(), lr=0.1, micro_batch_size=MB, **extra)
        opt.step(make_closure(model), mine)  # warm-up
        with counting_host_reads() as reads:
            if hook is None:
                opt.step(make_closure(model), mine)
            else:
                opt.step(hook, batch=mine, loss_fn=make_closure(model))
        out[name] = reads
    with counting_host_reads() as control:
        torch.ones(2).sum().item()
    out["control"] = control
    return out


def wire_volume(rank: int, world: int) -> dict[str, Any]:
    """Bytes each all_reduce of a GN step received, without and with a trainer's hook."""
    mine = shard(make_batch(SHARD * world), SHARD * rank, SHARD * rank + SHARD)
    model = make_model()
    opt = GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3)
    sent: dict[str, list[int]] = {"plain": [], "hook": []}
    original = dist.all_reduce
    key = "plain"

    def recording(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        sent[key].append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)
    dist.all_reduce = recording
    try:
        opt.step(make_closure(model), mine)
        key = "hook"
        opt.step(lambda: None, batch=mine, loss_fn=make_closure(model))
    finally:
        dist.all_reduce = original
    return dict(sent=sent, numel=sum(p.numel() for p in model.parameters()), tensors=len(list(model.parameters())))


NONFINITE = ("GN/raise", "GN/skip", "GN/scaled", "FT/raise", "FT/skip", "overflow/raise", "overflow/skip")


def common(rank: int, world: int) -> dict[str, Callable[[], Any]]:
    named: dict[str, Callable[[], Any]] = {
        f"nonfinite/{variant}": (lambda variant=variant: nonfinite_penalty_gradient(rank, world, variant))
        for variant in NONFINITE
    }
    named["hook/one-raises"] = lambda: raising_hook(rank, world, (BAD,), tuple(range(world)))
    named["hook/two-raise"] = lambda: raising_hook(rank, world, (0, BAD), tuple(range(world)))
    named["hook/only-one-rank-has-one"] = lambda: raising_hook(rank, world, (), (BAD,))
    named["hook/raises-where-the-others-have-none"] = lambda: raising_hook(rank, world, (BAD,), (BAD,))
    named["malformed-call"] = lambda: malformed_call(rank, world)
    named["out-of-step/one-extra"] = lambda: extra_calls(rank, world, {BAD: 1})
    named["host-reads"] = lambda: host_reads_per_step(rank, world)
    named["wire"] = lambda: wire_volume(rank, world)
    return named


def two_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    return scenarios(rank, common(rank, world_size))


def three_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    named = common(rank, world_size)
    named["out-of-step/mean"] = lambda: extra_calls(rank, world_size, {1: 1, 2: 2})  # counts 1, 2, 3
    named["subgroup"] = lambda: subgroup_failures(rank, world_size)
    return scenarios(rank, named)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(two_rank_worker, 2, tmp_path_factory.mktemp("agreement_two"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(three_rank_worker, 3, tmp_path_factory.mktemp("agreement_three"))


@pytest.fixture(params=[2, 3])
def world(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def ranks_of(world: int, request: pytest.FixtureRequest) -> Callable[[str], list[Any]]:
    results = request.getfixturevalue("two_ranks" if world == 2 else "three_ranks")
    return lambda name: per_rank(results, name)


def same_finite_parameters_after(ranks: list[dict]) -> None:
    for rank, r in enumerate(ranks):
        assert r["after"] == ranks[0]["after"], f"rank {rank}'s parameters differ from rank 0's after a clean step"
        assert torch.isfinite(torch.tensor(r["after"])).all(), f"rank {rank}: non-finite parameters"


# --------------------------------------------------------------------------------------------------
# a non-finite penalty gradient on one rank


@pytest.mark.parametrize("variant", NONFINITE)
def test_a_nonfinite_penalty_gradient_on_one_rank_stops_every_rank(ranks_of: Callable, variant: str) -> None:
    ranks = ranks_of(f"nonfinite/{variant}")
    skips = not variant.endswith("raise")
    for rank, r in enumerate(ranks):
        assert r["unchanged"], f"rank {rank} changed its parameters, .grad or step count"
        assert r["counts"] == {"all_reduce": 1}, f"rank {rank}: {r['counts']}"
        if skips:
            assert r["outcome"] == "stepped" and r["skipped"] is True, f"rank {rank}: {r['outcome']}"
        else:
            assert r["outcome"].startswith("FloatingPointError: non-finite"), f"rank {rank}: {r['outcome']}"
    if variant.endswith("scaled"):
        assert {r["scale"] for r in ranks} == {2.0**15}, "every rank halves its loss scale"
    if not skips:
        assert "penalty gradient squared norm ‖∇R_j‖²" in ranks[BAD]["outcome"]
        assert "another rank's micro-batch" in ranks[0]["outcome"]
    same_finite_parameters_after(ranks)


# --------------------------------------------------------------------------------------------------
# a trainer's hook


def test_a_hook_that_raises_on_one_rank_rolls_back_every_rank(ranks_of: Callable) -> None:
    ranks = ranks_of("hook/one-raises")
    for rank, r in enumerate(ranks):
        assert r["hook_calls"] == 1
        assert r["unchanged"], f"rank {rank} changed its parameters, .grad or step count"
        assert r["counts"] == {"all_reduce": 2}, f"rank {rank}: {r['counts']}"
        if rank == BAD:
            assert r["outcome"] == f"ValueError: hook failed on rank {BAD}"
        else:
            assert r["outcome"].startswith(f"RuntimeError: another rank (rank {BAD}) raised in the trainer's closure")
    same_finite_parameters_after(ranks)


def test_hooks_that_raise_on_two_ranks_are_counted(ranks_of: Callable) -> None:
    ranks = ranks_of("hook/two-raise")
    for rank, r in enumerate(ranks):
        assert r["unchanged"]
        if rank in (0, BAD):
            assert r["outcome"] == f"ValueError: hook failed on rank {rank}"
        else:
            assert r["outcome"].startswith("RuntimeError: 2 other ranks raised in the trainer's closure")
    same_finite_parameters_after(ranks)


def test_a_hook_on_one_rank_only_commits_everywhere(ranks_of: Callable) -> None:
    """The ranks without a hook learn from the step's all-reduce that one exists and join its agreement."""
    ranks = ranks_of("hook/only-one-rank-has-one")
    for rank, r in enumerate(ranks):
        assert r["outcome"] == "stepped" and r["step_count"] == 1
        assert r["hook_calls"] == (1 if rank == BAD else 0)
        assert r["counts"] == {"all_reduce": 2}, f"rank {rank}: {r['counts']}"
        assert r["params"] == ranks[0]["params"]
    same_finite_parameters_after(ranks)


def test_a_hook_that_raises_where_the_others_have_none_rolls_back_every_rank(ranks_of: Callable) -> None:
    ranks = ranks_of("hook/raises-where-the-others-have-none")
    for rank, r in enumerate(ranks):
        assert r["unchanged"], f"rank {rank} changed its parameters, .grad or step count"
        expected = "ValueError: hook failed" if rank == BAD else f"RuntimeError: another rank (rank {BAD}) raised"
        assert r["outcome"].startswith(expected), f"rank {rank}: {r['outcome']}"
    same_finite_parameters_after(ranks)


# --------------------------------------------------------------------------------------------------
# calls that raise on one rank, ranks out of step


def test_a_malformed_call_on_one_rank_raises_on_every_rank(ranks_of: Callable) -> None:
    ranks = ranks_of("malformed-call")
    for rank, r in enumerate(ranks):
        assert r["unchanged"] and r["counts"] == {"all_reduce": 1}, f"rank {rank}: {r['counts']}"
        if rank == BAD:
            assert r["outcome"].startswith("TypeError: GradNormSGD.step needs a closure and a batch")
        else:
            assert r["outcome"].startswith(f"FloatingPointError: another rank (rank {BAD}) failed before the "
                                           "step's all-reduce: its step() call was malformed"), r["outcome"]
        assert r["step_count"] == 1
    same_finite_parameters_after(ranks)


def check_out_of_step(ranks: list[dict], counts: dict[int, int]) -> None:
    """Every rank raises at both steps, naming its own call count; nothing changes."""
    for rank, r in enumerate(ranks):
        assert all(o.startswith("ValueError: no parameter requires grad") for o in r["alone"])
        assert r["unchanged"], f"rank {rank} changed its parameters, .grad or step count"
        for t, outcome in enumerate(r["outcomes"]):
            calls = counts.get(rank, 0) + t + 1
            assert outcome.startswith("RuntimeError: the ranks of the process group are not at the same step: "
                                      f"this rank (rank {rank}) is at its step call {calls} "), f"rank {rank}: {outcome}"
        assert r["counts"] == [{"all_reduce": 1}] * 2


def test_ranks_at_different_step_calls_raise_on_every_rank(ranks_of: Callable) -> None:
    ranks = ranks_of("out-of-step/one-extra")
    check_out_of_step(ranks, {BAD: 1})
    assert f"stand at these calls modulo 16: {len(ranks) - 1} at 1, 1 at 2." in ranks[0]["outcomes"][0]


def test_a_rank_at_the_mean_call_count_raises_too(three_ranks: list[dict]) -> None:
    """Calls 1, 2, 3: rank 1's count is the mean, so comparing one sum with R·(own count) would miss it."""
    ranks = per_rank(three_ranks, "out-of-step/mean")
    check_out_of_step(ranks, {1: 1, 2: 2})
    assert "1 at 1, 1 at 2, 1 at 3" in ranks[1]["outcomes"][0]


def test_messages_in_a_subgroup_name_global_ranks(three_ranks: list[dict]) -> None:
    ranks = per_rank(three_ranks, "subgroup")
    assert ranks[1]["empty"].startswith("FloatingPointError: another rank (rank 2) failed before the step's "
                                        "all-reduce: its shard of the batch is malformed or empty"), ranks[1]["empty"]
    assert ranks[2]["empty"].startswith("ValueError: batch is empty")
    assert ranks[1]["hook"].startswith("RuntimeError: another rank (rank 2) raised"), ranks[1]["hook"]
    assert ranks[2]["hook"] == "ValueError: hook failed on rank 2"
    assert ranks[1]["after"] == ranks[2]["after"] and ranks[1]["step_count"] == ranks[2]["step_count"] == 1


# --------------------------------------------------------------------------------------------------
# cost: host reads and the wire


def test_a_distributed_step_reads_the_host_once(ranks_of: Callable) -> None:
    """One host read per step (the settle transfer: finiteness, usage, Σk, agreement); one more with a hook."""
    for r in ranks_of("host-reads"):
        assert r["control"] == ["host_reads_per_step"]
        assert r["GN"] == ["settle"] and r["LB"] == ["settle"], r
        assert r["GN-hook"] == ["settle", "agree_on_hook"], r


def test_the_wire_is_unchanged_without_a_hook(ranks_of: Callable) -> None:
    """2N + 9 + T float64 values per GN step; a hook adds one all-reduce of two values."""
    for r in ranks_of("wire"):
        n, tensors = r["numel"], r["tensors"]
        assert r["sent"]["plain"] == [8 * (2 * n + 9 + tensors)]
        assert r["sent"]["hook"] == [8 * (2 * n + 9 + tensors), 8 * 2]


# --------------------------------------------------------------------------------------------------
# the agreement slots, without processes


@pytest.mark.parametrize("ranks", [2, 3, 4, 5])
def test_every_rank_reads_the_same_verdict_from_the_call_digits(ranks: int) -> None:
    """Σ_r d(c_r) = R·d(c_own) holds on every rank or on none, and holds iff all c_r agree modulo m."""
    agreement = Agreement(ranks, 2**24)
    m = agreement.residues
    for calls in itertools.product(range(2 * m + 1), repeat=ranks) if ranks <= 3 else \
            itertools.product([0, 1, 2, m, m + 1, 2 * m], repeat=ranks):
        total = sum(agreement.digit(c) for c in calls)
        verdicts = {total == ranks * agreement.digit(c) for c in calls}
        assert verdicts == {len({c % m for c in calls}) == 1}, calls
        standing = agreement.at_residue(total * agreement.kind_base)
        assert standing == {res: sum(c % m == res for c in calls) for res in range(m)}


@pytest.mark.parametrize("ranks, exact_below, residues, hook_weight", [
    (2, 2**24, 14, 3), (3, 2**24, 11, 4), (64, 2**24, 3, 65), (2364, 2**24, 2, 2365), (2365, 2**24, 1, 2366),
    (4096, 2**24, 1, 0), (3, 2**53, 16, 4),
])
def test_the_slots_stay_exact_integers(ranks: int, exact_below: int, residues: int, hook_weight: int) -> None:
    agreement = Agreement(ranks, exact_below)
    assert agreement.residues == residues and agreement.hook_weight == hook_weight
    largest_digits = ranks * agreement.base ** (residues - 2) if residues > 1 else 0
    largest_a2 = 3 * ranks + agreement.kind_base * largest_digits
    assert largest_a2 < exact_below and ranks * (1 + hook_weight) < exact_below
