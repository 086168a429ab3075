"""One step's gradient work: split → per micro-batch (closure, g_j, R_j, ∇R_j) → weighted sums.

    G = Σ_j w_j g_j,   P = Σ_j w_j ∇R_j,
    loss = Σ_j w_j L_j,   penalty = Σ_j w_j R_j,   micro_grad_sq_norm = Σ_j w_j ‖g_j‖²

Every micro-batch is forwarded once in train mode: its backward passes (and the
finite-difference replay) run with buffers frozen, so that a forward that activation
checkpointing re-runs inside a backward does not update BatchNorm statistics again.
Its graph is freed before the next one starts, and ``accumulate`` never synchronizes
with the host; :func:`settle` makes the step's one synchronization. The optimizers turn
G and P into the applied gradient and hand it to torch.optim.SGD's update.

Subsampled penalty (``penalty_micro_batches = m < k``): the penalty work runs on a set S of m of
the k micro-batches, drawn uniformly without replacement once per step before the loop
(:func:`sample_penalty_subset`), and each sampled term is weighted by k/m:

    P̂ = Σ_{j∈S} (k/m) w_j ∇R_j,   penalty = Σ_{j∈S} (k/m) w_j R_j,   E_S[P̂] = P,

while G, loss and micro_grad_sq_norm still sum over every micro-batch. An unsampled micro-batch
takes the first-order path (no create_graph, no replay) but still makes its penalty draw (FT
labels, UJ direction) and discards it, so micro-batch j draws the same numbers whichever S is
drawn: P̂ is the full step's P, with the same draws, thinned (E_S[P̂ | draws] = P exactly).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import IntEnum

import torch
from torch import Tensor

from . import hvp
from .batching import AutocastState, ClosureOutput, MicroBatch, call_closure
from .penalties import Penalty
from .transaction import frozen_buffers, global_rng_state, set_global_rng_state


class Sum(IntEnum):
    """The slots of ``Accumulation.sums``: one float tensor, so that the all-reduce carries them in one buffer."""

    LOSS = 0  # Σ_j w_j L_j
    PENALTY = 1  # Σ_j w_j R_j
    MICRO_GRAD_SQ_NORM = 2  # Σ_j w_j ‖g_j‖²
    MICRO_GRAD_NORM = 3  # Σ_j ‖g_j‖ (unweighted: grafting's mean_j ‖g_j‖ divides it by k)
    MICRO_BATCHES = 4  # k


@dataclass(frozen=True)
class Accumulation:
    """Weighted sums over one step's micro-batches (this process's share, before any all-reduce).

    ``terms[j] = (L_j, R_j, ‖g_j‖², ‖∇R_j‖²)`` per micro-batch, kept for the finiteness check;
    ``sums`` the :class:`Sum` slots as one float tensor.
    ``used[i]``: whether any micro-batch's graph reached parameter i (None: all of them);
    ``used_count`` replaces it after a distributed all-reduce: on how many ranks it was used;
    ``counts`` = (Σ_r k_r, then the agreement slots of :class:`regopt.distributed.Agreement`), also filled by
    the all-reduce, in its wire dtype (exact integers), read on the host by :func:`settle`.
    ``penalty_added``: ``grad`` holds G ± λP and ``penalty_grad`` is None (a distributed step that
    all-reduces them together).
    """

    grad: list[Tensor]
    penalty_grad: list[Tensor] | None
    terms: Tensor
    sums: Tensor
    used: list[bool] | None = None
    used_count: Tensor | None = None
    counts: Tensor | None = None
    penalty_added: bool = False

    @property
    def loss(self) -> Tensor:
        return self.sums[Sum.LOSS]

    @property
    def penalty(self) -> Tensor:
        return self.sums[Sum.PENALTY]

    @property
    def micro_grad_sq_norm(self) -> Tensor:
        return self.sums[Sum.MICRO_GRAD_SQ_NORM]

    @property
    def mean_micro_grad_norm(self) -> Tensor:
        """mean_j ‖g_j‖, the small-batch step length s of iterative grafting."""
        return self.sums[Sum.MICRO_GRAD_NORM] / self.sums[Sum.MICRO_BATCHES]

    def reduced(self, grad: list[Tensor], penalty_grad: list[Tensor] | None, sums: Tensor,
                used_count: Tensor | None = None, counts: Tensor | None = None) -> "Accumulation":
        return replace(self, grad=grad, penalty_grad=penalty_grad, sums=sums, used_count=used_count, counts=counts)


def weighted_add(total: list[Tensor] | None, term: list[Tensor], weight: float) -> list[Tensor]:
    """``total + weight · term`` in place (a new weighted copy of ``term`` when ``total`` is None)."""
    if total is None:
        return torch._foreach_mul(term, weight)
    torch._foreach_add_(total, term, alpha=weight)
    return total


@dataclass(frozen=True)
class StepSetup:
    """What every micro-batch of a step shares: the closure, the parameters and how to differentiate."""

    closure: Callable[..., object]
    count: int
    params: Sequence[Tensor]
    penalty: Penalty | None = None
    method: str = "exact"
    generator: torch.Generator | None = None
    fd_eps: float = 1e-2
    closure_autocast: AutocastState | None = None
    loss_scale: float = 1.0
    sparse_grads: bool = False  # whether g_j may be sparse (no penalty, no grafting, one process)
    penalty_micro_batches: int | None = None  # m: the penalty on m sampled micro-batches (module docstring)

    @property
    def device(self) -> torch.device:
        return self.params[0].device


def micro_batch_gradients(setup: StepSetup, micro: MicroBatch,
                          penalized: bool) -> tuple[ClosureOutput, hvp.MicroGradients]:
    """One forward of the closure on ``micro``, then g_j (and R_j, ∇R_j when ``penalized``).

    The backward passes (and the finite-difference replay) run with buffers frozen, so the
    micro-batch updates BatchNorm statistics once, also when activation checkpointing
    re-runs its forward inside a backward.
    """
    # The finite-difference pass replays the closure's random draws (dropout masks) exactly.
    rng_before = global_rng_state(setup.device) if penalized and setup.method == "finite_difference" else None
    out = call_closure(setup.closure, micro, setup.count, setup.closure_autocast)
    _check_logits_differentiable(setup, micro, out)
    with frozen_buffers():
        if not penalized:
            if setup.penalty is not None:  # an unsampled micro-batch: its draw, discarded (see the module docstring)
                _penalty_draw(setup, out)
            return out, hvp.first_order(out.loss, setup.params, setup.loss_scale, sparse=setup.sparse_grads)
        return out, _penalized_gradients(setup, micro, out, rng_before)


def _check_logits_differentiable(setup: StepSetup, micro: MicroBatch, out: ClosureOutput) -> None:
    """Refuse logits that a penalty needs but cannot differentiate (detached, or computed under no_grad)."""
    if setup.penalty is not None and setup.penalty.needs_logits and out.logits is not None \
            and not out.logits.requires_grad:
        raise ValueError(
            f"loss_fn returned logits that do not require grad on {micro.describe(setup.count)}: the "
            f"{setup.penalty.name} penalty differentiates them with respect to the parameters. Return the model's "
            "output itself (not .detach()'d, not computed under torch.no_grad())"
        )


def _penalty_draw(setup: StepSetup, out: ClosureOutput) -> Tensor | None:
    """The micro-batch's random draw for its penalty (FT labels, UJ direction; None for GN, AJ)."""
    penalty = setup.penalty
    if penalty.needs_logits and out.logits is None:
        raise TypeError(
            f"the {penalty.name} penalty needs the logits: loss_fn must return (loss, logits), "
            "e.g. `def loss_fn(x, y): logits = model(x); return F.cross_entropy(logits, y), logits`"
        )
    return penalty.sample(out.logits, setup.generator)


