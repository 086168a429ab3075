"""Distributed steps: every rank passes its shard, and the step is the single-process step on the concatenation.

Two process groups are spawned for the whole module (gloo on 127.0.0.1, CPU, float64): two
ranks with equal shards and three ranks with unequal ones. Each worker runs every scenario
and writes plain numbers back; the tests below compare them. Every rank also computes the
single-process reference itself (``process_group=None`` on the full batch), so nothing but
the numbers crosses processes. ``dist_support.launch`` spawns the ranks: a collective times out
after ``dist_support.COLLECTIVE_TIMEOUT_S`` (reported as that scenario's error) and a launch in
which a rank reports no progress for ``dist_support.STALL_TIMEOUT_S`` fails, so a broken step
fails instead of hanging, while a machine busy with other jobs only makes the launch slower.

Micro-batch partitions: a single process splits the concatenated batch into consecutive
micro-batches; the ranks split their own shards. The two agree when every shard but the
last holds a multiple of ``micro_batch_size`` examples, and only then are the penalties, the
iterative-grafting mean and the statistics comparable with the single-process run on the
concatenation; with other shards the tests compare against a reference built over the
ranks' own partition (``partition_reference``), and G-only updates (LB, normalized,
external grafting, a model without batch statistics) against the concatenation directly.

Random draws (FT labels, UJ directions): with ``rank_independent_draws=False`` each rank draws
for its own micro-batches from its own generator (the default, independent draws per rank, is
tested in test_distributed_edges.py). The reference records its generator state at the start of each micro-batch
(in the closure, which runs before that micro-batch's draw) and every rank starts its step
from the state recorded at its first example, so the draws, hence the steps, are the same.
"""

from __future__ import annotations

import copy
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

import dist_support
from dist_support import launch, report
import regopt
from regopt import FisherTraceSGD, GradNormSGD, GraftedSGD, JacobianRegSGD, MicroBatchSGD
from regopt import distributed as regopt_distributed
from regopt.engine import Accumulation

TOL = dict(rtol=1e-10, atol=1e-10)
LR = 0.1
SEED = 123

# --------------------------------------------------------------------------------------------------
# running scenarios inside a rank (launching: dist_support.launch)


def scenarios(rank: int, named: dict[str, Callable[[], Any]]) -> dict[str, Any]:
    """Run each scenario, keeping its traceback instead of its result when it raises."""
    results = {}
    for name, scenario in named.items():
        try:
            results[name] = scenario()
            report(f"scenario {name}: done")
        except Exception:  # reported by the test that reads this scenario
            results[name] = {"error": f"rank {rank}: {traceback.format_exc()}"}
            report(f"scenario {name}: raised")
    return results


# --------------------------------------------------------------------------------------------------
# the model, the data, the closure, counting collectives

COLLECTIVES = (
    "all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "all_gather_object",
    "broadcast", "broadcast_object_list", "reduce", "reduce_scatter", "reduce_scatter_tensor", "all_to_all",
    "all_to_all_single", "gather", "scatter", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv",
    "batch_isend_irecv",
)


@contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count the calls of every torch.distributed collective while inside."""
    counts: Counter = Counter()
    saved = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name: str, fn: Callable) -> Callable:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    for name, fn in saved.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def make_model(seed: int = 0, batch_norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Linear(5, 8), *([nn.BatchNorm1d(8)] if batch_norm else []), nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers).double()


def make_batch(size: int, seed: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x, y, index, poison): ``index`` locates the micro-batch, ``poison`` (zeros) is added to the loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (size,), generator=g)
    return x, y, torch.arange(size), torch.zeros(size, dtype=torch.float64)


def shard(batch: tuple[Tensor, ...], start: int, stop: int) -> tuple[Tensor, ...]:
    return tuple(t[start:stop] for t in batch)


def make_closure(forward: Callable[[Tensor], Tensor], draws: dict | None = None,
                 generator: torch.Generator | None = None) -> Callable:
    def closure(x: Tensor, y: Tensor, index: Tensor, poison: Tensor) -> tuple[Tensor, Tensor]:
        if draws is not None:  # the generator state before this micro-batch's draw, first call only
            draws.setdefault(int(index[0]), generator.get_state())
        logits = forward(x)
        return F.cross_entropy(logits, y) + poison.sum(), logits
    return closure


def flat_params(model: nn.Module) -> list[float]:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


def stats_of(optimizer: MicroBatchSGD) -> dict[str, Any]:
    s = optimizer.stats
    return dict(loss=s.loss.item(), penalty=s.penalty.item(), micro_grad_sq_norm=s.micro_grad_sq_norm.item(),
                grad_norm=s.grad_norm.item(), num_micro_batches=s.num_micro_batches, skipped=s.skipped)


# name -> (class, kwargs, draws random numbers)
def grad_norm_adamw(params: Any, lr: float, **options: Any) -> regopt.GradNorm:
    """GN around AdamW: the wrapper form, whose base takes the update."""
    return regopt.GradNorm(torch.optim.AdamW(params, lr=lr, weight_decay=1e-2), **options)


CONFIGS: dict[str, tuple[Callable, dict[str, Any], bool]] = {
    "LB": (MicroBatchSGD, {}, False),
    "LB-momentum-clip": (MicroBatchSGD, dict(momentum=0.9, nesterov=True, weight_decay=1e-2, max_grad_norm=0.05),
                         False),
    "GN": (GradNormSGD, dict(penalty=0.3), False),
    "GN-finite-difference": (GradNormSGD, dict(penalty=0.3, method="finite_difference"), False),
    "GN-momentum": (GradNormSGD, dict(penalty=0.3, momentum=0.9, dampening=0.1, weight_decay=1e-2), False),
    "FT": (FisherTraceSGD, dict(penalty=0.3), True),
    "FT-finite-difference": (FisherTraceSGD, dict(penalty=0.3, method="finite_difference"), True),
    "AJ": (JacobianRegSGD, dict(penalty=0.3, kind="average"), False),
    "UJ": (JacobianRegSGD, dict(penalty=0.3, kind="unit"), True),
    "graft-iterative": (GraftedSGD, dict(mode="iterative"), False),
    "graft-external": (GraftedSGD, dict(mode="external", norms=[0.7, 0.4]), False),
    "graft-normalized": (GraftedSGD, dict(mode="normalized"), False),
    "GN-AdamW": (grad_norm_adamw, dict(penalty=0.3), False),
}


def make_optimizer(name: str, params: Any, micro_batch_size: int, **extra: Any) -> tuple[MicroBatchSGD, Any]:
    cls, kwargs, random = CONFIGS[name]
    generator = torch.Generator().manual_seed(SEED) if random else None
    if random:  # draw for draw as the single process: each rank uses its generator itself
        extra["generator"] = generator
        extra.setdefault("rank_independent_draws", False)
    return cls(params, lr=LR, micro_batch_size=micro_batch_size, **kwargs, **extra), generator


def offsets_of(shards: list[int]) -> list[int]:
    return [sum(shards[:r]) for r in range(len(shards))]


def compare_with_single_process(rank: int, name: str, shards: list[int], micro_batch_size: int, steps: int = 2,
                                batch_norm: bool = False, wrap_ddp: bool = False) -> dict[str, Any]:
    """``steps`` distributed steps of optimizer ``name`` and the single-process steps on the concatenation."""
    full = make_batch(sum(shards))
    start = offsets_of(shards)[rank]
    mine = shard(full, start, start + shards[rank])

    reference = make_model(batch_norm=batch_norm)
    ref_opt, ref_gen = make_optimizer(name, reference.parameters(), micro_batch_size, process_group=None)
    ref_draws, ref_stats = [], []
    for _ in range(steps):
        draws: dict = {}
        ref_opt.step(make_closure(reference, draws if ref_gen is not None else None, ref_gen), full)
        ref_draws.append(draws)
        ref_stats.append(stats_of(ref_opt))

    if wrap_ddp:  # ranks start apart; DDP's constructor broadcasts rank 0's state
        model = make_model(seed=rank, batch_norm=batch_norm)
        ddp_model = nn.parallel.DistributedDataParallel(model)
        forward = ddp_model.module  # the supported pattern
    else:
        model = forward = make_model(batch_norm=batch_norm)
    opt, gen = make_optimizer(name, model.parameters(), micro_batch_size)  # default: the world group
    default_group = opt.process_group is dist.group.WORLD
    stats, counts, host_reads, losses = [], [], [], []
    closure = make_closure(forward)
    for t in range(steps):
        if gen is not None:
            gen.set_state(ref_draws[t][start])
        with count_collectives() as count, dist_support.counting_host_reads(opt) as reads:
            loss = opt.step(closure, mine)
        losses.append(loss.item())
        counts.append(dict(count))
        host_reads.append(reads)
        stats.append(stats_of(opt))
    return dict(params=flat_params(model), ref_params=flat_params(reference), stats=stats, ref_stats=ref_stats,
                losses=losses, counts=counts, host_reads=host_reads, default_group=default_group,
                step_count=opt.step_count)


def partition_reference(name: str, full: tuple[Tensor, ...], bounds: list[tuple[int, int]]) -> dict[str, Any]:
    """One step over the micro-batches ``bounds`` of ``full``, each run alone by the single-process optimizer.

    Unpenalized/penalized: θ − lr Σ_j w_j a_j, a_j the applied gradient on M_j alone (g_j + λ∇R_j).
    Iterative grafting: θ − lr s G/‖G‖, s = mean_j ‖g_j‖, G = Σ_j w_j g_j.
    """
    size = sum(b - a for a, b in bounds)
    model = make_model()
    applied, stats = [], []
    for a, b in bounds:
        alone = copy.deepcopy(model)
        opt_name = "LB" if name == "graft-iterative" else name
        opt, _ = make_optimizer(opt_name, alone.parameters(), b - a, process_group=None)
        opt.step(make_closure(alone), shard(full, a, b))
        applied.append([p.grad.clone() for p in alone.parameters()])
        stats.append(stats_of(opt))
    weights = [(b - a) / size for a, b in bounds]
    total = [sum(w * a[i] for w, a in zip(weights, applied)) for i in range(len(applied[0]))]
    grad_norm = torch.cat([t.reshape(-1) for t in total]).norm().item()
    if name == "graft-iterative":
        s = sum(st["grad_norm"] for st in stats) / len(stats)
        total = [t * (s / grad_norm) for t in total]
    with torch.no_grad():
        for p, g in zip(model.parameters(), total):
            p -= LR * g
    expected = dict(
        loss=sum(w * st["loss"] for w, st in zip(weights, stats)),
        penalty=sum(w * st["penalty"] for w, st in zip(weights, stats)),
        micro_grad_sq_norm=sum(w * st["micro_grad_sq_norm"] for w, st in zip(weights, stats)),
        num_micro_batches=len(bounds),
    )
    if name != "GN":  # G + λP is not G
        expected["grad_norm"] = grad_norm
    return dict(params=flat_params(model), stats=expected)


def nonfinite_step(rank: int, skip: bool) -> dict[str, Any]:
    """A NaN loss on rank 1's second micro-batch, then a clean step: every rank must agree."""
    full = make_batch(16)
    poisoned = tuple(t.clone() for t in full)
    poisoned[3][13] = float("nan")  # rank 1 holds 8..15, micro-batches 8..11 and 12..15
    model = make_model()
    opt, gen = make_optimizer("FT", model.parameters(), 4, skip_nonfinite=skip)
    before, gen_before = flat_params(model), gen.get_state()
    outcome = "stepped"
    with count_collectives() as count:
        try:
            opt.step(make_closure(model), shard(poisoned, 8 * rank, 8 * rank + 8))
        except FloatingPointError as error:
            outcome = f"FloatingPointError: {error}"
    result = dict(outcome=outcome, unchanged=flat_params(model) == before,
                  generator_restored=torch.equal(gen.get_state(), gen_before), step_count=opt.step_count,
                  skipped=opt.stats.skipped if skip else None, counts=dict(count))
    opt.step(make_closure(model), shard(full, 8 * rank, 8 * rank + 8))  # the group is still in step
    result.update(after_clean_step=flat_params(model), clean_stats=stats_of(opt))
    return result


