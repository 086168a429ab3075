"""What ``step`` accepts: the per-micro-batch loss function and the batch, however a trainer passes them.

A regopt step differentiates each micro-batch itself, so it needs ``loss_fn(*micro_batch) -> loss`` and
the batch, not torch.optim's zero-argument ``closure() -> loss``, which calls backward() itself.
Three spellings reach the same step:

- ``optimizer.step(loss_fn, batch)``: the plain form.
- ``optimizer.step(batch=batch, loss_fn=loss_fn)``: for wrappers that forward keyword arguments and
  insert a zero-argument closure of their own (Lightning's ``LightningOptimizer.step`` and its precision
  plugins). That closure is a *hook*: it is called once, after the step has written ``.grad`` and before
  the update (where a torch.optim closure ends, so Lightning's ``on_before_optimizer_step`` hooks see the
  applied gradient), or after the rollback of a skipped step; what it returns is ignored, and it must not
  call backward().
- ``optimizer.step(BatchClosure(loss_fn, batch))``: for wrappers that forward only ``closure``
  (Accelerate's ``AcceleratedOptimizer.step``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .batching import Batch

_RECIPE = (
    "In Lightning, set `self.automatic_optimization = False` and in training_step call\n"
    "    self.optimizers().step(batch=batch, loss_fn=lambda x, y: F.cross_entropy(self(x), y))\n"
    "Through a wrapper that forwards only the closure (Accelerate's prepared optimizer):\n"
    "    optimizer.step(regopt.BatchClosure(loss_fn, batch))"
)


_SPELLINGS = (
    "Accepted: step(loss_fn, batch); step(batch=batch, loss_fn=loss_fn), optionally with a trainer's "
    "zero-argument closure as the first argument; step(regopt.BatchClosure(loss_fn, batch))"
)


@dataclass(frozen=True)
class BatchClosure:
    """A closure object that carries a regopt step's ``loss_fn`` and ``batch`` through a wrapper that
    forwards only ``closure`` to ``optimizer.step`` (e.g. Accelerate's prepared optimizer):
    ``optimizer.step(BatchClosure(loss_fn, batch))`` is ``optimizer.step(loss_fn, batch)``.

    Calling it is an error: only a regopt optimizer's ``step`` can evaluate it (per micro-batch).
    """

    loss_fn: Callable[..., Any]
    batch: Batch

    def __call__(self) -> Any:
        raise TypeError(
            "regopt.BatchClosure was called like a torch.optim closure: pass it to a regopt optimizer's step, "
            "which calls loss_fn once per micro-batch. A wrapper that calls closures itself (fp16 GradScaler, "
            "automatic optimization) cannot drive a regopt step:\n" + _RECIPE
        )


@dataclass(frozen=True)
class StepArguments:
    loss_fn: Callable[..., Any]
    batch: Batch
    hook: Callable[[], Any] | None  # a trainer's zero-argument closure, called once (see the module docstring)


def _takes_no_arguments(fn: Callable[..., Any], strictly: bool = False) -> bool:
    """Whether ``fn()`` binds (``strictly``: whether ``fn`` has no parameters at all, not even ``*args``)."""
    try:
        signature = inspect.signature(fn)
        signature.bind()
    except (TypeError, ValueError):  # ValueError: no signature (some builtins), nothing we can recognize
        return False
    return not signature.parameters if strictly else True


def step_arguments(owner: str, closure: Any, batch: Any, loss_fn: Any) -> StepArguments:
    """Read ``step(closure, batch, *, loss_fn)`` into the loss function, the batch and a trainer's hook;
    a TypeError says how to call ``step`` when they do not fit together."""
    if isinstance(closure, BatchClosure):
        if batch is not None or loss_fn is not None:
            raise TypeError(f"{owner}.step got a BatchClosure and also batch= or loss_fn=: pass one or the other")
        return StepArguments(closure.loss_fn, closure.batch, None)
    if loss_fn is not None:
        return _keyword_arguments(owner, closure, batch, loss_fn)
    if closure is not None and batch is None and callable(closure) and _takes_no_arguments(closure):
        raise TypeError(
            f"{owner}.step got a zero-argument closure and no batch: that is how a trainer's automatic "
            "optimization calls torch.optim optimizers (its closure runs the forward and backward pass itself). "
            "A regopt step needs the batch and a per-micro-batch loss function instead, since it differentiates "
            "each micro-batch itself.\n" + _RECIPE
        )
    if batch is not None and callable(closure) and _takes_no_arguments(closure, strictly=True):
        raise TypeError(
            f"{owner}.step got a closure that takes no arguments, but it calls the closure once per micro-batch "
            "with the micro-batch's parts. If a trainer wrapped your loss function in a closure of its own "
            "(Lightning's self.optimizers().step(fn, batch=batch) does), pass it by keyword instead:\n"
            "    self.optimizers().step(batch=batch, loss_fn=fn)"
        )
    if closure is not None and not callable(closure):
        raise TypeError(f"{owner}.step: closure must be callable, got {type(closure).__name__}. {_SPELLINGS}")
    if closure is None or batch is None:
        raise TypeError(
            f"{owner}.step needs a closure and a batch: step(loss_fn, batch), where loss_fn(*micro_batch) "
            "returns the mean loss over the micro-batch (or step(batch=batch, loss_fn=loss_fn))"
        )
    return StepArguments(closure, batch, None)


def _keyword_arguments(owner: str, hook: Any, batch: Any, loss_fn: Any) -> StepArguments:
    """``step(hook, batch=batch, loss_fn=loss_fn)``: a trainer's zero-argument closure (or None) as ``hook``."""
    if not callable(loss_fn):
        raise TypeError(f"{owner}.step: loss_fn must be callable, got {type(loss_fn).__name__}")
    if batch is None:
        raise TypeError(f"{owner}.step got loss_fn= but no batch=: step(batch=batch, loss_fn=loss_fn)")
    if hook is not None and not callable(hook):
        raise TypeError(f"{owner}.step: closure must be callable, got {type(hook).__name__}")
    if hook is not None and (hook is loss_fn or not _takes_no_arguments(hook)):
        raise TypeError(
            f"{owner}.step got a loss function both as its first argument and as loss_fn= (a first argument "
            f"beside loss_fn= must be a trainer's zero-argument closure): ambiguous. {_SPELLINGS}"
        )
    return StepArguments(loss_fn, batch, hook)


def check_trainer_accumulation(owner: str) -> None:
    """Refuse a step inside a trainer's gradient accumulation, where regopt can see it (Accelerate's
    ``gradient_accumulation_steps`` > 1, read from its GradientState if Accelerate is already imported).

    A trainer that accumulates skips the optimizer's step on all but the last of every n batches and
    relies on backward() having added their gradients to ``.grad``; a regopt step computes the gradient
    of the batch it is given, so the other batches would be silently dropped.
    """
    accelerate_state = sys.modules.get("accelerate.state")
    if accelerate_state is None or not accelerate_state.GradientState._shared_state:  # no Accelerator built
        return
    steps = accelerate_state.GradientState().num_steps
    if steps > 1:
        raise RuntimeError(
            f"{owner}.step was called under Accelerate's gradient accumulation (gradient_accumulation_steps="
            f"{steps}): Accelerate skips the optimizer's step on all but the last of every {steps} batches and "
            "counts on backward() to add their gradients to .grad, which a regopt step does not read, so those "
            f"batches would be silently dropped. Build the Accelerator with gradient_accumulation_steps=1 and "
            f"pass {steps} times the batch to step instead: regopt's micro-batching is the accumulation "
            "(micro_batch_size bounds the memory)"
        )
