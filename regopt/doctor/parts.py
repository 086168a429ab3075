"""A part of the doctor's report: one question about the model, answered within its own time limit.

Each part is a function ``part(subject, deadline) -> PartResult``; :func:`run_part` runs it under a
hard time limit (SIGALRM, in the main thread) and turns an exception or an overrun into a result,
so that one failing part does not stop the others.
"""

from __future__ import annotations

import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

STATUSES = ("ok", "warn", "fail", "skip", "error", "timeout")


@dataclass
class Subject:
    """What the doctor examines: a model, ``loss_fn(model, *parts)``, one batch, and the step's settings."""

    model: nn.Module
    loss_fn: Callable[..., Any]
    batch: Any
    micro_batch_size: int
    penalty: float = 0.01
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lr: float = 1e-3
    rounds: int = 3
    seed: int = 0
    exact_available: bool | None = None  # set by the exact-path part, read by the later ones
    attention_math: bool = False  # the exact path runs only with scaled_dot_product_attention's math kernel

    def exact_kernels(self) -> Any:
        """The context the exact path needs: SDPA's math kernel when ``attention_math``, else nothing."""
        if not self.attention_math:
            return nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)


@dataclass
class PartResult:
    """One part's answer: a status (:data:`STATUSES`), a one-line verdict, detail lines and machine-readable data."""

    name: str
    title: str
    status: str
    verdict: str
    details: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


class PartTimeout(BaseException):
    """Raised inside a part when its time limit is reached (a BaseException, so that a part's own
    ``except Exception`` around one of its rows does not swallow it)."""


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`PartTimeout` in the block after ``seconds`` (SIGALRM; only in the main thread of a Unix
    process, elsewhere the parts' own deadline checks are the only limit)."""
    usable = hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise PartTimeout(f"ran past its time limit of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def run_part(name: str, title: str, part: Callable[[Subject, float], PartResult], subject: Subject,
             limit_s: float) -> PartResult:
    """``part(subject, deadline)`` with a hard limit of ``limit_s`` (plus 10 % grace for its own deadline checks);
    an exception or an overrun becomes an ``error``/``timeout`` result naming it."""
    start = time.perf_counter()
    try:
        with time_limit(limit_s * 1.1 + 1.0):
            result = part(subject, start + limit_s)
    except PartTimeout as error:
        result = PartResult(name, title, "timeout", f"not finished: {error}")
    except Exception as error:  # a part that fails is reported; the others still run
        result = PartResult(name, title, "error", f"the check itself failed: {first_line(error)}",
                            details=traceback.format_exception_only(type(error), error)[-1:])
    result.seconds = time.perf_counter() - start
    return result