def closure_raises_on_one_rank(rank: int) -> dict[str, Any]:
    """Rank 1's closure raises on its second micro-batch: it re-raises, rank 0 is told, nobody hangs."""
    full = make_batch(16)
    model = make_model()
    opt, gen = make_optimizer("GN", model.parameters(), 4)
    before = flat_params(model)
    calls = []
    plain = make_closure(model)

    def closure(*args):
        calls.append(1)
        if rank == 1 and len(calls) == 2:
            raise KeyError("rank 1 failed")
        return plain(*args)
    with count_collectives() as count:
        try:
            opt.step(closure, shard(full, 8 * rank, 8 * rank + 8))
            outcome = "stepped"
        except (KeyError, FloatingPointError) as error:
            outcome = f"{type(error).__name__}: {error}"
    result = dict(outcome=outcome, unchanged=flat_params(model) == before, counts=dict(count))
    opt.step(make_closure(model), shard(full, 8 * rank, 8 * rank + 8))  # the group is still in step
    result.update(after_clean_step=flat_params(model))
    return result


def ddp_forward_in_step(rank: int) -> dict[str, Any]:
    """A closure that calls the DDP wrapper itself: the optimizer should refuse it on every rank."""
    model = make_model(seed=rank)
    ddp_model = nn.parallel.DistributedDataParallel(model)
    synced = flat_params(model)
    opt, _ = make_optimizer("GN", model.parameters(), 4)
    before = flat_params(model)
    try:
        opt.step(make_closure(ddp_model), shard(make_batch(16), 8 * rank, 8 * rank + 8))
        outcome = "stepped"
    except RuntimeError as error:
        outcome = f"RuntimeError: {error}"
    return dict(synced=synced, outcome=outcome, unchanged=flat_params(model) == before)