def _penalized_gradients(setup: StepSetup, micro: MicroBatch, out: ClosureOutput,
                         rng_before: tuple[Tensor, Tensor | None] | None) -> hvp.MicroGradients:
    penalty, device = setup.penalty, setup.device
    draw = _penalty_draw(setup, out)

    def gradient_at_shift() -> list[Tensor]:
        # fork_rng leaves the RNG as the first pass left it, whatever the replay draws; the caller's
        # frozen_buffers restores the buffers only after the backward, which may have saved them.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            set_global_rng_state(rng_before, device)
            shifted = call_closure(setup.closure, micro, setup.count, setup.closure_autocast)
            scalar = penalty.scalar(shifted.loss, shifted.logits, draw, shifted.mask)
            return hvp.gradient(scalar, setup.params, setup.loss_scale)

    differentiate = hvp.METHODS[setup.method]
    return differentiate(out.loss, penalty.scalar(out.loss, out.logits, draw, out.mask), setup.params,
                         gradient_at_shift, setup.fd_eps, setup.loss_scale)


def sample_penalty_subset(count: int, size: int, generator: torch.Generator | None) -> frozenset[int]:
    """``size`` of the indices 0..count-1, uniformly without replacement: the micro-batches that get the penalty.

    Drawn on the host, without synchronizing with a device:

    * ``generator`` None: ``torch.randperm(count)`` from the global CPU RNG (``torch.manual_seed``);
    * a CPU ``generator``: ``torch.randperm(count, generator=generator)``;
    * a device (CUDA) ``generator``: its state (``get_state()``, a CPU tensor: seed and Philox offset,
      read without a sync) is hashed into the seed of a CPU generator that draws the permutation, and
      the device generator is then advanced by one tiny device draw (an asynchronous kernel), so that
      the next step hashes a different state. Reading a permutation drawn on the device would need a
      blocking copy to the host.

    Either way the subset is a function of the generator state, which the draw advances: it is saved
    in ``state_dict()`` (a resumed run draws the same subsets) and a failed step's rollback restores it.
    """
    if generator is None:
        order = torch.randperm(count)
    elif generator.device.type == "cpu":
        order = torch.randperm(count, generator=generator)
    else:
        order = torch.randperm(count, generator=host_generator(generator.get_state()))
        advance(generator)
    return frozenset(order[:size].tolist())


