"""Distributed edge cases: failures before the all-reduce, per-rank random draws, averaged buffers.

One launch of two gloo ranks and one of three (CPU, float64, ``dist_support.launch``) run every
scenario; the tests below read what each rank wrote back.

* A rank whose shard is empty or malformed (leaves of different sizes), or whose closure raises
  on its first micro-batch, joins the step's one all-reduce with a poisoned buffer: it re-raises its
  own error, every other rank raises FloatingPointError naming it and the problem, nothing changes,
  and the group stays in step (a clean step follows).
* ``rank_independent_draws`` (default True): ranks whose generators share a seed draw different UJ
  directions / FT labels; a run resumed from ``state_dict()`` on two ranks is bit-identical. The
  flag off (draw for draw as a single process) is what test_distributed.py checks against the
  single-process run.
* ``exact_grad_norm=False``: the all-reduce carries G ± λP alone (half the values), same update.
* ``regopt.distributed.average_buffers``: the floating buffers become the mean over the ranks in
  one all-reduce; integer buffers (``num_batches_tracked``) stay as they were.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from dist_support import launch
from regopt import FisherTraceSGD, GradNormSGD, JacobianRegSGD, engine
from regopt import distributed as regopt_distributed
from test_distributed import (count_collectives, flat_params, make_batch, make_closure, make_model, per_rank,
                              scenarios, shard)

SHARD, MB = 4, 2  # examples per rank, micro-batch size
FAILING = 1  # the rank that fails
FAILURES = ("empty", "mismatched", "closure-first", "empty-skip-nonfinite", "empty-applied-only")


# --------------------------------------------------------------------------------------------------
# scenarios, run inside each rank


def failure_before_all_reduce(rank: int, world_size: int, failure: str, failing: tuple[int, ...]) -> dict[str, Any]:
    """Ranks in ``failing`` fail before their all-reduce (``failure``); every rank reports what it raised."""
    full = make_batch(SHARD * world_size)
    mine = shard(full, SHARD * rank, SHARD * rank + SHARD)
    model = make_model()
    options = dict(skip_nonfinite=True) if failure.endswith("skip-nonfinite") else {}
    if failure.endswith("applied-only"):  # the poisoned buffer must match the shorter wire
        options = dict(exact_grad_norm=False)
    opt = GradNormSGD(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3, **options)
    closure = make_closure(model)
    if rank in failing:
        if failure.startswith("empty"):
            mine = shard(full, 0, 0)
        elif failure == "mismatched":
            mine = (mine[0], mine[1][:3], mine[2], mine[3])
        else:
            def closure(*args: Tensor) -> Any:  # noqa: F811  (raises on the first micro-batch)
                raise RuntimeError(f"closure failed on rank {rank}")
    before = flat_params(model)
    with count_collectives() as count:
        try:
            opt.step(closure, mine)
            outcome = "stepped"
        except Exception as error:  # noqa: BLE001  (the outcome is what the test checks)
            outcome = f"{type(error).__name__}: {error}"
    result = dict(outcome=outcome, unchanged=flat_params(model) == before, step_count=opt.step_count,
                  counts=dict(count))
    opt.step(make_closure(model), shard(full, SHARD * rank, SHARD * rank + SHARD))  # the group is still in step
    result.update(after_clean_step=flat_params(model))
    return result


def recorded_draws(rank: int, cls: type, kind: dict[str, Any], independent: bool) -> list[tuple[str, list[float]]]:
    """Per micro-batch of one step, every rank's generator seeded alike: a digest of the state of the
    generator the penalty draws from (it fixes the random numbers: FT's labels also depend on the
    logits, hence on the shard) and the draw itself (UJ's direction, FT's labels)."""
    model = make_model()
    generator = torch.Generator().manual_seed(7)
    opt = cls(model.parameters(), lr=0.1, micro_batch_size=MB, penalty=0.3, generator=generator,
              rank_independent_draws=independent, **kind)
    draws: list[tuple[str, list[float]]] = []
    original = engine._penalty_draw

    def recording(setup: Any, out: Any) -> Tensor | None:
        state = hashlib.sha256(setup.generator.get_state().numpy().tobytes()).hexdigest()
        draw = original(setup, out)
        draws.append((state, draw.double().reshape(-1).tolist()))
        return draw
    engine._penalty_draw = recording
    try:
        opt.step(make_closure(model), shard(make_batch(2 * SHARD), SHARD * rank, SHARD * rank + SHARD))
    finally:
        engine._penalty_draw = original
    return draws


def resumed_run(rank: int) -> dict[str, Any]:
    """Three UJ steps (penalty on 1 of 2 micro-batches per rank), and the same run resumed after its first."""
    full = make_batch(2 * SHARD)
    mine = shard(full, SHARD * rank, SHARD * rank + SHARD)

    def build(seed: int) -> tuple[nn.Module, JacobianRegSGD]:
        model = make_model()
        opt = JacobianRegSGD(model.parameters(), lr=0.1, momentum=0.9, micro_batch_size=MB, penalty=0.3,
                             kind="unit", penalty_micro_batches=1, generator=torch.Generator().manual_seed(seed))
        return model, opt

    model, opt = build(11)
    for t in range(3):
        opt.step(make_closure(model), mine)
        if t == 0:
            saved = copy.deepcopy((model.state_dict(), opt.state_dict()))
    resumed_model, resumed_opt = build(999)  # another seed: the loaded state must win
    resumed_model.load_state_dict(saved[0])
    resumed_opt.load_state_dict(saved[1])
    for _ in range(2):
        resumed_opt.step(make_closure(resumed_model), mine)
    return dict(params=flat_params(model), resumed=flat_params(resumed_model))


def averaged_buffers(rank: int) -> dict[str, Any]:
    """BatchNorm buffers (float64) and a float32 buffer set per rank, then ``average_buffers``."""
    model = make_model(batch_norm=True)
    batch_norm = model[1]
    model.register_buffer("scale32", torch.full((3,), float(rank), dtype=torch.float32))
    with torch.no_grad():
        batch_norm.running_mean.copy_(torch.arange(8, dtype=torch.float64) * (rank + 1))
        batch_norm.running_var.fill_(1.0 + rank)
        batch_norm.num_batches_tracked.fill_(5 + rank)
    with count_collectives() as count:
        regopt_distributed.average_buffers(model)
    return dict(mean=batch_norm.running_mean.tolist(), var=batch_norm.running_var.tolist(),
                tracked=int(batch_norm.num_batches_tracked), scale32=model.scale32.tolist(),
                scale32_dtype=str(model.scale32.dtype), counts=dict(count), params=flat_params(model))


def applied_gradient_wire(rank: int, exact_grad_norm: bool) -> dict[str, Any]:
    """Two GN steps (momentum; one parameter group ascending) sending G and P, or G ± λP alone."""
    model = make_model()
    first, rest = list(model.parameters())[:2], list(model.parameters())[2:]
    opt = GradNormSGD([{"params": first}, {"params": rest, "maximize": True}], lr=0.1, momentum=0.9,
                      micro_batch_size=MB, penalty=0.3, exact_grad_norm=exact_grad_norm)
    sent: list[int] = []
    original = torch.distributed.all_reduce

    def recording(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        sent.append(tensor.numel() * tensor.element_size())
        return original(tensor, *args, **kwargs)
    stats = []
    torch.distributed.all_reduce = recording
    try:
        for _ in range(2):
            opt.step(make_closure(model), shard(make_batch(2 * SHARD), SHARD * rank, SHARD * rank + SHARD))
            s = opt.stats
            stats.append([s.loss.item(), s.penalty.item(), s.micro_grad_sq_norm.item(), s.grad_norm.item()])
    finally:
        torch.distributed.all_reduce = original
    return dict(params=flat_params(model), stats=stats, sent=sent,
                numel=sum(p.numel() for p in model.parameters()), tensors=len(list(model.parameters())))


class HeldoutData:
    """The little of benchmarks.data.DataSplits that evaluation reads: eval batches of the held-out split."""

    device = torch.device("cpu")

    def eval_batches(self, split: str, batch_size: int, limit: int | None) -> Any:
        x, _, _, _ = make_batch(8, seed=5)
        yield from ((x[i:i + batch_size], torch.zeros(len(x[i:i + batch_size]), dtype=torch.long))
                    for i in range(0, 8, batch_size))


def heldout_evaluation_averages(rank: int) -> dict[str, Any]:
    """benchmarks.repro.evaluation.heldout_accuracy under torchrun, without recalibration: buffers averaged first."""
    from benchmarks.repro.distributed import Dist
    from benchmarks.repro.evaluation import heldout_accuracy
    model = make_model(batch_norm=True)
    with torch.no_grad():
        model[1].running_mean.fill_(float(rank))
    config = dict(bn_recalibrate=0, eval_batch_size=4, eval_size=None)
    with count_collectives() as count:
        heldout_accuracy(model, HeldoutData(), config, MB, seed=0, step=1, ctx=Dist(rank, 2))
    return dict(mean=model[1].running_mean.tolist(), counts=dict(count))


def two_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    named: dict[str, Callable[[], Any]] = {
        f"fail/{failure}": (lambda failure=failure: failure_before_all_reduce(rank, world_size, failure, (FAILING,)))
        for failure in FAILURES
    }
    for independent in (True, False):
        named[f"draws/UJ/{independent}"] = lambda independent=independent: recorded_draws(
            rank, JacobianRegSGD, dict(kind="unit"), independent)
        named[f"draws/FT/{independent}"] = lambda independent=independent: recorded_draws(
            rank, FisherTraceSGD, {}, independent)
    named["resume"] = lambda: resumed_run(rank)
    named["buffers"] = lambda: averaged_buffers(rank)
    named["heldout-evaluation"] = lambda: heldout_evaluation_averages(rank)
    for exact in (True, False):
        named[f"wire/exact-grad-norm/{exact}"] = lambda exact=exact: applied_gradient_wire(rank, exact)
    return scenarios(rank, named)


def three_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    named: dict[str, Callable[[], Any]] = {
        f"fail/{failure}": (lambda failure=failure: failure_before_all_reduce(rank, world_size, failure, (FAILING,)))
        for failure in FAILURES
    }
    named["fail/two-ranks-empty"] = lambda: failure_before_all_reduce(rank, world_size, "empty", (1, 2))
    named["buffers"] = lambda: averaged_buffers(rank)
    return scenarios(rank, named)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(two_rank_worker, 2, tmp_path_factory.mktemp("edges_two"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(three_rank_worker, 3, tmp_path_factory.mktemp("edges_three"))


# --------------------------------------------------------------------------------------------------
# failures before the all-reduce

OWN_ERRORS = {
    "empty": "ValueError: batch is empty",
    "empty-skip-nonfinite": "ValueError: batch is empty",
    "empty-applied-only": "ValueError: batch is empty",
    "mismatched": "ValueError: batch leaves disagree on the leading (batch) size",
    "closure-first": f"RuntimeError: closure failed on rank {FAILING}",
}
PROBLEMS = {
    "empty": "its shard of the batch is malformed or empty",
    "empty-skip-nonfinite": "its shard of the batch is malformed or empty",
    "empty-applied-only": "its shard of the batch is malformed or empty",
    "mismatched": "its shard of the batch is malformed or empty",
    "closure-first": "it raised an exception before the all-reduce",
}


def check_failure(ranks: list[dict], failing: tuple[int, ...], own: str, others: str) -> None:
    for rank, r in enumerate(ranks):
        if rank in failing:
            assert r["outcome"].startswith(own), f"rank {rank}: {r['outcome']}"
        else:
            assert r["outcome"].startswith("FloatingPointError: ") and others in r["outcome"], \
                f"rank {rank}: {r['outcome']}"
        assert r["unchanged"] and r["step_count"] == 0, f"rank {rank} changed its parameters or step count"
        assert r["counts"] == {"all_reduce": 1}, f"rank {rank}: {r['counts']}"
        assert r["after_clean_step"] == ranks[0]["after_clean_step"], "ranks diverged after the failed step"


@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.parametrize("world", [2, 3])
def test_a_failure_before_the_all_reduce_reaches_every_rank(two_ranks: list[dict], three_ranks: list[dict],
                                                             world: int, failure: str) -> None:
    """The failing rank re-raises its own error; the others name it and the problem (even with skip_nonfinite)."""
    ranks = per_rank(two_ranks if world == 2 else three_ranks, f"fail/{failure}")
    check_failure(ranks, (FAILING,), OWN_ERRORS[failure], f"another rank (rank {FAILING}) failed before the "
                                                          f"step's all-reduce: {PROBLEMS[failure]}")


def test_two_failing_ranks_are_counted(three_ranks: list[dict]) -> None:
    ranks = per_rank(three_ranks, "fail/two-ranks-empty")
    check_failure(ranks, (1, 2), OWN_ERRORS["empty"], "2 other ranks failed before the step's all-reduce: "
                                                      "its shard of the batch is malformed or empty")


def test_peer_failure_message_names_the_rank_or_the_count() -> None:
    assert regopt_distributed.peer_failure_message(1, 4, regopt_distributed.FAILURE_EXCEPTION).startswith(
        "another rank (rank 4) failed before the step's all-reduce: it raised an exception")
    failures = regopt_distributed.FAILURE_SHARD + regopt_distributed.FAILURE_EXCEPTION
    mixed = regopt_distributed.peer_failure_message(2, 3, failures)
    assert mixed.startswith("2 other ranks failed")
    assert all(t in mixed for t in regopt_distributed.FAILURE_KINDS.values())


# --------------------------------------------------------------------------------------------------
# random draws per rank


@pytest.mark.parametrize("name", ["UJ", "FT"])
def test_ranks_draw_independently_by_default(two_ranks: list[dict], name: str) -> None:
    independent = per_rank(two_ranks, f"draws/{name}/True")
    shared = per_rank(two_ranks, f"draws/{name}/False")
    assert len(independent[0]) == len(independent[1]) == len(shared[0]) == SHARD // MB
    for j in range(SHARD // MB):
        assert independent[0][j][0] != independent[1][j][0], f"micro-batch {j}: both ranks drew from one state"
        assert shared[0][j][0] == shared[1][j][0], "rank_independent_draws=False: the same state on both ranks"
        assert independent[0][j][0] != shared[0][j][0]
        if name == "UJ":  # the direction depends on the random numbers alone
            assert independent[0][j][1] != independent[1][j][1]
            assert shared[0][j][1] == shared[1][j][1]


def test_resume_on_two_ranks_is_bit_identical(two_ranks: list[dict]) -> None:
    ranks = per_rank(two_ranks, "resume")
    for rank, r in enumerate(ranks):
        assert r["resumed"] == r["params"], f"rank {rank}: the resumed run differs"
        assert r["params"] == ranks[0]["params"], "the ranks' parameters differ"


def test_rank_draw_generator_is_a_function_of_state_and_rank() -> None:
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    streams = []
    for rank in (0, 1, 0):
        generator.set_state(state)
        streams.append(torch.rand(4, generator=regopt_distributed.rank_draw_generator(generator, rank)).tolist())
        assert not torch.equal(generator.get_state(), state), "the user's generator must advance"
    assert streams[0] == streams[2] and streams[0] != streams[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rank_draw_generator_on_cuda_stays_on_the_device() -> None:
    generator = torch.Generator("cuda").manual_seed(3)
    state = generator.get_state()
    derived = regopt_distributed.rank_draw_generator(generator, 1)
    assert derived.device.type == "cuda" and not torch.equal(generator.get_state(), state)
    generator.set_state(state)
    again = regopt_distributed.rank_draw_generator(generator, 1)
    assert torch.equal(torch.rand(3, generator=derived, device="cuda"), torch.rand(3, generator=again, device="cuda"))


# --------------------------------------------------------------------------------------------------
# communication volume


def test_applied_gradient_alone_halves_the_wire_and_takes_the_same_steps(two_ranks: list[dict]) -> None:
    """exact_grad_norm=False: N + 9 + T float64 values per step instead of 2N + 9 + T, the same update
    (to rounding, also for an ascending group), the same stats but ‖G‖, which is NaN (not measured)."""
    both, alone = per_rank(two_ranks, "wire/exact-grad-norm/True"), per_rank(two_ranks, "wire/exact-grad-norm/False")
    for rank in range(2):
        n, tensors = both[rank]["numel"], both[rank]["tensors"]
        assert both[rank]["sent"] == [8 * (2 * n + 9 + tensors)] * 2
        assert alone[rank]["sent"] == [8 * (n + 9 + tensors)] * 2
        torch.testing.assert_close(torch.tensor(alone[rank]["params"], dtype=torch.float64),
                                   torch.tensor(both[rank]["params"], dtype=torch.float64), rtol=1e-10, atol=1e-10)
        assert alone[rank]["params"] == alone[0]["params"], "the ranks' parameters differ"
        for exact_stats, applied_stats in zip(both[rank]["stats"], alone[rank]["stats"]):
            torch.testing.assert_close(torch.tensor(applied_stats[:3], dtype=torch.float64),
                                       torch.tensor(exact_stats[:3], dtype=torch.float64), rtol=1e-10, atol=1e-10)
            assert math.isnan(applied_stats[3]) and math.isfinite(exact_stats[3])


# --------------------------------------------------------------------------------------------------
# buffers


@pytest.mark.parametrize("world", [2, 3])
def test_average_buffers_averages_floating_buffers_in_one_all_reduce(two_ranks: list[dict], three_ranks: list[dict],
                                                                     world: int) -> None:
    ranks = per_rank(two_ranks if world == 2 else three_ranks, "buffers")
    mean = (torch.arange(8, dtype=torch.float64) * sum(r + 1 for r in range(world)) / world).tolist()
    for rank, r in enumerate(ranks):
        as_float64 = dict(dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(r["mean"], **as_float64), torch.tensor(mean, **as_float64),
                                   rtol=1e-15, atol=0)
        torch.testing.assert_close(torch.tensor(r["var"], **as_float64),
                                   torch.full((8,), 1.0 + (world - 1) / 2, **as_float64), rtol=1e-15, atol=0)
        assert r["scale32"] == [(world - 1) / 2] * 3 and r["scale32_dtype"] == "torch.float32"
        assert r["tracked"] == 5 + rank, "integer buffers must be left alone"
        assert r["counts"] == {"all_reduce": 1}
        assert r["params"] == ranks[0]["params"]


def test_heldout_evaluation_under_torchrun_averages_batchnorm_statistics(two_ranks: list[dict]) -> None:
    """Without recalibration, the reproduction's evaluation averages the ranks' statistics before it evaluates."""
    for r in per_rank(two_ranks, "heldout-evaluation"):
        assert r["mean"] == [0.5] * 8  # (0 + 1) / 2
        assert r["counts"] == {"all_reduce": 2}  # average_buffers, then the accuracy counts (sum_across)


def test_average_buffers_without_a_process_group_changes_nothing() -> None:
    model = make_model(batch_norm=True)
    before = copy.deepcopy(model.state_dict())
    with count_collectives() as count:
        regopt_distributed.average_buffers(model)
    assert not count
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