def ddp_guard_direct(rank: int) -> dict[str, Any]:
    """ddp_forward_guard itself: a DDP forward inside raises, outside runs, the plain module runs inside."""
    ddp_model = nn.parallel.DistributedDataParallel(make_model())
    x = make_batch(4)[0]
    hooks_before = len(nn.modules.module._global_forward_pre_hooks)
    with regopt_distributed.ddp_forward_guard():
        ddp_model.module(x)
        try:
            ddp_model(x)
            inside = "ran"
        except RuntimeError as error:
            inside = str(error)
    ddp_model(x)
    return dict(inside=inside, hooks_left=len(nn.modules.module._global_forward_pre_hooks) - hooks_before)


def low_precision_wire(rank: int) -> dict[str, Any]:
    """bfloat16 gradients and shard sizes above 256: the sizes must stay exact integers on the wire."""
    grads = [torch.full((3,), 1.0 + rank, dtype=torch.bfloat16)]
    sums = torch.tensor([10.0 + rank, 0.0, 4.0, 2.0, 1.0], dtype=torch.bfloat16)
    acc = Accumulation(grads, None, torch.zeros(1, 3, dtype=torch.bfloat16), sums)
    local_size = 257 + 40 * rank
    out = regopt_distributed.all_reduce_accumulation(acc, local_size, dist.group.WORLD)
    return dict(grad=out.grad[0].float().tolist(), grad_dtype=str(out.grad[0].dtype), loss=out.loss.float().item(),
                sums_dtype=str(out.sums.dtype), total=257 * 2 + 40)


# --------------------------------------------------------------------------------------------------
# the two spawns

EQUAL_SHARDS, EQUAL_MB = [8, 8], 4
UNEQUAL_SHARDS, UNEQUAL_MB = [8, 4, 6], 4  # aligned: the single-process split of 18 is 4,4 | 4 | 4,2
RAGGED_SHARDS, RAGGED_MB = [5, 2, 7], 4  # not aligned: 4,1 | 2 | 4,3 (single process: 4,4,4,2)


def two_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    named: dict[str, Callable[[], Any]] = {
        f"equal/{name}": (lambda name=name: compare_with_single_process(rank, name, EQUAL_SHARDS, EQUAL_MB))
        for name in CONFIGS
    }
    named["equal/GN-batchnorm"] = lambda: compare_with_single_process(rank, "GN", EQUAL_SHARDS, EQUAL_MB,
                                                                      batch_norm=True)
    named["nonfinite/raise"] = lambda: nonfinite_step(rank, skip=False)
    named["nonfinite/skip"] = lambda: nonfinite_step(rank, skip=True)
    named["closure-raises"] = lambda: closure_raises_on_one_rank(rank)
    named["ddp/forward-in-step"] = lambda: ddp_forward_in_step(rank)
    named["ddp/guard"] = lambda: ddp_guard_direct(rank)
    named["wire/bfloat16"] = lambda: low_precision_wire(rank)
    return scenarios(rank, named)