def state_seed(state: Tensor) -> int:
    """A 64-bit hash of a generator's state bytes (deterministic across runs and processes)."""
    # bytes(list) rather than .numpy(): the core depends on torch alone (numpy is optional for torch)
    digest = hashlib.blake2b(bytes(state.cpu().tolist()), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def host_generator(state: Tensor) -> torch.Generator:
    """A CPU generator seeded by :func:`state_seed` of a generator's state."""
    return torch.Generator().manual_seed(state_seed(state))


def advance(generator: torch.Generator) -> None:
    """Move ``generator`` on by one tiny draw on its device (an asynchronous kernel: no host sync), so that
    a draw seeded from its state next time hashes a different state."""
    torch.empty(1, device=generator.device).uniform_(generator=generator)


def _penalized_subset(penalty: Penalty | None, penalty_micro_batches: int | None, count: int,
                      generator: torch.Generator | None) -> frozenset[int] | None:
    """The sampled micro-batches, or None when every micro-batch gets the penalty (no draw then)."""
    if penalty is None or penalty_micro_batches is None or penalty_micro_batches >= count:
        return None
    return sample_penalty_subset(count, penalty_micro_batches, generator)


def accumulate(setup: StepSetup, micro_batches: Sequence[MicroBatch]) -> Accumulation:
    """Run the closure on each micro-batch and sum the weighted gradients and statistics.

    ``setup.closure_autocast`` is the autocast state to run the closure under (the caller runs
    everything else with autocast off, so that norms and penalties stay in full precision);
    every backward runs on ``setup.loss_scale`` times its scalar and is unscaled at once (float16).
    A parameter counts as used when any micro-batch's graph reaches it (a Python-side flag
    merged over micro-batches: no host sync). ``setup.penalty_micro_batches`` m < k: the penalty on m
    sampled micro-batches, weighted by k/m (module docstring). ``setup.sparse_grads``: sparse g_j
    (nn.Embedding(sparse=True)) are summed as they are instead of refused.
    """
    penalty, params = setup.penalty, setup.params
    sampled = _penalized_subset(penalty, setup.penalty_micro_batches, len(micro_batches), setup.generator)
    scale = 1.0 if sampled is None else len(micro_batches) / len(sampled)  # k/m, 1/P(j ∈ S)
    grad_sum = penalty_grad_sum = None
    used = [False] * len(params)
    rows = []  # (L_j, R_j, ‖g_j‖², ‖∇R_j‖²) as one 4-vector per micro-batch; R_j = ‖∇R_j‖² = 0 when unsampled
    for j, micro in enumerate(micro_batches):
        penalized = penalty is not None and (sampled is None or j in sampled)
        out, grads = micro_batch_gradients(setup, micro, penalized=penalized)
        if grads.penalty_grad is None:
            penalty_grad_sq_norm = grads.penalty
        else:
            penalty_grad_sq_norm = hvp.squared_norm(grads.penalty_grad)
            penalty_grad_sum = weighted_add(penalty_grad_sum, grads.penalty_grad, micro.weight * scale)
        rows.append(torch.stack([out.loss.detach(), grads.penalty, hvp.squared_norm(grads.loss_grad),
                                 penalty_grad_sq_norm]))
        grad_sum = weighted_add(grad_sum, grads.loss_grad, micro.weight)
        used = hvp.merge_usage(used, grads.used if grads.used is not None else [True] * len(params))
        del out, grads  # free this micro-batch's graph before the next forward
    terms = torch.stack(rows)
    weights = torch.tensor([m.weight for m in micro_batches], dtype=terms.dtype).to(terms.device, non_blocking=True)
    count = terms.new_full((1,), setup.count)  # a fill kernel: new_tensor([k]) would copy from the host and sync
    weighted = weights @ terms[:, :3]
    if scale != 1.0:
        weighted[1].mul_(scale)  # Σ_{j∈S} (k/m) w_j R_j (the unsampled rows hold R_j = 0)
    sums = torch.cat([weighted, terms[:, 2].sqrt().sum().unsqueeze(0), count])  # in Sum's order
    return Accumulation(grad_sum, penalty_grad_sum, terms, sums, used)


@dataclass(frozen=True)
class Settled:
    """What the step's one host synchronization found."""

    problem: str | None  # the first non-finite term, None when every term is finite
    used: list[bool]  # which parameters the step updates: those a micro-batch used, on any rank
    num_micro_batches: int  # k, all ranks together
    agreement: list[float] | None = None  # the all-reduced agreement slots (regopt.distributed.Agreement)


def settle(acc: Accumulation, micro_batches: Sequence[MicroBatch], **step_terms: Tensor) -> Settled:
    """The step's one host synchronization: whether every term is finite, and which parameters the step updates.

    Checks this process's per-micro-batch terms, then the (possibly all-reduced) sums and
    the 0-dim ``step_terms`` given by name (the large-batch gradient norm ‖G‖). After an
    all-reduce the decision reads reduced values only, so that every rank decides alike (a rank's
    non-finite term reaches the reduced sums: :func:`regopt.distributed.all_reduce_accumulation`), and the
    usage counts, Σ_r k_r and the agreement slots travel to the host in the same transfer.
    """
    finite = torch.isfinite(acc.terms)
    named = torch.stack([acc.sums.isfinite().all()] + [t.isfinite() for t in step_terms.values()])
    if acc.used_count is None:
        ok, count, agreement = bool(finite.all() & named.all()), len(micro_batches), None
        used = acc.used if acc.used is not None else [True] * len(acc.grad)
    else:
        slots = len(acc.counts)
        on_host = torch.cat([named.all().to(acc.counts.dtype).reshape(1), acc.counts, acc.used_count]).tolist()
        # Σk is NaN when a rank failed before the all-reduce (its sums are NaN); the step then raises anyway.
        ok, count, agreement = on_host[0] == 1, int(on_host[1]) if math.isfinite(on_host[1]) else 0, on_host[2:1 + slots]
        used = [n > 0 for n in on_host[1 + slots:]]
    problem = None if ok else _describe_nonfinite(acc, micro_batches, finite, named, step_terms)
    return Settled(problem, used, count, agreement)


def _describe_nonfinite(acc: Accumulation, micro_batches: Sequence[MicroBatch], finite: Tensor, named: Tensor,
                        step_terms: dict[str, Tensor]) -> str:
    if not bool(finite.all()):
        j, column = (int(i) for i in (~finite).nonzero()[0])
        term = ("loss L_j", "penalty R_j", "loss gradient squared norm ‖g_j‖²",
                "penalty gradient squared norm ‖∇R_j‖²")[column]
        value = acc.terms[j, column].item()
        return f"non-finite {term} ({value}) on {micro_batches[j].describe(len(micro_batches))}"
    if not bool(named[0]):
        return "non-finite loss, penalty or gradient norm on another rank's micro-batch"
    name = next(name for name, t in step_terms.items() if not bool(t.isfinite()))
    return f"non-finite {name} ({step_terms[name].item()}) over the step's micro-batches"

