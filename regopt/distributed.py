"""One all-reduce per step: micro-batches spread over the ranks of a torch.distributed group.

Each rank r splits its own shard B_r of the step's batch into consecutive micro-batches
and accumulates, with weights |M_j| (not yet divided by any batch size),

    Σ_j |M_j| g_j, Σ_j |M_j| ∇R_j, Σ_j |M_j| L_j, Σ_j |M_j| R_j, Σ_j |M_j| ‖g_j‖², Σ_j ‖g_j‖, k_r,

then :func:`all_reduce_accumulation` sums all of them, together with the shard sizes |B_r| and
one flag per parameter (whether this rank's micro-batches reached it), in a single all-reduce of
one flat buffer, and divides the weighted sums by the global batch
size |B| = Σ_r |B_r|. Every rank ends the step with the same applied gradient and the same
global ``stats`` (loss, penalty, micro_grad_sq_norm, grad_norm = ‖G‖, num_micro_batches = Σ_r k_r),
the same set of updated parameters (those any rank used: ranks whose closures take different
branches do not drift apart), and iterative grafting's s = Σ_j ‖g_j‖ / Σ_r k_r is the mean over all
ranks' micro-batches.

The step is the single-process step on the concatenation B_0 B_1 … of the shards, split into
the micro-batches the ranks formed: exactly the single-process split when every shard but the
last holds a multiple of ``micro_batch_size`` examples (unequal shards included). Otherwise
each shard's last micro-batch is short, which changes the partition, hence Σ_j w_j R_j, the
mean micro-batch norm of iterative grafting and per-micro-batch BatchNorm statistics, but not
G = ∇(mean loss over B) of a model without batch statistics. An empty shard is refused on every
rank (see Failures).

The buffer is communicated in the gradients' dtype, promoted to at least float32 (so that
shard sizes and micro-batch counts stay exact integers under bfloat16/float16 training), and
the reduced values are copied back into the gradients' own dtypes. All ranks receive the same
reduced bits, so their parameters stay identical step after step.

Random draws (FT labels, UJ directions). Nothing random is communicated: each rank draws, per
micro-batch and in order, for its own micro-batches only. With a ``generator`` and
``rank_independent_draws=True`` (the default), rank r draws from a per-step generator seeded by a
hash of (the generator's state, r) (:func:`rank_draw_generator`), and the optimizer's generator
advances by one draw per step: ranks whose generators share a state (the same seed on every rank)
draw independently, the streams are a function of the saved state (``state_dict()``: a resumed run
draws the same numbers on every rank) and a failed step's rollback restores them. With
``rank_independent_draws=False`` each rank draws from its generator itself: a distributed step
then equals a single-process step draw for draw when rank r's generator starts in the state a
single process reaches after the micro-batches of ranks 0..r-1 (tests/test_distributed.py does
this); with the same state on every rank, rank r's j-th micro-batch draws what rank 0's does. With
``generator=None`` the draws come from each rank's global RNG, unchanged by regopt: ranks seeded
alike (the usual identical ``torch.manual_seed`` on every rank) draw alike, so seed the global RNG
per rank (``torch.manual_seed(seed + rank)``) or pass a generator. The finite-difference replay of
the closure's own draws (dropout) is local to each rank.

Subsampled penalty (``penalty_micro_batches = m``): m is per rank. Rank r draws S_r, min(m, k_r)
of its own k_r micro-batches, from its own generator, and weights each sampled term by
k_r / min(m, k_r) (so a rank with k_r <= m takes them all, unweighted). Each rank's share is then
unbiased for Σ_{j on r} |M_j| ∇R_j, hence the all-reduced sum for the global Σ_j w_j ∇R_j; nothing
more is communicated, and the step keeps its one all-reduce. The global step penalizes about
m · (number of ranks) micro-batches.

Failures. The non-finite check runs after the all-reduce on every rank: a NaN or inf on one
rank's micro-batch makes the reduced sums non-finite on all ranks, so every rank raises
FloatingPointError (the offending rank names its micro-batch) or, with ``skip_nonfinite=True``
or loss scaling, every rank skips the step (a dynamic loss scale stays equal across ranks),
with no collective left pending. A rank that fails *before* the all-reduce (an empty or
malformed shard, leaves of different sizes, a closure error, out of memory) still joins the
step's all-reduce, with a poisoned buffer (:func:`join_failed_step`): NaN sums plus three
failure slots (1, its rank, why: :data:`regopt.engine.FAILURE_KINDS`). That rank re-raises its own
exception; every other rank raises FloatingPointError naming it and the problem ("another rank
(rank 1) failed before the step's all-reduce: its shard of the batch is malformed or empty"),
also with ``skip_nonfinite`` or loss scaling (a rank raised, so nobody skips), instead of waiting
until the process group's timeout. Nothing changes on any rank, and the group stays in step. Only
errors found before the step starts its work (no trainable parameter, a missing closure or batch)
raise on that rank alone.

DistributedDataParallel. regopt differentiates with ``torch.autograd.grad(..., params)``, which
never runs DDP's gradient hooks (post-hooks of the parameters' AccumulateGrad nodes, which only
``backward()`` executes), so DDP reduces nothing in a regopt step, ``create_graph`` or not
(pytorch#63812 and #63929 do not arise): no double reduction, and no help either. DDP's
forward still runs collectives and bookkeeping, though: with the default
``broadcast_buffers=True`` a model with buffers (BatchNorm) broadcasts rank 0's buffers at
every forward, one collective per micro-batch, which deadlocks as soon as ranks hold different
numbers of micro-batches (observed with gloo: a timeout), and with
``find_unused_parameters=True`` and different numbers of forwards per rank a process aborted at
exit in the same experiment. So the closure must call the wrapped module,
``ddp_model.module(x)``; DDP is then useful only for broadcasting rank 0's parameters and
buffers at construction. :func:`ddp_forward_guard` turns a DDP forward inside a step into a
clear error on every rank, before DDP's forward does anything.

Buffers are not communicated by a step: each rank's BatchNorm running statistics follow its own
micro-batches (as under DDP with ``broadcast_buffers=False``). Average them over the ranks with
:func:`average_buffers` (one all-reduce) before evaluating.

Communication volume. A step all-reduces one buffer of N·(1 + [penalized]) + 9 + (number of
parameter tensors) values, N the trainable parameter count, in the wire dtype: penalized
optimizers send G and P separately, because ``stats.grad_norm`` = ‖G‖ = ‖Σ_r G_r‖ needs the
global G itself (it is not a function of per-rank norms, and recovering it from A = G + λP,
‖G‖² = ‖A‖² − 2λ⟨A, P⟩ + λ²‖P‖², needs the global P too). With ``exact_grad_norm=False`` each rank
adds ±λP_r to G_r before the all-reduce, which then carries N + 9 + (tensors) values: the same
update up to rounding, and ``stats.grad_norm`` NaN (not measured).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import forward_hooks
from .engine import FAILURE_EXCEPTION, Accumulation, advance, state_seed

_SUMS = 6  # the buffer's slots after the gradients: the 5 sums and |B_r|,
_TAIL = _SUMS + 3  # then the failure (count, Σ rank, Σ kind)

DDP_FORWARD_MESSAGE = (
    "the closure called a DistributedDataParallel module inside a regopt step. regopt all-reduces "
    "the gradients itself, once per step (torch.autograd.grad never runs DDP's gradient hooks), while "
    "DDP's forward would run its own collectives per micro-batch (buffer broadcast; deadlocks when ranks "
    "hold different numbers of micro-batches). Call the wrapped module instead, e.g. "
    "`def closure(x, y): logits = ddp_model.module(x); return F.cross_entropy(logits, y), logits`, "
    "or do not wrap the model in DDP (every rank must then start from the same parameters)"
)


def default_process_group() -> dist.ProcessGroup | None:
    """The world group when torch.distributed is initialized with more than one rank, else None.

    The optimizers call this at every step (not once, when built), so that an optimizer built
    before ``dist.init_process_group`` still shares its steps with the other ranks.
    """
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


@contextmanager
def ddp_forward_guard() -> Iterator[None]:
    """Raise RuntimeError (:data:`DDP_FORWARD_MESSAGE`) when a DistributedDataParallel module runs its forward.

    Wraps a step's micro-batch loop. It raises in a forward pre-hook, before DDP's forward
    runs any collective, and every rank calls the same closure, so every rank raises at
    the same micro-batch and none is left waiting. A no-op (no hook) unless
    torch.distributed is initialized, since no DDP module exists otherwise.
    """
    if not (dist.is_available() and dist.is_initialized()):
        yield
        return
    from torch.nn.parallel import DistributedDataParallel

    def refuse(module: nn.Module) -> None:
        wrapped = module._orig_mod if forward_hooks.is_compiled_wrapper(module) else module  # torch.compile(ddp)
        if isinstance(wrapped, DistributedDataParallel):
            raise RuntimeError(DDP_FORWARD_MESSAGE)

    with forward_hooks.calling(refuse):
        yield


def _wire_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """The common dtype of ``tensors``, at least float32."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def all_reduce_accumulation(acc: Accumulation, local_size: int, group: dist.ProcessGroup) -> Accumulation:
    """Sum ``acc`` (accumulated with weights |M_j|) over ``group`` and divide by the global batch size.

    One ``dist.all_reduce`` of one flat buffer [Σ|M|g, Σ|M|∇R, sums, |B_r|, failure, used_r]; the
    gradients are reduced in place into ``acc``'s own tensors. ``used_r`` (one flag per parameter: did
    this rank's micro-batches reach it) sums to ``used_count``, so that every rank updates the
    parameters that any rank used, and the ranks stay identical. ``failure`` (three zeros here) sums
    the (1, rank, kind) that ranks which failed before the all-reduce send (:func:`join_failed_step`).
    """
    pieces: list[Tensor] = list(acc.grad) + list(acc.penalty_grad or [])
    dtype = _wire_dtype(pieces + [acc.sums])
    used = acc.used if acc.used is not None else [True] * len(acc.grad)
    # Copied without blocking, like the engine's weights: a plain new_tensor would synchronize with the host.
    flags = torch.tensor([local_size, 0, 0, 0, *used], dtype=dtype).to(acc.sums.device, non_blocking=True)
    tail = torch.cat([acc.sums.to(dtype), flags])
    flat = torch.cat([t.reshape(-1).to(dtype) for t in pieces] + [tail])
    dist.all_reduce(flat, group=group)
    numel = flat.numel() - tail.numel()
    reduced_sums = flat[numel:numel + _SUMS].clone()
    peer_failure = flat[numel + _SUMS:numel + _TAIL].clone()
    used_count = flat[numel + _TAIL:].clone()
    total = reduced_sums[-1]  # |B|
    flat[:numel].div_(total)
    reduced = flat[:numel].split([t.numel() for t in pieces])
    torch._foreach_copy_(pieces, [v.view_as(t) for v, t in zip(reduced, pieces)])
    # Σ|M|L, Σ|M|R and Σ|M|‖g‖² become weighted by w_j = |M_j|/|B|; Σ_j ‖g_j‖ and k stay plain sums.
    weighted = torch.cat([reduced_sums[:3] / total, reduced_sums[3:5]]).to(acc.sums.dtype)
    return acc.reduced(acc.grad, acc.penalty_grad, weighted, used_count, peer_failure)