def three_rank_worker(rank: int, world_size: int) -> dict[str, Any]:
    named: dict[str, Callable[[], Any]] = {
        f"unequal/{name}": (lambda name=name: compare_with_single_process(rank, name, UNEQUAL_SHARDS, UNEQUAL_MB))
        for name in CONFIGS
    }
    named["unequal/GN-batchnorm-ddp-module"] = lambda: compare_with_single_process(
        rank, "GN", UNEQUAL_SHARDS, UNEQUAL_MB, batch_norm=True, wrap_ddp=True)
    for name in ("LB", "GN", "graft-iterative", "graft-normalized", "graft-external"):
        named[f"ragged/{name}"] = lambda name=name: compare_with_single_process(rank, name, RAGGED_SHARDS, RAGGED_MB,
                                                                                steps=1)

    def ragged_partition() -> dict[str, Any]:
        full, starts = make_batch(sum(RAGGED_SHARDS)), offsets_of(RAGGED_SHARDS)
        bounds = [(s + a, s + min(a + RAGGED_MB, n)) for s, n in zip(starts, RAGGED_SHARDS)
                  for a in range(0, n, RAGGED_MB)]
        return {name: partition_reference(name, full, bounds) for name in ("LB", "GN", "graft-iterative")}

    named["ragged/partition-reference"] = ragged_partition
    return scenarios(rank, named)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(two_rank_worker, 2, tmp_path_factory.mktemp("two_ranks"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return launch(three_rank_worker, 3, tmp_path_factory.mktemp("three_ranks"))


def per_rank(results: list[dict], name: str) -> list[Any]:
    out = [r[name] for r in results]
    for r in out:
        if isinstance(r, dict) and "error" in r:
            pytest.fail(f"scenario {name} raised:\n{r['error']}")
    return out


def close(actual: Any, expected: Any, what: str) -> None:
    torch.testing.assert_close(torch.tensor(actual, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64),
                               **TOL, msg=lambda m: f"{what}: {m}")


def check_stats(actual: dict, expected: dict, what: str) -> None:
    for key, value in expected.items():
        if isinstance(value, float):
            close(actual[key], value, f"{what} stats.{key}")
        else:
            assert actual[key] == value, f"{what} stats.{key}: {actual[key]} != {value}"


def check_matches_single_process(results: list[dict], name: str) -> None:
    ranks = per_rank(results, name)
    first = ranks[0]
    for rank, r in enumerate(ranks):
        assert r["default_group"], "the optimizer should default to the world group"
        assert r["params"] == first["params"], f"rank {rank}'s parameters differ from rank 0's (bit for bit)"
        assert r["stats"] == first["stats"], f"rank {rank}'s stats differ from rank 0's"
        close(r["params"], r["ref_params"], f"{name} rank {rank} parameters")
        for t, (stats, ref) in enumerate(zip(r["stats"], r["ref_stats"])):
            check_stats(stats, ref, f"{name} rank {rank} step {t}")
            close(r["losses"][t], ref["loss"], f"{name} rank {rank} step {t} returned loss")
        assert r["counts"] == [{"all_reduce": 1}] * len(r["stats"]), \
            f"expected exactly one all_reduce and no other collective per step, got {r['counts']}"
        assert r["host_reads"] == [["settle"]] * len(r["stats"]), \
            f"expected one host read (one sync on a GPU) per distributed step, got {r['host_reads']}"
        assert r["step_count"] == len(r["stats"])


# --------------------------------------------------------------------------------------------------
# the tests


@pytest.mark.parametrize("name", [*CONFIGS, "GN-batchnorm"])
def test_two_equal_shards_match_single_process(two_ranks: list[dict], name: str) -> None:
    check_matches_single_process(two_ranks, f"equal/{name}")


@pytest.mark.parametrize("name", [*CONFIGS, "GN-batchnorm-ddp-module"])
def test_three_unequal_shards_match_single_process(three_ranks: list[dict], name: str) -> None:
    check_matches_single_process(three_ranks, f"unequal/{name}")


@pytest.mark.parametrize("name", ["LB", "graft-normalized", "graft-external"])
def test_ragged_shards_gradient_only_updates_match_concatenation(three_ranks: list[dict], name: str) -> None:
    """G = ∇(mean loss over B) does not depend on the partition (no batch statistics in the model)."""
    for rank, r in enumerate(per_rank(three_ranks, f"ragged/{name}")):
        close(r["params"], r["ref_params"], f"{name} rank {rank} parameters")
        for key in ("loss", "grad_norm"):
            close(r["stats"][0][key], r["ref_stats"][0][key], f"{name} rank {rank} stats.{key}")
        assert r["stats"][0]["num_micro_batches"] == 5  # 4,1 | 2 | 4,3
        assert r["counts"] == [{"all_reduce": 1}]


@pytest.mark.parametrize("name", ["LB", "GN", "graft-iterative"])
def test_ragged_shards_match_their_own_partition(three_ranks: list[dict], name: str) -> None:
    """Penalties and the iterative-grafting mean are taken over the ranks' micro-batches 4,1 | 2 | 4,3."""
    references = per_rank(three_ranks, "ragged/partition-reference")
    for rank, r in enumerate(per_rank(three_ranks, f"ragged/{name}")):
        expected = references[rank][name]
        close(r["params"], expected["params"], f"{name} rank {rank} parameters")
        check_stats(r["stats"][0], expected["stats"], f"{name} rank {rank}")
        assert r["params"] == per_rank(three_ranks, f"ragged/{name}")[0]["params"]
    if name != "LB":  # the partition matters here: the concatenation's split 4,4,4,2 gives another step
        r = per_rank(three_ranks, f"ragged/{name}")[0]
        assert not torch.allclose(torch.tensor(r["params"]), torch.tensor(r["ref_params"]), rtol=1e-6, atol=1e-9)


def test_ddp_module_pattern_syncs_initial_parameters(three_ranks: list[dict]) -> None:
    """Ranks built different models; DDP's constructor broadcast rank 0's, and the closure used ddp.module."""
    ranks = per_rank(three_ranks, "unequal/GN-batchnorm-ddp-module")
    assert all(r["params"] == ranks[0]["params"] for r in ranks)


@pytest.mark.parametrize("skip", [False, True])
def test_nonfinite_on_one_rank_is_seen_by_every_rank(two_ranks: list[dict], skip: bool) -> None:
    ranks = per_rank(two_ranks, f"nonfinite/{'skip' if skip else 'raise'}")
    for rank, r in enumerate(ranks):
        assert r["unchanged"], f"rank {rank} changed its parameters"
        assert r["generator_restored"], f"rank {rank} consumed random draws in a step not taken"
        assert r["step_count"] == 0
        assert r["counts"] == {"all_reduce": 1}
        assert r["after_clean_step"] == ranks[0]["after_clean_step"], "ranks diverged after the bad step"
        assert r["clean_stats"]["num_micro_batches"] == 4 and not r["clean_stats"]["skipped"]
        if skip:
            assert r["outcome"] == "stepped" and r["skipped"] is True
        else:
            assert r["outcome"].startswith("FloatingPointError"), f"rank {rank}: {r['outcome']}"
    if not skip:
        assert "another rank" in ranks[0]["outcome"]
        assert "micro-batch 1 of 2 (examples 4:8)" in ranks[1]["outcome"]


def test_an_exception_on_one_rank_reaches_every_rank_without_a_hang(two_ranks: list[dict]) -> None:
    ranks = per_rank(two_ranks, "closure-raises")
    assert ranks[1]["outcome"] == "KeyError: 'rank 1 failed'"
    assert ranks[0]["outcome"].startswith("FloatingPointError") and "another rank" in ranks[0]["outcome"]
    for r in ranks:
        assert r["unchanged"] and r["counts"] == {"all_reduce": 1}
        assert r["after_clean_step"] == ranks[0]["after_clean_step"]


def test_ddp_guard_refuses_a_ddp_forward_and_removes_its_hook(two_ranks: list[dict]) -> None:
    for r in per_rank(two_ranks, "ddp/guard"):
        assert r["inside"] == regopt_distributed.DDP_FORWARD_MESSAGE
        assert r["hooks_left"] == 0


def test_ddp_forward_inside_a_step_raises_on_every_rank(two_ranks: list[dict]) -> None:
    ranks = per_rank(two_ranks, "ddp/forward-in-step")
    assert all(r["synced"] == ranks[0]["synced"] for r in ranks)
    for r in ranks:
        assert r["outcome"] == f"RuntimeError: {regopt_distributed.DDP_FORWARD_MESSAGE}"
        assert r["unchanged"]


def test_low_precision_gradients_are_reduced_with_exact_sizes(two_ranks: list[dict]) -> None:
    for r in per_rank(two_ranks, "wire/bfloat16"):
        assert r["grad_dtype"] == "torch.bfloat16" and r["sums_dtype"] == "torch.bfloat16"
        expected_grad = torch.tensor(3.0 / r["total"], dtype=torch.bfloat16).item()  # (1 + 2) / 554
        assert r["grad"] == [expected_grad] * 3
        close(r["loss"], torch.tensor(21.0 / r["total"], dtype=torch.bfloat16).item(), "Σ|M|L / |B|")


def test_ddp_guard_is_a_no_op_without_a_process_group() -> None:
    if dist.is_initialized():
        pytest.skip("this process has a process group")
    hooks = len(nn.modules.module._global_forward_pre_hooks)
    model = make_model()
    with regopt_distributed.ddp_forward_guard():
        assert len(nn.modules.module._global_forward_pre_hooks) == hooks
        model(make_batch(2)[0])
    assert regopt_distributed.default_process_group() is None


# --------------------------------------------------------------------------------------------------
# the launcher's watchdog, with a stand-in for torch.multiprocessing's spawn context (no processes)


class FakeRanks:
    """A spawn context of two live ranks that exit after ``polls`` joins; ``progressing`` ranks report at each."""

    def __init__(self, out_dir: Any, polls: int, progressing: tuple[int, ...], fail: Exception | None = None) -> None:
        self.out_dir, self.polls, self.progressing, self.fail, self.calls = out_dir, polls, progressing, fail, 0
        self.processes = [self, self]

    def is_alive(self) -> bool:
        return self.calls < self.polls

    def join(self, timeout: float) -> bool:
        self.calls += 1
        if self.fail is not None:
            raise self.fail
        time.sleep(timeout)
        for rank in self.progressing:
            with open(self.out_dir / f"rank{rank}.progress", "a") as f:
                f.write(f"{time.monotonic():.1f} scenario {self.calls}: done\n")
        return not self.is_alive()


def test_launcher_fails_a_stalled_rank_and_says_where_each_rank_was(tmp_path: Any) -> None:
    """Rank 0 stops after its first scenario while rank 1 keeps reporting: rank 0 is a hang."""
    (tmp_path / "rank0.progress").write_text("1.0 imported\n1.1 all ranks ready\n1.2 scenario equal/LB: done\n")
    start, ranks = time.monotonic(), FakeRanks(tmp_path, polls=40, progressing=(1,))
    with pytest.raises(dist_support.LaunchError, match=r"rank\(s\) \[0\] reported no progress for 0.1 s") as info:
        dist_support.join_ranks(ranks, tmp_path, 2, stall_timeout_s=0.1)
    assert time.monotonic() - start > 0.1
    assert ranks.calls < ranks.polls  # ended by the stall, while both ranks were still alive
    message = str(info.value)
    assert "rank 0 (3 progress lines" in message and "scenario equal/LB: done" in message
    assert "rank 1 (" in message


def test_launcher_waits_as_long_as_every_rank_progresses(tmp_path: Any) -> None:
    """A slow launch (a loaded machine) whose ranks keep reporting runs to its end, past the stall timeout."""
    ranks = FakeRanks(tmp_path, polls=5, progressing=(0, 1))
    start = time.monotonic()
    dist_support.join_ranks(ranks, tmp_path, 2, stall_timeout_s=0.1)
    assert ranks.calls == 5 and time.monotonic() - start > 3 * 0.1


def test_launcher_reports_a_failed_rank_with_every_ranks_progress(tmp_path: Any) -> None:
    (tmp_path / "rank1.progress").write_text("1.0 imported\n")
    failure = mp.ProcessExitedException("process 1 terminated with signal SIGABRT", 1, 4321, -6, "SIGABRT")
    with pytest.raises(dist_support.LaunchError, match="SIGABRT") as info:
        dist_support.join_ranks(FakeRanks(tmp_path, polls=1, progressing=(), fail=failure), tmp_path, 2)
    message = str(info.value)
    assert "rank 0: no progress yet" in message and "rank 1 (1 progress lines" in message and "1.0 imported" in message
    assert info.value.__cause__ is failure
