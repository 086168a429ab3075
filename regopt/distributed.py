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
micro-batch and in order, for its own micro-batches only, from the optimizer's generator (with
``generator=None``, the optimizer's own, seeded from ``torch.initial_seed()`` when built). With
``rank_independent_draws=True`` (the default), rank r draws from a per-step generator seeded by a
hash of (the generator's state, r) (:func:`rank_draw_generator`), and the optimizer's generator
advances by one draw per step: ranks whose generators share a state (the same seed on every rank)
draw independently, the streams are a function of the saved state (``state_dict()``: a resumed run
draws the same numbers on every rank) and a failed step's rollback restores them. With
``rank_independent_draws=False`` each rank draws from its generator itself: a distributed step
then equals a single-process step draw for draw when rank r's generator starts in the state a
single process reaches after the micro-batches of ranks 0..r-1 (tests/test_distributed.py does
this); with the same state on every rank, rank r's j-th micro-batch draws what rank 0's does. The
finite-difference replay of the loss function's own draws (dropout) is local to each rank.

Subsampled penalty (``penalty_micro_batches = m``): m is per rank. Rank r draws S_r, min(m, k_r)
of its own k_r micro-batches, from its own generator, and weights each sampled term by
k_r / min(m, k_r) (so a rank with k_r <= m takes them all, unweighted). Each rank's share is then
unbiased for Σ_{j on r} |M_j| ∇R_j, hence the all-reduced sum for the global Σ_j w_j ∇R_j; nothing
more is communicated, and the step keeps its one all-reduce. The global step penalizes about
m · (number of ranks) micro-batches.

Failures: one decision for every rank. Whether a step commits, skips or raises is a function of
all-reduced values only, so every rank decides alike. A NaN or inf in any of a rank's per-micro-batch
terms (L_j, R_j, ‖g_j‖², ‖∇R_j‖²: the last reaches no sum) makes the sums it sends non-finite (the
Σ_j ‖g_j‖ slot carries the flag), so every rank raises FloatingPointError (the offending rank names its
micro-batch, the others "another rank's micro-batch") or, with ``skip_nonfinite=True`` or loss
scaling, every rank skips the step (a dynamic loss scale stays equal across ranks), with no
collective left pending. A rank that fails *before* the all-reduce (an empty or malformed shard,
leaves of different sizes, a closure error, out of memory, a malformed ``step()`` call such as
``step(closure, None)``) still joins the step's all-reduce, with a poisoned buffer
(:func:`join_failed_step`): NaN sums, and agreement slots that name it (its global rank) and why
(:data:`FAILURE_KINDS`). That rank re-raises its own exception; every other rank
raises FloatingPointError naming it and the problem ("another rank (rank 1) failed before the step's
all-reduce: its shard of the batch is malformed or empty"), also with ``skip_nonfinite`` or loss
scaling (a rank raised, so nobody skips), instead of waiting until the process group's timeout.
Nothing changes on any rank, and the group stays in step.

Ranks out of step. Each optimizer counts its step calls under a process group, and the all-reduce
compares the counts (modulo m, :class:`Agreement`): when a rank has made more calls than another
(a call that raised on it alone, an all-reduce that timed out on it), every rank raises
RuntimeError naming the counts instead of combining different iterations, and so does every later
step of these optimizers (the counts stay apart). Only a rank without trainable parameters (or with complex or meta
ones) raises alone: it has no buffer layout to join with, so a peer already inside the step's
all-reduce waits for the process group's timeout (``init_process_group(timeout=...)``). Steps
whose calls all pair up are compared as equal even when a loop is off by one (every rank's
``k``-th call meets the others' ``k``-th call), and a call no peer ever matches (one extra step at
the end of training) waits for that timeout too.

A trainer's hook (``step(hook, batch=, loss_fn=)``) runs after the all-reduce, so its outcome
travels in one more all-reduce (two values, :func:`agree_on_hook`, and one more host read), made by
every rank as soon as any rank's step got a hook (the hook count is in the step's buffer): if a hook
raised anywhere, every rank rolls back, the raising rank re-raises its error and the others raise
RuntimeError naming it. Without a hook the step has its one all-reduce and its one host read.

DistributedDataParallel. regopt differentiates with ``torch.autograd.grad(..., params)``, which
never runs DDP's gradient hooks (post-hooks of the parameters' AccumulateGrad nodes, which only
``backward()`` executes), so DDP reduces nothing in a regopt step, ``create_graph`` or not
(pytorch#63812 and pytorch#63929 do not arise): no double reduction, and no help either. DDP's
forward still runs collectives and bookkeeping, though: with the default
``broadcast_buffers=True`` a model with buffers (BatchNorm) broadcasts rank 0's buffers at
every forward, one collective per micro-batch, which deadlocks as soon as ranks hold different
numbers of micro-batches (observed with gloo: a timeout), and with
``find_unused_parameters=True`` and different numbers of forwards per rank a process aborted at
exit in the same experiment. So loss_fn must call the wrapped module,
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
update up to rounding, and ``stats.grad_norm`` NaN (not measured). The 9 values are the 5 sums,
|B_r| and the three agreement slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import forward_hooks
from .engine import Accumulation, Settled, Sum, advance, state_seed

_SUMS = len(Sum) + 1  # the buffer's slots after the gradients: the sums (engine.Sum) and |B_r|,
_AGREEMENT_SLOTS = 3  # then the three agreement slots (Agreement), then one usage flag per parameter
_TAIL = _SUMS + _AGREEMENT_SLOTS
_NONFINITE_FLAG_SUM = Sum.MICRO_GRAD_NORM  # the sum slot that also carries this rank's non-finite flag
_MAX_RESIDUES = 16

# Why a rank failed before a distributed step's all-reduce (the code it sends in its poisoned buffer).
FAILURE_SHARD = 1
FAILURE_EXCEPTION = 2
FAILURE_CALL = 3
FAILURE_KINDS = {
    FAILURE_SHARD: "its shard of the batch is malformed or empty",
    FAILURE_EXCEPTION: "it raised an exception before the all-reduce (in its loss_fn or micro-batch loop)",
    FAILURE_CALL: "its step() call was malformed (no batch or no loss function, or arguments that do not fit)",
}


def peer_failure_message(failed: int, rank_sum: int, kind_sum: int) -> str:
    """What the ranks that did not fail say about the ``failed`` ranks that did (counts from the all-reduce)."""
    if failed == 1:
        who, why = f"another rank (rank {rank_sum})", FAILURE_KINDS.get(kind_sum, f"failure code {kind_sum}")
    else:
        kinds = [text for code, text in FAILURE_KINDS.items() if kind_sum == failed * code]
        who, why = f"{failed} other ranks", kinds[0] if kinds else "; ".join(FAILURE_KINDS.values())
    return (f"{who} failed before the step's all-reduce: {why}. That rank raised its own error; "
            "the step was not taken on any rank")

DDP_FORWARD_MESSAGE = (
    "loss_fn called a DistributedDataParallel module inside a regopt step. regopt all-reduces "
    "the gradients itself, once per step (torch.autograd.grad never runs DDP's gradient hooks), while "
    "DDP's forward would run its own collectives per micro-batch (buffer broadcast; deadlocks when ranks "
    "hold different numbers of micro-batches). Call the wrapped module instead, e.g. "
    "`def loss_fn(x, y): logits = ddp_model.module(x); return F.cross_entropy(logits, y), logits`, "
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


@dataclass(frozen=True)
class Agreement:
    """The buffer's three agreement slots in a group of R ranks: what each rank sends, and what the sums say.

    Rank r sends, with f_r = 1 when it failed before the all-reduce (kind κ_r, a
    :data:`FAILURE_KINDS` code), h_r = 1 when its step got a trainer's hook, and c_r its
    count of step calls under a process group,

        a₀ = f_r + (R+1)·h_r,    a₁ = f_r·(global rank of r),    a₂ = f_r·κ_r + K·d(c_r),   K = 3R + 1,

    d(c) = 0 when c ≡ 0 (mod m), else (R+1)^((c mod m) − 1). The sums read back digit by digit: Σa₀ gives
    the number of failed ranks and of ranks with a hook, Σa₁ names a failed rank, Σa₂ gives Σκ and, in
    base R+1, how many ranks stand at each call count modulo m. The ranks are in step iff all R stand at
    one residue, which every rank reads from the same sums (so all of them raise, or none). m ≤ 16 is the
    largest count whose sums stay exact integers in the wire dtype (m = 1, from 2365 ranks on a float32
    wire: calls are not compared); the hook count is sent while (R+1)² is exact (up to 4095 ranks).
    """

    ranks: int
    exact_below: int  # 2^(mantissa bits + 1): every integer up to it is exact in the wire dtype

    @classmethod
    def of(cls, group: dist.ProcessGroup, dtype: torch.dtype) -> "Agreement":
        return cls(dist.get_world_size(group), round(2 / torch.finfo(dtype).eps))

    @property
    def base(self) -> int:
        return self.ranks + 1

    @property
    def kind_base(self) -> int:
        return max(FAILURE_KINDS) * self.ranks + 1

    @property
    def residues(self) -> int:
        """m: step calls are compared modulo m."""
        m = 1
        while m < _MAX_RESIDUES and self.kind_base * (self.ranks * self.base ** (m - 1) + 1) <= self.exact_below:
            m += 1
        return m

    @property
    def hook_weight(self) -> int:
        return self.base if self.base**2 <= self.exact_below else 0

    def digit(self, calls: int) -> int:
        residue = calls % self.residues
        return 0 if residue == 0 else self.base ** (residue - 1)

    def send(self, calls: int, hook: bool = False, kind: int = 0) -> list[int]:
        """(a₀, a₁, a₂) of this rank; ``kind`` 0: it did not fail."""
        failed = int(kind != 0)
        return [failed + self.hook_weight * int(hook), failed * dist.get_rank(),
                kind + self.kind_base * self.digit(calls)]

    def at_residue(self, a2: int) -> dict[int, int]:
        """Residue modulo m → number of ranks whose call count has it, from Σa₂."""
        digits, rest = {}, a2 // self.kind_base
        for residue in range(1, self.residues):
            digits[residue], rest = rest % self.base, rest // self.base
        return {0: self.ranks - sum(digits.values()), **digits}


def _sums_with_nonfinite_flag(acc: Accumulation, dtype: torch.dtype) -> Tensor:
    """``acc.sums`` in ``dtype``, Σ_j ‖g_j‖ made NaN when any of this rank's terms (L_j, R_j, ‖g_j‖², ‖∇R_j‖²)
    is not finite: ‖∇R_j‖² reaches no other sum, and the ranks decide from reduced values only (no sync here)."""
    sums = acc.sums.to(dtype, copy=True)
    sums[_NONFINITE_FLAG_SUM] += torch.where(acc.terms.isfinite().all(), 0.0, math.nan)
    return sums


def all_reduce_accumulation(acc: Accumulation, local_size: int, group: dist.ProcessGroup, calls: int = 0,
                            hook: bool = False) -> Accumulation:
    """Sum ``acc`` (accumulated with weights |M_j|) over ``group`` and divide by the global batch size.

    One ``dist.all_reduce`` of one flat buffer [Σ|M|g, Σ|M|∇R, sums, |B_r|, agreement, used_r]; the
    gradients are reduced in place into ``acc``'s own tensors. ``used_r`` (one flag per parameter: did
    this rank's micro-batches reach it) sums to ``used_count``, so that every rank updates the
    parameters that any rank used, and the ranks stay identical. ``agreement`` (:class:`Agreement`:
    ``calls`` this rank's step calls under a process group, ``hook`` whether this step got a trainer's
    hook) sums to what every rank checks alike; ``acc.counts`` returns (Σ_r k_r, the three sums).
    """
    pieces: list[Tensor] = list(acc.grad) + list(acc.penalty_grad or [])
    dtype = _wire_dtype(pieces + [acc.sums])
    used = acc.used if acc.used is not None else [True] * len(acc.grad)
    agreement = Agreement.of(group, dtype).send(calls, hook)
    # Copied without blocking, like the engine's weights: a plain new_tensor would synchronize with the host.
    flags = torch.tensor([local_size, *agreement, *used], dtype=dtype).to(acc.sums.device, non_blocking=True)
    tail = torch.cat([_sums_with_nonfinite_flag(acc, dtype), flags])
    flat = torch.cat([t.reshape(-1).to(dtype) for t in pieces] + [tail])
    dist.all_reduce(flat, group=group)
    numel = flat.numel() - tail.numel()
    reduced_sums = flat[numel:numel + _SUMS].clone()
    k = Sum.MICRO_BATCHES
    counts = torch.cat([reduced_sums[k:k + 1], flat[numel + _SUMS:numel + _TAIL]])  # Σ k_r, then the agreement
    used_count = flat[numel + _TAIL:].clone()
    total = reduced_sums[-1]  # |B|
    flat[:numel].div_(total)
    reduced = flat[:numel].split([t.numel() for t in pieces])
    torch._foreach_copy_(pieces, [v.view_as(t) for v, t in zip(reduced, pieces)])
    # Σ|M|L, Σ|M|R and Σ|M|‖g‖² become weighted by w_j = |M_j|/|B|; Σ_j ‖g_j‖ and k stay plain sums.
    plain = Sum.MICRO_GRAD_NORM
    weighted = torch.cat([reduced_sums[:plain] / total, reduced_sums[plain:len(Sum)]]).to(acc.sums.dtype)
    return acc.reduced(acc.grad, acc.penalty_grad, weighted, used_count, counts)


def join_failed_step(params: Sequence[Tensor], penalized: bool, group: dist.ProcessGroup,
                     kind: int = FAILURE_EXCEPTION, calls: int = 0) -> None:
    """Take part in the step's all-reduce with a poisoned buffer after this rank failed before it.

    The buffer has the layout of :func:`all_reduce_accumulation`'s: NaN gradients and sums, and
    the agreement slots of a rank that failed (:class:`Agreement`: its global rank, ``kind``, a
    :data:`FAILURE_KINDS` code, and ``calls``), so that the other ranks raise
    FloatingPointError naming this rank and why it failed (:func:`check_agreement`) instead of waiting
    for it until the process group's timeout; this rank re-raises its own exception.
    """
    dtype, device = _wire_dtype(params), params[0].device
    grads = sum(p.numel() for p in params) * (2 if penalized else 1)  # Σ|M|g (and Σ|M|∇R)
    agreement = Agreement.of(group, dtype).send(calls, kind=kind)
    failure = torch.tensor(agreement, dtype=dtype).to(device, non_blocking=True)
    flat = torch.cat([torch.full((grads + _SUMS,), float("nan"), dtype=dtype, device=device), failure,
                      torch.zeros(len(params), dtype=dtype, device=device)])  # sums and |B_r|, agreement, used
    dist.all_reduce(flat, group=group)


def check_agreement(sums: Sequence[float], group: dist.ProcessGroup, dtype: torch.dtype, calls: int,
                    hook: bool) -> bool:
    """Raise on every rank alike when a rank failed before the all-reduce or the ranks are out of step;
    else return whether any rank's step got a trainer's hook (then every rank joins :func:`agree_on_hook`).

    ``sums``: the reduced agreement slots (:class:`Agreement`), read on the host by
    :func:`regopt.engine.settle`; ``calls``: this rank's count of step calls under a process group;
    ``hook``: whether this rank's step got one (what is returned when the hook count is not sent).
    """
    agreement = Agreement.of(group, dtype)
    a0, a1, a2 = (int(v) for v in sums)
    failed = a0 % agreement.base if agreement.hook_weight else a0
    if failed > 0:
        raise FloatingPointError(peer_failure_message(failed, a1, a2 % agreement.kind_base))
    if a2 // agreement.kind_base != agreement.ranks * agreement.digit(calls):
        raise RuntimeError(out_of_step_message(agreement, a2, calls))
    return a0 >= agreement.base if agreement.hook_weight else hook


def out_of_step_message(agreement: Agreement, a2: int, calls: int) -> str:
    """What every rank says when the ranks' step call counts differ (read modulo m from Σa₂)."""
    m = agreement.residues
    standing = ", ".join(f"{n} at {residue}" for residue, n in agreement.at_residue(a2).items() if n)
    return (f"the ranks of the process group are not at the same step: this rank (rank {dist.get_rank()}) is at "
            f"its step call {calls} under a process group ({calls % m} modulo {m}), and the group's ranks stand "
            f"at these calls modulo {m}: {standing}. A rank called step() more or fewer times than the others "
            "(its loop ran another number of iterations, a step raised on it alone, or its all-reduce timed "
            "out), so this step would combine different iterations: it was not taken on any rank")


class StepGuard:
    """One step's part in the distributed failure protocol (all of it a no-op without a process group).

    Until the step's all-reduce, a rank that fails joins it with a poisoned buffer naming why
    (:data:`FAILURE_KINDS`: a malformed shard while splitting, an exception after it), so that the others
    raise instead of waiting (:func:`join_failed_step`); after it, every rank reads the same sums and
    decides alike (:func:`check_agreement`).
    """

    def __init__(self, group: dist.ProcessGroup | None, params: Sequence[Tensor], penalty_grad_apart: bool,
                 calls: int) -> None:
        self.group, self.params, self.penalty_grad_apart, self.calls = group, params, penalty_grad_apart, calls
        self.failure = FAILURE_SHARD
        self.reduced = False

    def split_done(self) -> None:
        """From now on a failure is an exception in the loss function or the micro-batch loop."""
        self.failure = FAILURE_EXCEPTION

    def reduce(self, acc: Accumulation, local_size: int, hook: bool) -> Accumulation:
        """The step's one all-reduce (:func:`all_reduce_accumulation`); ``acc`` itself on one process."""
        if self.group is None:
            return acc
        self.reduced = True
        return all_reduce_accumulation(acc, local_size, self.group, self.calls, hook)

    def hooks_present(self, settled: Settled, acc: Accumulation, hook: bool) -> bool:
        """Whether the step calls a trainer's hook: this rank's ``hook``, or any rank's (:func:`check_agreement`,
        which raises on every rank alike when a rank failed or the ranks are out of step)."""
        if self.group is None:
            return hook
        return check_agreement(settled.agreement, self.group, acc.counts.dtype, self.calls, hook)

    def join_if_failed_early(self) -> None:
        """After a failure before the all-reduce, join it poisoned; after it (or alone), nothing to do."""
        if self.group is not None and not self.reduced:
            join_failed_step(self.params, self.penalty_grad_apart, self.group, self.failure, self.calls)

    def join_refused_call(self) -> None:
        """After a malformed step call (before anything else), join the all-reduce poisoned."""
        self.failure = FAILURE_CALL
        self.join_if_failed_early()


def agree_on_hook(raised: bool, params: Sequence[Tensor], group: dist.ProcessGroup) -> tuple[int, int]:
    """(number of ranks whose trainer hook raised, Σ of their global ranks): one all-reduce of two values and
    a host read, made by every rank of ``group`` when any rank's step got a hook (:func:`check_agreement`)."""
    flags = torch.tensor([int(raised), int(raised) * dist.get_rank()], dtype=_wire_dtype(params))
    flags = flags.to(params[0].device, non_blocking=True)
    dist.all_reduce(flags, group=group)
    count, rank_sum = flags.tolist()
    return int(count), int(rank_sum)


def hook_failure_message(count: int, rank_sum: int) -> str:
    """What the ranks whose trainer hook returned say when ``count`` other ranks' hooks raised."""
    who = f"another rank (rank {rank_sum})" if count == 1 else f"{count} other ranks"
    return (f"{who} raised in the trainer's closure that step() calls after writing .grad and before the "
            "update (e.g. an on_before_optimizer_step hook). That rank raised its own error; the step was not "
            "taken on any rank")


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
