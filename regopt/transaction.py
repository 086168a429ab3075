"""What a step changes before it knows whether it commits, recorded so that a failed or skipped step changes nothing.

Before its one host synchronization a step has already changed:

* module buffers (BatchNorm running statistics, ``num_batches_tracked``), through the closure's forwards;
* the random generator, through the penalties' draws;
* the ``.grad`` of the optimizer's parameters, which the step sets aside (to None) while it runs, so that
  a closure that calls ``backward()`` shows itself and cannot corrupt them.

Parameters and optimizer state change only when the step commits, so they need no record.
:class:`StepTransaction` holds the three records and puts them back on :meth:`~StepTransaction.rollback`.

Buffers are recorded by a global forward pre-hook (:mod:`regopt.forward_hooks`), before a module's first
call, for that module and all of its submodules: inside a ``torch.compile``'d graph the hook does not fire
for submodules, only for the ``OptimizedModule`` around them. The same recorder gives :func:`frozen_buffers`,
for passes that must leave every buffer as it was (the finite-difference replay, and the recomputation that
activation checkpointing runs inside a backward).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import forward_hooks

CLOSURE_CALLED_BACKWARD = (
    "loss_fn wrote .grad (it called backward()): regopt's loss_fn must return the mean loss over its "
    "micro-batch (or (loss, logits)) and must not call backward() or zero_grad(); regopt differentiates it "
    "itself, once per micro-batch. For example:\n"
    "    def loss_fn(x, y): return F.cross_entropy(model(x), y)\n"
    "    optimizer.step(loss_fn, (x, y))\n"
    "The step was not taken, and .grad is as it was before it."
)


class BufferRecord:
    """Copies of the buffers of every module whose forward runs while :meth:`recording`, taken before its first call.

    Each buffer is copied once (the first state counts), whichever modules share it.
    """

    def __init__(self) -> None:
        self._modules: dict[int, nn.Module] = {}  # visited, kept alive so that ids stay unique
        self._saved: dict[int, tuple[nn.Module, str, Tensor, Tensor]] = {}  # id(buffer) -> (owner, name, buffer, copy)

    def record(self, module: nn.Module) -> None:
        """Copy the buffers of ``module`` and of its submodules not visited yet."""
        pending = [module]
        while pending:
            current = pending.pop()
            if id(current) in self._modules:  # its submodules were visited with it
                continue
            self._modules[id(current)] = current
            for name, buffer in current.named_buffers(recurse=False):
                if id(buffer) not in self._saved:
                    self._saved[id(buffer)] = (current, name, buffer, buffer.detach().clone())
            pending.extend(child for child in current.children())

    def modules(self) -> list[nn.Module]:
        """The modules visited, in order: the outermost module called first, then its submodules."""
        return list(self._modules.values())

    @contextmanager
    def recording(self) -> Iterator[BufferRecord]:
        """Record every module whose forward starts inside the block."""
        with forward_hooks.calling(self.record):
            yield self

    def restore(self) -> None:
        """Put every recorded buffer back (the tensor object too, if a module replaced it)."""
        if not self._saved:
            return
        buffers, copies = [], []
        for owner, name, buffer, copy in self._saved.values():
            if owner._buffers.get(name) is not buffer:
                owner._buffers[name] = buffer
            buffers.append(buffer)
            copies.append(copy)
        with torch.no_grad():
            torch._foreach_copy_(buffers, copies)


def global_rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    """The global CPU RNG's state, and ``device``'s global CUDA RNG's (seed and offset: read without a sync)."""
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_global_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    """Put back what :func:`global_rng_state` read."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@contextmanager
def frozen_buffers() -> Iterator[None]:
    """Run forward passes that leave every module buffer (BatchNorm running stats, ...) as it was.

    Buffers are put back when the block ends, not when each forward ends: a backward inside the
    block may still need what the forward saved.
    """
    record = BufferRecord()
    try:
        with record.recording():
            yield
    finally:
        record.restore()


class StepTransaction:
    """One step's records: module buffers, the parameters' ``.grad`` (set aside), the generator state and the
    global RNG's (which the closure's own draws, dropout, advance).

    Creating it sets every parameter's ``.grad`` to None for the duration of the step; the step
    then either commits (assigns the new ``.grad``) or calls :meth:`rollback`.
    """

    def __init__(self, params: Sequence[Tensor], generator: torch.Generator | None) -> None:
        self.params = list(params)
        self.buffers = BufferRecord()
        self._generator = generator
        self._generator_state = generator.get_state() if generator is not None else None
        self._device = self.params[0].device
        self._global_rng_state = global_rng_state(self._device)
        self._grads = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None

    @property
    def grads_before(self) -> list[Tensor | None]:
        """What ``.grad`` held before the step, per parameter."""
        return list(self._grads)

    def grads_were_written(self) -> bool:
        """Whether something (a closure calling ``backward()``) wrote a ``.grad`` during the step."""
        return any(p.grad is not None for p in self.params)

    def rollback(self) -> None:
        """Put back buffers, ``.grad``, generator and global RNG states as they were before the step."""
        self.buffers.restore()
        for p, grad in zip(self.params, self._grads):
            p.grad = grad
        if self._generator is not None:
            self._generator.set_state(self._generator_state)
        set_global_rng_state(self._global_rng_state, self._device)

    @contextmanager
    def rolled_back_on_failure(self, *cleanups: Callable[[], None]) -> Iterator[None]:
        """Roll the step back if the block raises, run ``cleanups`` (telling the other ranks), and re-raise;
        an error that follows a closure's own ``backward()`` is raised as the TypeError that explains it."""
        try:
            yield
        except BaseException as error:
            called_backward = self.grads_were_written()
            self.rollback()  # a failed step changes nothing
            for cleanup in cleanups:
                cleanup()
            if called_backward and isinstance(error, Exception) and not isinstance(error, TypeError):
                raise TypeError(CLOSURE_CALLED_BACKWARD) from error
            raise

