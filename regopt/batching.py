"""Split a batch into micro-batches and call the user's closure on each.

A batch is a Tensor, a tuple/list of Tensors, or a dict of Tensors, every leaf
sharing the leading (batch) size B. It is cut along dim 0 into consecutive
micro-batches M_1..M_k of ``micro_batch_size`` examples (the last may be
smaller), k = ceil(B / |M|), with weights w_j = |M_j| / B so that
Σ_j w_j L_j is the mean loss over the batch.
"""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

Batch = Tensor | Sequence[Tensor] | Mapping[str, Tensor]
class AutocastState(NamedTuple):
    """The caller's ``torch.autocast`` settings for one device type, to re-enter around the closure alone."""

    device_type: str
    dtype: torch.dtype
    enabled: bool


def autocast_state(device: torch.device) -> AutocastState:
    """The ambient ``torch.autocast`` settings for ``device``'s type, to re-enter later."""
    return AutocastState(device.type, torch.get_autocast_dtype(device.type), torch.is_autocast_enabled(device.type))


@dataclass(frozen=True)
class MicroBatch:
    """One slice ``[start, stop)`` of the batch, with its weight w_j = |M_j| / B."""

    index: int
    start: int
    stop: int
    weight: float
    data: Batch

    @property
    def size(self) -> int:
        return self.stop - self.start

    def describe(self, count: int) -> str:
        return f"micro-batch {self.index} of {count} (examples {self.start}:{self.stop})"


@dataclass(frozen=True)
class ClosureOutput:
    """What loss_fn returned: the mean loss over the micro-batch, its logits [n, …, C] if given, and which of
    their positions the penalties keep (a bool [n, …]; None: all)."""

    loss: Tensor
    logits: Tensor | None
    mask: Tensor | None = None