def join_failed_step(params: Sequence[Tensor], penalized: bool, group: dist.ProcessGroup,
                     kind: int = FAILURE_EXCEPTION) -> None:
    """Take part in the step's all-reduce with a poisoned buffer after this rank failed before it.

    The buffer has the layout of :func:`all_reduce_accumulation`'s: NaN gradients and sums, and
    the failure slots (1, this rank in ``group``, ``kind``, a :data:`regopt.engine.FAILURE_KINDS` code),
    so that the other ranks raise FloatingPointError naming this rank and why it failed
    (:func:`regopt.engine.peer_failure_message`) instead of waiting for it until the process
    group's timeout; this rank re-raises its own exception.
    """
    dtype, device = _wire_dtype(params), params[0].device
    grads = sum(p.numel() for p in params) * (2 if penalized else 1)  # Σ|M|g (and Σ|M|∇R)
    failure = torch.tensor([1, dist.get_rank(group), kind], dtype=dtype).to(device, non_blocking=True)
    flat = torch.cat([torch.full((grads + _SUMS,), float("nan"), dtype=dtype, device=device), failure,
                      torch.zeros(len(params), dtype=dtype, device=device)])  # 5 sums and |B_r|, failure, used
    dist.all_reduce(flat, group=group)


def rank_draw_generator(generator: torch.Generator, rank: int) -> torch.Generator:
    """This step's generator for rank ``rank``: seeded by a hash of (``generator``'s state, ``rank``).

    ``generator`` is then advanced by one tiny draw (on its device, no host sync), so that the
    next step hashes another state. The derived stream is a function of the saved generator state
    and the rank alone: a resumed run draws the same numbers, a rolled-back step (which restores
    ``generator``) draws them again, and ranks whose generators share a state draw independently.
    ``get_state()`` is a host tensor for CUDA generators too (seed and offset): reading it does not sync.
    """
    salted = torch.cat([generator.get_state(), torch.tensor(list(rank.to_bytes(8, "little")), dtype=torch.uint8)])
    derived = torch.Generator(generator.device).manual_seed(state_seed(salted))
    advance(generator)
    return derived


