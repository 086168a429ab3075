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
G = ∇(mean loss over B) of a model without batch statistics. An empty shard is not supported.

The buffer is communicated in the gradients' dtype, promoted to at least float32 (so that
shard sizes and micro-batch counts stay exact integers under bfloat16/float16 training), and
the reduced values are copied back into the gradients' own dtypes. All ranks receive the same
reduced bits, so their parameters stay identical step after step.

Random draws (FT labels, UJ directions). Nothing random is communicated: each rank draws, per
micro-batch and in order, for its own micro-batches only, from its optimizer's ``generator``
(or its global RNG when ``generator`` is None). Ranks whose generators are in the same state,
as after the same seed (and, for the global RNG, the usual identical ``torch.manual_seed`` on
every rank), draw the same numbers for their j-th micro-batches: UJ then uses the same
direction u on every rank's j-th micro-batch, and FT the same random numbers for its labels,
so the step averages fewer independent draws than a single process would. Give each rank its
own stream, e.g. ``generator=torch.Generator(device).manual_seed(seed + dist.get_rank())``, and save each
rank's ``state_dict()`` (the generator state is per rank) or reseed per rank after loading
rank 0's. A distributed step equals a single-process step draw for draw when rank r's
generator starts in the state a single process reaches after the micro-batches of ranks
0..r-1; otherwise it is a different draw from the same distribution. The finite-difference
replay of the closure's own draws (dropout) is local to each rank.

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
with no collective left pending. An exception raised on one rank *before* the all-reduce (a
closure error, out of memory) still joins the step's all-reduce with a NaN buffer
(:func:`join_failed_step`), so the other ranks raise FloatingPointError (or skip) instead of
waiting for the process group's timeout, and that rank re-raises its own exception. Errors
found before the micro-batch loop (a malformed or empty shard) raise on that rank alone.

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

Buffers are not communicated: each rank's BatchNorm running statistics follow its own
micro-batches (as under DDP with ``broadcast_buffers=False``). Average them over the ranks,
or evaluate on one rank, before evaluating.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import forward_hooks
from .engine import Accumulation

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

    One ``dist.all_reduce`` of one flat buffer [Σ|M|g, Σ|M|∇R, sums, |B_r|, used_r]; the gradients
    are reduced in place into ``acc``'s own tensors. ``used_r`` (one flag per parameter: did this
    rank's micro-batches reach it) sums to ``used_count``, so that every rank updates the
    parameters that any rank used, and the ranks stay identical.
    """
    pieces: list[Tensor] = list(acc.grad) + list(acc.penalty_grad or [])
    dtype = _wire_dtype(pieces + [acc.sums])
    used = acc.used if acc.used is not None else [True] * len(acc.grad)
    # Copied without blocking, like the engine's weights: a plain new_tensor would synchronize with the host.
    flags = torch.tensor([local_size, *used], dtype=dtype).to(acc.sums.device, non_blocking=True)
    tail = torch.cat([acc.sums.to(dtype), flags])
    flat = torch.cat([t.reshape(-1).to(dtype) for t in pieces] + [tail])
    dist.all_reduce(flat, group=group)
    numel = flat.numel() - tail.numel()
    reduced_sums = flat[numel:numel + 6].clone()
    used_count = flat[numel + 6:].clone()
    total = reduced_sums[-1]  # |B|
    flat[:numel].div_(total)
    reduced = flat[:numel].split([t.numel() for t in pieces])
    torch._foreach_copy_(pieces, [v.view_as(t) for v, t in zip(reduced, pieces)])
    # Σ|M|L, Σ|M|R and Σ|M|‖g‖² become weighted by w_j = |M_j|/|B|; Σ_j ‖g_j‖ and k stay plain sums.
    weighted = torch.cat([reduced_sums[:3] / total, reduced_sums[3:5]]).to(acc.sums.dtype)
    return acc.reduced(acc.grad, acc.penalty_grad, weighted, used_count)


def join_failed_step(params: Sequence[Tensor], penalized: bool, group: dist.ProcessGroup) -> None:
    """Take part in the step's all-reduce with a NaN buffer after this rank failed before it.

    The other ranks then see non-finite sums and raise FloatingPointError (or skip the step)
    instead of waiting for this rank until the process group's timeout; this rank re-raises
    its own exception. The buffer has the layout of :func:`all_reduce_accumulation`'s.
    """
    # Σ|M|g (and Σ|M|∇R), 5 sums, |B_r|, one usage flag per parameter.
    numel = sum(p.numel() for p in params) * (2 if penalized else 1) + 6 + len(params)
    flat = torch.full((numel,), float("nan"), dtype=_wire_dtype(params), device=params[0].device)
    dist.all_reduce(flat, group=group)