def as_integer(value: Any) -> int | None:
    """``value`` as an int if it is an integral number (int, numpy integer, ...: ``operator.index``), else None.
    A bool is not taken for a number here."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def check_micro_batch_size(micro_batch_size: Any) -> int:
    """A positive integral number, as an int; else ValueError "Invalid micro_batch_size: <value>"."""
    size = as_integer(micro_batch_size)
    if size is None or size < 1:
        raise ValueError(f"Invalid micro_batch_size: {micro_batch_size!r} (expected a positive int)")
    return size


def _leaves(batch: Any) -> list[tuple[str, Any]]:
    if isinstance(batch, Tensor):
        return [("batch", batch)]
    if isinstance(batch, Mapping):
        for key in batch:
            if not isinstance(key, str):
                raise TypeError(
                    f"batch is a dict with the key {key!r} ({type(key).__name__}): its keys must be strings, since "
                    "each part is passed to loss_fn as a keyword argument, loss_fn(**micro_batch)"
                )
        return [(f"batch[{key!r}]", value) for key, value in batch.items()]
    if isinstance(batch, (tuple, list)):
        return [(f"batch[{i}]", value) for i, value in enumerate(batch)]
    raise TypeError(
        f"batch must be a Tensor, a tuple/list of Tensors or a dict of Tensors, got {type(batch).__name__}"
    )


def batch_size(batch: Any) -> int:
    """The leading size B shared by every leaf of ``batch``; raises on any malformed batch."""
    leaves = _leaves(batch)
    if not leaves:
        raise ValueError("batch is empty: expected at least one Tensor")
    for name, leaf in leaves:
        if not isinstance(leaf, Tensor):
            raise TypeError(f"{name} must be a Tensor, got {type(leaf).__name__}")
        if leaf.dim() == 0:
            raise ValueError(f"{name} is 0-dimensional: expected a leading batch dimension")
    sizes = {name: leaf.shape[0] for name, leaf in leaves}
    if len(set(sizes.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in sizes.items())
        raise ValueError(f"batch leaves disagree on the leading (batch) size: {listed}")
    size = next(iter(sizes.values()))
    if size == 0:
        raise ValueError("batch is empty: the leading (batch) size is 0, expected at least 1")
    return size


def _slice(batch: Batch, start: int, stop: int) -> Batch:
    if isinstance(batch, Tensor):
        return batch[start:stop]
    if isinstance(batch, Mapping):
        return {key: value[start:stop] for key, value in batch.items()}
    return tuple(value[start:stop] for value in batch)


def split_batch(batch: Batch, micro_batch_size: int, total_size: int | None = None) -> list[MicroBatch]:
    """Consecutive disjoint micro-batches of ``batch`` with weights |M_j| / total_size.

    ``total_size`` defaults to this batch's size B; a distributed step passes the
    global size so that weights sum to one over all ranks.
    """
    size = batch_size(batch)
    total = size if total_size is None else total_size
    micro_batches = []
    for index, start in enumerate(range(0, size, micro_batch_size)):
        stop = min(start + micro_batch_size, size)
        micro_batches.append(MicroBatch(index, start, stop, (stop - start) / total, _slice(batch, start, stop)))
    return micro_batches


_BATCH_NORM_NEEDS_TWO = "Expected more than 1 value per channel when training"


def _one_example_message(error: ValueError, where: str, micro: MicroBatch) -> str:
    return (
        f"{error} on {where}: BatchNorm in train mode needs at least 2 examples per micro-batch, and this one "
        f"holds {micro.size}. Use a batch size divisible by micro_batch_size (a batch of B examples ends with a "
        "micro-batch of B % micro_batch_size), e.g. DataLoader(..., drop_last=True) with such a batch size, "
        "or a micro_batch_size of at least 2"
    )


def call_closure(closure: Callable[..., Any], micro: MicroBatch, count: int,
                 autocast: AutocastState | None = None) -> ClosureOutput:
    """``closure(*parts)``, ``closure(**parts)`` or ``closure(t)`` under grad mode, with its result checked.

    ``autocast`` (device type, dtype, enabled) is the caller's autocast state, restored for the
    closure alone: regopt's own reductions run outside autocast, in the parameters' precision.
    An exception inside the closure propagates unchanged, except PyTorch's BatchNorm error for a
    one-example micro-batch, raised again as a ValueError that names the micro-batch (``from`` it).
    """
    autocast_context = torch.autocast(*autocast) if autocast is not None else contextlib.nullcontext()
    where = micro.describe(count)
    with torch.enable_grad(), autocast_context:
        try:
            if isinstance(micro.data, Tensor):
                result = closure(micro.data)
            elif isinstance(micro.data, Mapping):
                result = closure(**micro.data)
            else:
                result = closure(*micro.data)
        except ValueError as error:
            if _BATCH_NORM_NEEDS_TWO not in str(error):
                raise  # the closure's own exception, unchanged
            raise ValueError(_one_example_message(error, where, micro)) from error
    return _checked_output(result, micro, where)


def _checked_output(result: Any, micro: MicroBatch, where: str) -> ClosureOutput:
    """``loss``, ``(loss, logits)`` or ``(loss, logits, mask)`` as returned on ``micro`` (``where``), checked: a
    0-dim loss that requires grad, logits of shape [|M_j|, …, C], a bool mask of shape [|M_j|, …] (or None)."""
    logits = mask = None
    if isinstance(result, tuple):
        if len(result) not in (2, 3):
            raise TypeError(
                f"loss_fn returned a tuple of length {len(result)} on {where}: expected a loss, (loss, logits) "
                "or (loss, logits, mask)"
            )
        result, logits, mask = (*result, None)[:3]
        _check_logits(logits, micro, where)
        if mask is not None:
            _check_mask(mask, logits, where)
    if not isinstance(result, Tensor):
        raise TypeError(
            f"loss_fn returned {type(result).__name__} on {where}: expected a 0-dim loss Tensor or (loss, logits)"
        )
    if result.dim() != 0:
        raise ValueError(
            f"loss_fn returned a loss of shape {tuple(result.shape)} on {where}: expected a 0-dim mean loss"
        )
    if not result.requires_grad:
        raise ValueError(
            f"loss_fn returned a loss that does not require grad on {where}: "
            "compute it from the parameters, outside torch.no_grad()"
        )
    return ClosureOutput(result, logits, mask)


def _check_logits(logits: Any, micro: MicroBatch, where: str) -> None:
    """Logits [|M_j|, …, C]: at least two dimensions, the first the micro-batch's size, none empty."""
    if not isinstance(logits, Tensor) or logits.dim() < 2 or logits.shape[0] != micro.size or logits.numel() == 0:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise TypeError(
            f"loss_fn returned logits of shape {shape} on {where}: expected a Tensor of shape [{micro.size}, C], "
            f"or [{micro.size}, …, C] with one example per position (e.g. [{micro.size}, T, C] for tokens)"
        )


def _check_mask(mask: Any, logits: Tensor, where: str) -> None:
    """A bool mask of logits' shape without the class dimension, on logits' device."""
    expected = tuple(logits.shape[:-1])
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != expected \
            or mask.device != logits.device:
        found = (f"a {mask.dtype} Tensor of shape {tuple(mask.shape)} on {mask.device}" if isinstance(mask, Tensor)
                 else type(mask).__name__)
        raise TypeError(
            f"loss_fn returned a mask that is {found} on {where}: expected a torch.bool Tensor of shape {expected} "
            f"on {logits.device} (logits' shape without the class dimension; True keeps a position), e.g. "
            "`labels != -100`"
        )