def average_buffers(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Replace every floating-point buffer of ``model`` by its mean over the ranks of ``group``, in one all-reduce.

    b ← (1/R) Σ_r b_r for BatchNorm's running_mean and running_var (and any other floating buffer), so
    that evaluation sees statistics from every rank's micro-batches. The buffers travel flattened into
    one buffer in their common dtype (at least float32; all on one device). Integer buffers (BatchNorm's
    ``num_batches_tracked``) are left as they are: every rank counts the same number of forwards only
    when the ranks hold equally many micro-batches, and a mean of counters is not a count.
    ``group`` None: the world group when torch.distributed runs with several ranks, else nothing to do.
    Every rank of ``group`` must call this, with models whose floating buffers match in order and shape.
    """
    group = group if group is not None else default_process_group()
    buffers = [b for b in model.buffers() if b.is_floating_point()]
    if group is None or not buffers:
        return
    flat = torch.cat([b.detach().reshape(-1).to(_wire_dtype(buffers)) for b in buffers])
    dist.all_reduce(flat, group=group)
    flat.div_(dist.get_world_size(group))
    with torch.no_grad():
        torch._foreach_copy_(buffers, [v.view_as(b) for v, b in zip(flat.split([b.numel() for b in buffers]),
                                                                     buffers)])
